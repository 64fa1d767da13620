#!/usr/bin/env bash
# The whole pipeline on the CPU default (the procedural shapes world), on 2 cores:
# tokenizer stage 1 -> stage 2 -> reconstruction eval -> generator training -> GenEval with the exact detector
# -> the table of trained vs untrained numbers (runs/cpu_report.json) -> understanding stage 1 -> stage 2 -> held-out
# exact match against the majority answer and a blank image (runs/understanding_report.json) -> a scripted chat
# (one answer, one drawing, one reconstruction; runs/chat_transcript.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu
deepspeed train/tokenizer.py
deepspeed train/tokenizer.py --config train/configs/tokenizer/tiny-stage2.yaml
deepspeed train/ar_gen.py
python scripts/cpu_report.py
deepspeed train/understanding.py
deepspeed train/understanding.py --config train/configs/understanding/tiny-stage2.yaml
python scripts/understanding_report.py
image=runs/world-llava-eval/images/00000001.png  # held out (a green circle): written by understanding_report.py
printf '%s\n' "/image $image" "What color is the circle?" "How many circles are there?" \
    "/draw a photo of a red circle" "/reconstruct $image" |
    python scripts/chat.py --out runs/chat draw.count=4 draw.cfg_scale=3.0 | tee runs/chat_transcript.txt
