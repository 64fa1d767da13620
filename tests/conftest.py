"""Fixtures several test modules share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def llava_export(tmp_path_factory):
    """A tiny LLaVA export (the `tiny` VQRAE preset's tower, a tiny Qwen3 with large weights so that answers depend
    on the image): (root, vqrae, lm, model, processor), the export in root/export."""
    from llm.understanding import build_llava, save_llava
    from llm.vocab import build_tiny_qwen3
    from tokenizer import VQRAE, get_preset
    from world.shapes import shapes_world_tokenizer

    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    vqrae = VQRAE(get_preset("tiny")).eval()
    tokenizer = shapes_world_tokenizer(root / "tok")
    lm = build_tiny_qwen3(tokenizer, seed=3)
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    model, processor = build_llava(vqrae, lm, tokenizer)
    save_llava(model, processor, root / "export")
    return root, vqrae, lm, model, processor


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """A tiny Qwen3 causal-LM folder (save_pretrained: model + the world's caption tokenizer), what `lm.pretrained` /
    `model.lm_pretrained` read, as they read the world's pretrained Qwen3 or a real Qwen3."""
    from llm.vocab import build_tiny_qwen3
    from world.shapes import shapes_world_tokenizer

    root = tmp_path_factory.mktemp("qwen3") / "lm"
    tokenizer = shapes_world_tokenizer(root)
    build_tiny_qwen3(tokenizer, seed=0).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
