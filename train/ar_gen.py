"""Autoregressive text-to-image training: a causal LM (Qwen3) with its vocabulary expanded by the VQRAE codes learns
next-token prediction of an image's codes after its caption, under DeepSpeed ZeRO.

    deepspeed train/ar_gen.py                        # CPU default: the world's Qwen3 on codes of the shapes world
    deepspeed --num_gpus 8 train/ar_gen.py --config train/configs/ar_gen/qwen3-0.6b.yaml \\
        lm.pretrained=/ckpt/Qwen3-0.6B data.vqrae=runs/siglip2-stage2/export data.codes=/data/codes

The CPU default starts from the world's pretrained Qwen3 (scripts/prepare_world.py) and needs the tokenizer of
`deepspeed train/tokenizer.py` and its stage 2 (train/configs/tokenizer/tiny-stage2.yaml); the codes are extracted
from the world's training images on first use (or beforehand by scripts/extract_codes.py). Loss: cross-entropy on the code
tokens and <|image_end|> only; ~10% of captions are dropped to the unconditional prompt for classifier-free
guidance. Every run.sample_every steps a PNG grid of sampled prompts is written; the run ends with an export
(llm/generator.py's layout) that `scripts/generate.py` and `eval/geneval.py` read.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, train/ comes first on sys.path, where train/tokenizer.py would hide the tokenizer package: the
# repository root goes before it (the one path edit of the project, the same in every trainer)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.ar_gen_trainer import CONFIG_DIR, ARGenTrainConfig, ARGenTrainer
from train.config import run_entry_point
from train.loop import run_trainer


def main(argv: list[str] | None = None) -> None:
    run_trainer(ARGenTrainer, ARGenTrainConfig, CONFIG_DIR / "tiny.yaml", __doc__, argv)


if __name__ == "__main__":
    run_entry_point(main)
