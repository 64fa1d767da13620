#!/usr/bin/env bash
# The whole pipeline on the CPU default (the procedural shapes world), on 2 cores, phase by phase:
# tokenizer stage 1 -> stage 2 -> code extraction -> generator -> reconstruction eval, GenEval and DPG-Bench
# against untrained baselines (runs/cpu_report.json) -> a captioned grid of originals, reconstructions and samples
# (runs/cpu_grid.png) -> understanding stage 1 -> stage 2 -> held-out exact match
# against the majority answer and a blank image (runs/understanding_report.json) -> a scripted chat (one image, two
# questions, one drawing, one reconstruction: runs/chat_transcript.txt) -> one summary table (runs/cpu_summary.json).
# A phase whose output exists is skipped (delete the output to redo it); a killed training phase resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu
mkdir -p runs

phase() {  # phase NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists, and record its duration
    local name=$1 output=$2 start=$SECONDS
    shift 2
    if [ -e "$output" ]; then
        echo "== $name: $output exists, skipped"
        return
    fi
    echo "== $name"
    "$@"
    printf '%s\t%s\t%s\n' "$name" "$((SECONDS - start))" "$output" >> runs/cpu_phases.tsv
    echo "== $name: done in $((SECONDS - start)) s -> $output"
}

chat() {  # the scripted chat, its transcript written whole or not at all
    local image=runs/world-llava-eval/images/00000001.png  # held out (a green circle), written by the report
    local draw  # the generator run's sampling settings, as the reports draw
    draw=$(python -c 'from pathlib import Path; from scripts.cpu_report import generator_sampling
s = generator_sampling(Path("runs"))
print(f"draw.cfg_scale={s.cfg_scale} draw.temperature={s.temperature} draw.top_k={s.top_k} draw.top_p={s.top_p}")')
    printf '%s\n' "/image $image" "What color is the circle?" "How many circles are there?" \
        "/draw a photo of a red circle" "/reconstruct $image" |
        python scripts/chat.py --out runs/chat draw.count=4 $draw > runs/.chat_transcript.txt
    cat runs/.chat_transcript.txt
    mv runs/.chat_transcript.txt runs/chat_transcript.txt
}

phase "tokenizer stage 1" runs/tiny-stage1/export/model.safetensors deepspeed train/tokenizer.py
phase "tokenizer stage 2" runs/tiny-stage2/export/model.safetensors \
    deepspeed train/tokenizer.py --config train/configs/tokenizer/tiny-stage2.yaml
phase "code extraction" runs/codes-tiny/summary.json python scripts/extract_codes.py \
    --tokenizer runs/tiny-stage2/export --data runs/world-32/train/shards --out runs/codes-tiny
phase "generator" runs/tiny-ar/export/model.safetensors deepspeed train/ar_gen.py
phase "reconstruction, GenEval, DPG-Bench" runs/cpu_report.json python scripts/cpu_report.py
phase "sample grid" runs/cpu_grid.png python scripts/cpu_grid.py
phase "understanding stage 1" runs/tiny-und-stage1/export/model.safetensors deepspeed train/understanding.py
phase "understanding stage 2" runs/tiny-und-stage2/export/model.safetensors \
    deepspeed train/understanding.py --config train/configs/understanding/tiny-stage2.yaml
phase "understanding eval" runs/understanding_report.json python scripts/understanding_report.py
phase "chat" runs/chat_transcript.txt chat
python scripts/cpu_summary.py
