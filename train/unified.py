"""Unified training: one LLaVA model whose LM's vocabulary holds VQRAE's codes learns, in the same batches,
understanding conversations (continuous features -> projector -> LM) and caption -> codes sequences (next-code
prediction, the generator's format), under DeepSpeed ZeRO.

    deepspeed train/unified.py                                             # CPU default: the shapes world
    deepspeed --num_gpus 8 train/unified.py --config train/configs/unified/qwen3.yaml \\
        model.init_from=runs/qwen3-und-stage1 model.vqrae=runs/siglip2-stage2/export \\
        data.conversations=/data/llava/llava_v1_5_mix665k.json data.image_root=/data/llava generation.codes=/data/codes
    #   or from a generator: generation.generator=runs/qwen3-ar/export model.projector=PROJECTOR.safetensors
    #   or conversations from LLaVA shards (scripts/llava_to_shards.py): data.train=s3://bucket/llava/shardindex.json

Starts from an understanding export (model.init_from, e.g. stage 1's: its vocabulary is expanded by the codes of
model.vqrae, the VQRAE its tower came from) or from a generator export (generation.generator, whose VQRAE is the
tower, plus model.projector, a stage-1 projector file). Each sample is a conversation or, with probability
generation.ratio, a caption -> codes sequence (caption dropout to the unconditional prompt for CFG, as in generator
training; conversations from shards mix shard by shard, data.mix.ShardTaskMix). Loss: each task's cross-entropy
over its supervised tokens (answers; codes + <|image_end|>), the two means summed (generation.loss); loss_und / loss_gen and tokens_und / tokens_gen are logged apart. Projector + LLM train (fully, or LoRA adapters with
the image-token rows of the embeddings and head trainable), ZeRO-3 and gradient checkpointing as in
train/understanding.py. The export (llm/unified.py) loads in transformers alone for understanding; the project's
sampler, GenEval and chat draw with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, train/ comes first on sys.path, where train/tokenizer.py would hide the tokenizer package: the
# repository root goes before it (the one path edit of the project, the same in every trainer)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import run_entry_point
from train.loop import run_trainer
from train.unified_trainer import CONFIG_DIR, UnifiedTrainConfig, UnifiedTrainer


def main(argv: list[str] | None = None) -> None:
    run_trainer(UnifiedTrainer, UnifiedTrainConfig, CONFIG_DIR / "tiny.yaml", __doc__, argv)


if __name__ == "__main__":
    run_entry_point(main)
