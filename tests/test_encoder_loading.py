"""Pretrained vision towers load exactly from transformers-format folders: every tensor of the tower equal to the
checkpoint's, wherever the checkpoint stores it (a tower, a dual encoder, an InternVL model) and in whichever layout
(the one transformers renames on load), or one clear error."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    InternVLConfig,
    InternVLForConditionalGeneration,
    Siglip2Config,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    ViTConfig,
    ViTModel,
)

from tokenizer import VQRAE, EncoderConfig, get_preset
from tokenizer.encoder import load_pretrained_encoder

TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 99}
VISION = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
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


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def vision_tower(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    return model.model.vision_tower if kind == "internvl" else model.vision_model


@pytest.mark.parametrize("layer", [-1, -2])
@pytest.mark.parametrize("kind", BUILDERS)
def test_loaded_features_are_the_checkpoints_hidden_states_on_its_normalisation(tmp_path, kind, layer):
    """Each family's features = the saved model's own vision tower, run unpruned on the image normalised with the
    preprocessor's mean and std: hidden_states[feature_layer] without the prefix (CLS) tokens."""
    torch.manual_seed(0)
    saved = BUILDERS[kind]().eval()
    saved.save_pretrained(tmp_path / kind)
    (tmp_path / kind / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}))
    encoder = load_pretrained_encoder(tmp_path / kind, EncoderConfig(feature_layer=layer)).eval()
    assert (encoder.cfg.image_mean, encoder.cfg.image_std) == (CLIP_MEAN, CLIP_STD)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    normalised = ((x + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tower = vision_tower(saved, kind)
    seen = {}
    encoder.tower.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        if kind == "siglip2":  # NaFlex: (row, col, channel) patches, the grid and a mask of one entry per patch
            from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

            patches = torch.stack([convert_image_to_patches(image, 4) for image in normalised])
            hidden = tower(pixel_values=patches, spatial_shapes=torch.tensor([[4, 4]] * 2),
                           pixel_attention_mask=torch.ones(2, 16, dtype=torch.long), output_hidden_states=True)
        else:
            hidden = tower(pixel_values=normalised, output_hidden_states=True)
        features = encoder(x)
    prefix = 1 if kind in ("clip", "internvl") else 0
    assert hidden.hidden_states[layer].shape[1] == prefix + 16
    torch.testing.assert_close(features, hidden.hidden_states[layer][:, prefix:])
    if kind == "siglip2":
        assert seen["pixel_attention_mask"].shape == (2, 16) and seen["spatial_shapes"].tolist() == [[4, 4]] * 2
        assert seen["spatial_shapes"].dtype == torch.long  # as Siglip2ImageProcessor gives it


@pytest.mark.parametrize("kind", BUILDERS)
def test_the_pruned_tower_holds_only_what_the_features_use(tmp_path, kind):
    """Loading drops the layers past feature_layer, the final norm and the pooling heads: every tensor left gets a
    gradient from the features, and the encoder's state is its tower's alone (the normalisation is config)."""
    torch.manual_seed(0)
    BUILDERS[kind]().save_pretrained(tmp_path / kind)
    encoder = load_pretrained_encoder(tmp_path / kind, EncoderConfig(feature_layer=-2)).requires_grad_(True)
    encoder(torch.rand(2, 3, 16, 16) * 2 - 1).square().sum().backward()
    assert [name for name, p in encoder.tower.named_parameters() if p.grad is None] == []
    assert set(encoder.state_dict()) == {f"tower.{key}" for key in encoder.tower.state_dict()}


def test_tower_dict_is_the_architecture_with_its_sizes_explicit():
    from tokenizer.encoder import _NON_ARCH_KEYS, FAMILIES, tower_dict

    config = SiglipVisionConfig(num_hidden_layers=3, torch_dtype="bfloat16", architectures=["SiglipVisionModel"])
    tower = tower_dict(config)
    assert tower["model_type"] == "siglip_vision_model" and tower["num_hidden_layers"] == 3
    assert not set(tower) & set(_NON_ARCH_KEYS), set(tower) & set(_NON_ARCH_KEYS)
    for key in ("hidden_size", "patch_size", "image_size"):  # at transformers' defaults: written all the same
        assert tower[key] == getattr(config, key)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAMILIES["clip_vision_model"].prefix_tokens = 0


def test_the_directory_decides_the_tower_whatever_the_passed_config(tmp_path):
    torch.manual_seed(0)
    siglip().save_pretrained(tmp_path / "siglip")
    passed = EncoderConfig(tower={"model_type": "vit", "hidden_size": 8}, feature_layer=-2)  # sorts after "timm"
    encoder = load_pretrained_encoder(tmp_path / "siglip", passed)
    assert encoder.cfg.model_type == "siglip_vision_model" and encoder.cfg.feature_layer == -2


def test_a_preprocessor_without_both_statistics_leaves_the_configs(tmp_path):
    """Normalisation is read from preprocessor_config.json only when it has both image_mean and image_std."""
    torch.manual_seed(0)
    siglip().save_pretrained(tmp_path / "s")
    default = EncoderConfig(image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    for only in ({"image_mean": list(CLIP_MEAN)}, {"image_std": list(CLIP_STD)}, {}):
        (tmp_path / "s" / "preprocessor_config.json").write_text(json.dumps(only))
        encoder = load_pretrained_encoder(tmp_path / "s", default)
        assert (encoder.cfg.image_mean, encoder.cfg.image_std) == (default.image_mean, default.image_std), only


RENAMED = {"vit": lambda **kw: ViTModel(ViTConfig(**VISION, image_size=16, **kw)),
           "dinov2": lambda **kw: Dinov2Model(Dinov2Config(**VISION, image_size=16, **kw))}


@pytest.mark.parametrize("layer", [-1, -2])
@pytest.mark.parametrize("kind", RENAMED)
def test_a_tower_transformers_renames_on_load_loads_from_the_layout_it_was_saved_in(tmp_path, kind, layer):
    """save_pretrained writes ViT and DINOv2 in the original layout ("encoder.layer.0.attention.attention.query"),
    which transformers 5 renames when it loads them: the loaded tower holds every tensor of the saved model, and its
    features are the saved model's hidden states without the CLS token."""
    torch.manual_seed(0)
    saved = RENAMED[kind]().eval()
    saved.save_pretrained(tmp_path / kind)
    own = saved.state_dict()
    assert set(load_file(str(tmp_path / kind / "model.safetensors"))) != set(own)  # another layout on disk
    encoder = load_pretrained_encoder(tmp_path / kind, EncoderConfig(feature_layer=layer)).eval()
    tower = encoder.tower.state_dict()
    assert set(tower) == set(own) and all(torch.equal(value, own[key]) for key, value in tower.items())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (encoder.cfg.image_mean, encoder.cfg.image_std))
    with torch.no_grad():
        hidden = saved(pixel_values=((x + 1) / 2 - mean) / std, output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(encoder(x), hidden[:, 1:])


def test_a_tensor_transformers_would_convert_is_one_error(tmp_path):
    RENAMED["dinov2"](use_swiglu_ffn=True).save_pretrained(tmp_path / "swiglu")  # mlp.weights_in: split on load
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.mlp\.weights_in\.(weight|bias) needs .*conversion"):
        load_pretrained_encoder(tmp_path / "swiglu")
