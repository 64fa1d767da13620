"""Two-stage VQRAE tokenizer training under DeepSpeed ZeRO.

    deepspeed train/tokenizer.py                                       # CPU default: tiny, stage 1, the world's SigLIP
    deepspeed train/tokenizer.py --config train/configs/tokenizer/tiny-stage2.yaml
    deepspeed --num_gpus 8 train/tokenizer.py --config train/configs/tokenizer/siglip2-stage1.yaml \\
        model.encoder_path=/ckpt/siglip2-so400m-patch16-256 loss.lpips_vgg_path=/ckpt/vgg16-397923af.pth \\
        data.train=/data/shards run.output_dir=runs/siglip2-stage1 model.quantizer.codebook_size=32768

Stage 1: encoder frozen (and in eval mode); quantizer + decoder learn L2 + LPIPS + lambda_G * adaptive * GAN + VQ.
Stage 2: starts from a stage-1 export (model.init_from); the encoder trains too (its own lr scale) with
lambda_d * ||E(X) - T(X)||^2 to T, a frozen copy of the encoder taken at the start of stage 2.
The model sections (model.encoder / quantizer / decoder) start from model.preset in stage 1 and from the stage-1
export in stage 2 (where they cannot change); the run folder's config.yaml holds them resolved. The run folder also
holds run.json (git SHA), metrics.jsonl, tb/, samples/, checkpoints/ and export/ (the EMA of every trained tensor).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, train/ comes first on sys.path, where train/tokenizer.py would hide the tokenizer package: the
# repository root goes before it (the one path edit of the project, the same in every trainer)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import run_entry_point
from train.loop import run_trainer
from train.tokenizer_config import CONFIG_DIR, TokenizerTrainConfig
from train.tokenizer_trainer import TokenizerTrainer


def main(argv: list[str] | None = None) -> None:
    run_trainer(TokenizerTrainer, TokenizerTrainConfig, CONFIG_DIR / "tiny-stage1.yaml", __doc__, argv)


if __name__ == "__main__":
    run_entry_point(main)
