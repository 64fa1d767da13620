#!/usr/bin/env bash
# The GPU checks of the repository as one prepared run: the three benchmarks, the CUDA tests and short runs of both
# trainers, each under its own time limit, so that one slow or failing part still leaves the others' results. Logs and JSON go to $OUT.
#
#   bash scripts/gpu_checks.sh            # generate tokenizer tests trainers understanding quantizer (~8-10 min)
#   bash scripts/gpu_checks.sh generate tokenizer_compile
#   bash scripts/gpu_checks.sh generate:300 tests   # NAME:SECONDS replaces that section's time limit
#
# Sections, most important first: generate (sampler vs baselines, transformers' static cache + compile among them),
# tokenizer (training step MFU, stage 2, SigLIP2-so400m at 256 px, batch 32, bf16, checkpointing off and on), tests (the
# CUDA tests), trainers (both trainers on CUDA, bf16, ZeRO-2, a few dozen steps on the shapes world: tokenizer stage 1
# -> stage 2 -> generator), understanding (stage 1 at ZeRO-2 then stage 2 at ZeRO-3, bf16, from the trainers' export),
# quantizer (nearest-code search), generate_compile (generate with our decode step torch.compile'd too),
# tokenizer_compile (the tokenizer step torch.compile'd).
# Needs torch, torchvision, transformers (the version in constraints.txt), lpips, deepspeed (trainers only), pyyaml,
# safetensors, pillow, numpy, tokenizers and pytest. On an offline machine whose Python lacks some, bring them as
# wheels (deepspeed publishes only a source archive: `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8` makes
# one), e.g.:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl \
#       transformers==5.24.0 lpips==0.1.4 hjson pydantic pydantic_core ...  # where pip can reach the index
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site   # on the machine
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
export PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

section() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local cmd="$*"
    echo "=== $name (limit ${limit}s): ${cmd:0:200}"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
}

trainers() {  # a small world with its foundation models, then tokenizer stage 1 -> stage 2 -> generator on CUDA
    set -e
    local dir=/tmp/gpu-checks common="deepspeed.bf16=true deepspeed.zero_stage=2 run.log_every=5 run.tensorboard=false"
    rm -rf "$dir"
    "$PY" scripts/prepare_world.py --no-progress out=$dir/world train.samples=1024 val.samples=64 heldout.samples=64 \
        prompts_per_task=2 val_prompts_per_task=2 dpg_prompts=4 siglip.run.steps=20 lm.run.steps=20
    "$PY" train/tokenizer.py $common run.output_dir=$dir/s1 run.steps=40 run.ckpt_every=20 run.sample_every=20 \
        model.encoder_path=$dir/world/siglip data.train=$dir/world/train/shards data.eval=$dir/world/val/shards \
        loss.disc_start=10 loss.gan_start=20
    "$PY" train/tokenizer.py --config train/configs/tokenizer/tiny-stage2.yaml $common run.output_dir=$dir/s2 \
        run.steps=30 run.ckpt_every=15 run.sample_every=15 model.init_from=$dir/s1 \
        data.train=$dir/world/train/shards data.eval=$dir/world/val/shards loss.gan_start=10
    "$PY" train/ar_gen.py $common run.output_dir=$dir/ar run.steps=40 run.ckpt_every=20 run.sample_every=20 \
        lm.pretrained=$dir/world/qwen3 data.vqrae=$dir/s2/export data.codes=$dir/codes \
        data.images=$dir/world/train/shards
    tail -n 2 $dir/s1/metrics.jsonl $dir/s2/metrics.jsonl $dir/ar/metrics.jsonl
    ls $dir/s1/export $dir/s2/export $dir/ar/export
}

understanding() {  # understanding stage 1 (ZeRO-2) -> stage 2 (ZeRO-3) on CUDA from the trainers' tokenizer export
    set -e
    local dir=/tmp/gpu-checks common="deepspeed.bf16=true run.log_every=5 run.tensorboard=false"
    [ -d $dir/s2/export ] || { echo "needs the trainers section's export ($dir/s2/export)"; exit 1; }
    "$PY" train/understanding.py $common deepspeed.zero_stage=2 run.output_dir=$dir/und1 run.steps=40 \
        run.ckpt_every=20 model.vqrae=$dir/s2/export model.lm_pretrained=$dir/world/qwen3 \
        data.image_root=$dir/world/train data.conversations=$dir/world/train/llava_captions.json
    "$PY" train/understanding.py --config train/configs/understanding/tiny-stage2.yaml $common \
        deepspeed.zero_stage=3 run.output_dir=$dir/und2 run.steps=40 run.ckpt_every=20 model.init_from=$dir/und1 \
        model.vqrae=$dir/s2/export model.lm_pretrained=$dir/world/qwen3 data.image_root=$dir/world/train \
        data.conversations=$dir/world/train/llava_conversations.json model.gradient_checkpointing=true
    tail -n 2 $dir/und1/metrics.jsonl $dir/und2/metrics.jsonl
    ls $dir/und2/export
}

run() {  # NAME or NAME:SECONDS
    local name=${1%%:*} limit=${1#*:}
    [ "$limit" = "$1" ] && limit=
    case $name in
        tests) section tests ${limit:-120} "$PY" -m pytest -m gpu -q tests/test_sampler.py tests/test_tokenizer.py ;;
        trainers) section trainers ${limit:-150} bash -c "$(declare -f trainers); trainers" ;;
        understanding) section understanding ${limit:-150} bash -c "$(declare -f understanding); understanding" ;;
        quantizer) section quantizer ${limit:-40} "$PY" scripts/bench_quantizer.py --device cuda ;;
        generate) section generate ${limit:-360} "$PY" scripts/bench_generate.py --qwen3-0.6b-shape --device cuda \
            --dtype bfloat16 --repeats 3 --spec-window 16 --json "$OUT/generate.json" ;;
        generate_compile) section generate_compile ${limit:-360} "$PY" scripts/bench_generate.py --qwen3-0.6b-shape \
            --device cuda --dtype bfloat16 --compile --repeats 3 --json "$OUT/generate_compile.json" ;;
        tokenizer) section tokenizer ${limit:-120} "$PY" scripts/bench_tokenizer.py --preset siglip2-so400m-p16-256 \
            --device cuda --dtype bf16 --batch 32 --stages 2 --json "$OUT/tokenizer.json" ;;
        tokenizer_compile) section tokenizer_compile ${limit:-200} "$PY" scripts/bench_tokenizer.py \
            --preset siglip2-so400m-p16-256 --device cuda --dtype bf16 --batch 32 --stages 2 --ckpt off --compile \
            --json "$OUT/tokenizer_compile.json" ;;
        *) echo "error: unknown section '$name' (generate tokenizer tests trainers understanding quantizer" \
              "generate_compile tokenizer_compile)"; exit 2 ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/device.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$OUT/device.txt"
sections=("$@")
[ $# -eq 0 ] && sections=(generate tokenizer tests trainers understanding quantizer)
for part in "${sections[@]}"; do run "$part"; done
