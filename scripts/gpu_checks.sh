#!/usr/bin/env bash
# The GPU checks of the repository as one prepared run: the CUDA tests and the three benchmarks, each under its own
# time limit, so that one slow or failing part still leaves the others' results. Logs and JSON go to $OUT.
#
#   bash scripts/gpu_checks.sh                         # tests quantizer generate tokenizer  (~4-8 min on an H200)
#   bash scripts/gpu_checks.sh generate tokenizer_compile
#
# Sections: tests, quantizer, generate (with torch.compile variants), tokenizer (stage 2, SigLIP2-so400m at 256 px,
# batch 32, bf16, checkpointing off and on), tokenizer_compile (the same, torch.compile'd, checkpointing off).
# Needs torch, torchvision, transformers (the version in constraints.txt), lpips, pyyaml, safetensors, pillow, numpy,
# tokenizers and pytest. On an offline machine whose Python lacks some, bring them as wheels, e.g.:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl \
#       transformers==5.24.0 lpips==0.1.4                                  # where pip can reach the index
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site   # on the machine
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

section() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
}

run() {
    case $1 in
        tests) section tests 180 "$PY" -m pytest -m gpu -q tests/test_sampler.py tests/test_tokenizer.py ;;
        quantizer) section quantizer 40 "$PY" scripts/bench_quantizer.py --device cuda ;;
        generate) section generate 210 "$PY" scripts/bench_generate.py --qwen3-0.6b-shape --device cuda \
            --dtype bfloat16 --compile --repeats 3 --json "$OUT/generate.json" ;;
        tokenizer) section tokenizer 120 "$PY" scripts/bench_tokenizer.py --preset siglip2-so400m-p16-256 \
            --device cuda --dtype bf16 --batch 32 --stages 2 --json "$OUT/tokenizer.json" ;;
        tokenizer_compile) section tokenizer_compile 200 "$PY" scripts/bench_tokenizer.py \
            --preset siglip2-so400m-p16-256 --device cuda --dtype bf16 --batch 32 --stages 2 --ckpt off --compile \
            --json "$OUT/tokenizer_compile.json" ;;
        *) echo "error: unknown section '$1' (tests quantizer generate tokenizer tokenizer_compile)"; exit 2 ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/device.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$OUT/device.txt"
sections=("$@")
[ $# -eq 0 ] && sections=(tests quantizer generate tokenizer)
for part in "${sections[@]}"; do run "$part"; done
