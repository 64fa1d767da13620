#!/usr/bin/env bash
# The whole pipeline on the CPU default (the procedural shapes world), about 12 minutes on 2 cores:
# tokenizer stage 1 -> stage 2 -> reconstruction eval -> generator training -> GenEval with the exact detector
# -> the table of trained vs untrained numbers (runs/cpu_report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu
deepspeed train/tokenizer.py
deepspeed train/tokenizer.py --config train/configs/tokenizer/tiny-stage2.yaml
deepspeed train/ar_gen.py
python scripts/cpu_report.py
