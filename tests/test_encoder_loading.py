"""Pretrained vision towers load exactly from transformers-format folders: every tensor of the tower equal to the
checkpoint's, wherever the checkpoint stores it (a tower, a dual encoder, an InternVL model), or one clear error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    InternVLConfig,
    InternVLForConditionalGeneration,
    Siglip2Config,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
)

from tokenizer import VQRAE, EncoderConfig, get_preset
from tokenizer.encoder import load_pretrained_encoder

TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 99}
VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "patch_size": 4}


def siglip() -> SiglipModel:
    return SiglipModel(SiglipConfig(vision_config={**VISION, "image_size": 16}, text_config=TEXT))


def siglip2() -> Siglip2Model:
    return Siglip2Model(Siglip2Config(vision_config={**VISION, "num_patches": 16}, text_config=TEXT))


def clip() -> CLIPModel:
    return CLIPModel(CLIPConfig(vision_config={**VISION, "image_size": 16}, text_config=TEXT, projection_dim=16))


def internvl() -> InternVLForConditionalGeneration:
    vision = {"model_type": "internvl_vision", **VISION, "image_size": 16, "use_mean_pooling": False}
    text = {"model_type": "qwen2", **TEXT, "num_key_value_heads": 2}
    return InternVLForConditionalGeneration(InternVLConfig(vision_config=vision, text_config=text, image_token_id=98))


BUILDERS = {"siglip": siglip, "siglip2": siglip2, "clip": clip, "internvl": internvl}
PREFIXES = {"siglip": "vision_model.", "siglip2": "vision_model.", "clip": "vision_model.", "internvl": "vision_tower."}


@pytest.mark.parametrize("kind", BUILDERS)
def test_every_tower_tensor_equals_the_checkpoint(tmp_path, kind):
    torch.manual_seed(0)
    BUILDERS[kind]().save_pretrained(tmp_path / kind)
    saved = load_file(str(tmp_path / kind / "model.safetensors"))
    encoder = load_pretrained_encoder(tmp_path / kind, EncoderConfig(feature_layer=-1))
    tower = encoder.tower.state_dict()
    assert len(tower) > 10, kind
    for key, value in tower.items():  # each under the checkpoint's vision prefix, never the text tower's
        assert torch.equal(value, saved[PREFIXES[kind] + key]), key
    # the loaded tower becomes a VQRAE whose export reloads without the checkpoint
    size = encoder.cfg.image_size
    model = VQRAE.from_pretrained_encoder(get_preset("tiny"), tmp_path / kind)
    assert model.config.encoder.image_size == size
    x = torch.rand(1, 3, size, size) * 2 - 1
    model.save_pretrained(tmp_path / "tok")
    with torch.no_grad():
        torch.testing.assert_close(VQRAE.from_pretrained(tmp_path / "tok").encode_features(x), model.encode_features(x))


def test_missing_tower_tensors_are_one_error_naming_them(tmp_path):
    torch.manual_seed(0)
    internvl().save_pretrained(tmp_path / "ivl")
    weights = tmp_path / "ivl" / "model.safetensors"
    state = load_file(str(weights))
    del state["vision_tower.encoder.layer.1.mlp.fc2.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 of the \d+ tensors .*prefix 'vision_tower\.'.*encoder\.layer\.1\.mlp"):
        load_pretrained_encoder(tmp_path / "ivl")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "ivl" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_pretrained_encoder(tmp_path / "empty")
