"""Understanding training, LLaVA-1.5 style, on VQRAE's continuous features under DeepSpeed ZeRO.

    deepspeed train/understanding.py                                     # CPU default: stage 1 on the shapes world
    deepspeed train/understanding.py --config train/configs/understanding/tiny-stage2.yaml
    deepspeed --num_gpus 8 train/understanding.py --config train/configs/understanding/qwen3-stage1.yaml \\
        model.vqrae=runs/siglip2-stage2/export model.lm_pretrained=/ckpt/Qwen3-1.7B \\
        data.conversations=/data/llava/blip_laion_cc_sbu_558k.json data.image_root=/data/llava/images
    #   or LLaVA data converted to shards (scripts/llava_to_shards.py), local or remote: data.train=s3://b/llava/shardindex.json

Stage 1: the projector alone learns (VQRAE tower and LLM frozen, ZeRO-2, "plain" template: image -> caption); the
run saves the projector by itself (projector.safetensors, as LLaVA does) and a full export. Stage 2: projector +
LLM (fully, or LoRA adapters through peft with the projector trained fully at its own lr), multi-turn conversations
(ChatML, or LLaVA's vicuna_v1 for a LLaMA-family LLM: model.chat_format), ZeRO-3 and gradient checkpointing; it
starts from a stage-1 export (model.init_from) or from a stage-1 projector file loaded into a fresh model before
DeepSpeed partitions it (model.projector). The tower stays frozen unless
model.train_tower (at lr * tower_lr_scale). Every run ends with an export that transformers' LLaVA classes load
(LoRA merged, or kept beside it with lora.merge_on_export=false).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, train/ comes first on sys.path, where train/tokenizer.py would hide the tokenizer package: the
# repository root goes before it (the one path edit of the project, the same in every trainer)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import run_entry_point
from train.loop import run_trainer
from train.understanding_trainer import CONFIG_DIR, UnderstandingTrainConfig, UnderstandingTrainer


def main(argv: list[str] | None = None) -> None:
    run_trainer(UnderstandingTrainer, UnderstandingTrainConfig, CONFIG_DIR / "tiny-stage1.yaml", __doc__, argv)


if __name__ == "__main__":
    run_entry_point(main)
