#!/usr/bin/env bash
# The whole pipeline on the CPU default (the procedural shapes world), on 2 cores, phase by phase:
# prepare (the world on disk, then its foundation models: a SigLIP and a Qwen3, pretrained on it) -> what they know
# (runs/foundation_report.json) -> tokenizer stage 1 (the SigLIP as the frozen encoder) -> stage 2 -> code extraction
# -> generator (from the Qwen3) -> reconstruction eval, GenEval and DPG-Bench against untrained baselines
# (runs/cpu_report.json) -> a captioned grid of originals, reconstructions and samples (runs/cpu_grid.png) ->
# understanding stage 1 (the Qwen3 frozen) -> stage 2 -> held-out captions and exact match against the majority answer
# and a blank image (runs/understanding_report.json) -> a scripted chat (runs/chat_transcript.txt) -> one summary
# table (runs/cpu_summary.json).
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

phase "world data" runs/world/data.json python scripts/prepare_world.py data
phase "SigLIP pretraining" runs/world/siglip/pretraining.json python scripts/prepare_world.py siglip
phase "Qwen3 pretraining" runs/world/qwen3/pretraining.json python scripts/prepare_world.py lm
phase "foundation models report" runs/foundation_report.json python scripts/foundation_report.py
phase "tokenizer stage 1" runs/tiny-stage1/export/model.safetensors deepspeed train/tokenizer.py
phase "tokenizer stage 2" runs/tiny-stage2/export/model.safetensors \
    deepspeed train/tokenizer.py --config train/configs/tokenizer/tiny-stage2.yaml
phase "code extraction" runs/codes-tiny/summary.json python scripts/extract_codes.py \
    --tokenizer runs/tiny-stage2/export --data runs/world/train/shards --out runs/codes-tiny
phase "generator" runs/tiny-ar/export/model.safetensors deepspeed train/ar_gen.py
phase "reconstruction, GenEval, DPG-Bench" runs/cpu_report.json python scripts/cpu_report.py
phase "sample grid" runs/cpu_grid.png python scripts/cpu_grid.py
phase "understanding stage 1" runs/tiny-und-stage1/export/model.safetensors deepspeed train/understanding.py
phase "understanding stage 2" runs/tiny-und-stage2/export/model.safetensors \
    deepspeed train/understanding.py --config train/configs/understanding/tiny-stage2.yaml
phase "understanding eval" runs/understanding_report.json python scripts/understanding_report.py
phase "chat" runs/chat_transcript.txt python scripts/cpu_chat.py
python scripts/cpu_summary.py
