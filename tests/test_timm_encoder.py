"""timm vision transformers as VQRAE encoders: tiny random timm models saved to a local file and loaded back;
features equal timm's own intermediate output; save / load; a stage-1 and a stage-2 step; one-line refusals."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from common.config import ConfigError
from tokenizer import VQRAE, get_preset
from tokenizer.config import DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig
from tokenizer.encoder import load_pretrained_encoder
from tokenizer.losses import distillation_loss
from tokenizer.objective import LossConfig, generator_loss

NAME = "vit_small_patch14_reg4_dinov2"  # DINOv2 with 4 register tokens: 5 prefix tokens to drop
TOWER = {"model_type": "timm", "model_name": NAME, "hidden_size": 32, "patch_size": 7, "image_size": 28, "depth": 3,
         "num_heads": 2}


def timm_reference(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2,
                             num_classes=0).eval()


def config(feature_layer: int = -1) -> VQRAEConfig:
    return VQRAEConfig(encoder=EncoderConfig(tower=dict(TOWER), feature_layer=feature_layer),
                       quantizer=QuantizerConfig(codebook_size=64, codebook_dim=16),
                       decoder=DecoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("timm") / "dinov2-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm_reference().state_dict().items()}, str(path))
    return path


def test_a_tower_read_from_json_loads_the_same(weights):
    """A config read from a file holds its strings by value (json makes new objects, never the interned literals)."""
    tower = json.loads(json.dumps(TOWER))
    assert tower["model_type"] == "timm" and tower["model_type"] is not sys.intern("timm")
    x = torch.rand(1, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained_encoder(weights, EncoderConfig(tower=tower)).eval()(x),
                                   load_pretrained_encoder(weights, config().encoder).eval()(x))


@pytest.mark.parametrize("feature_layer", [-1, -2, -3])
def test_features_equal_timms_own_intermediates(weights, feature_layer):
    encoder = load_pretrained_encoder(weights, config(feature_layer).encoder).eval()
    reference = timm_reference()
    mean, std = reference.pretrained_cfg["mean"], reference.pretrained_cfg["std"]
    assert encoder.cfg.image_mean == tuple(mean) and encoder.cfg.image_std == tuple(std)  # timm's normalisation
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    tower_in = ((x + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = encoder(x)
        theirs = reference.forward_intermediates(tower_in, indices=[3 + feature_layer], norm=False, output_fmt="NLC",
                                                 intermediates_only=True)[0]
        by_hand = reference.norm_pre(reference._pos_embed(reference.patch_embed(tower_in)))
        for block in reference.blocks[: 3 + feature_layer + 1]:
            by_hand = block(by_hand)
    assert ours.shape == (2, 16, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, by_hand[:, reference.num_prefix_tokens :], rtol=0, atol=1e-6)
    assert len(encoder.tower.blocks) == 3 + feature_layer + 1  # the blocks after the feature layer are gone


def test_vqrae_round_trip_and_a_stage_1_and_stage_2_step(weights, tmp_path):
    model = VQRAE.from_pretrained_encoder(config(), weights)
    model.save_pretrained(tmp_path / "export")
    again = VQRAE.from_pretrained(tmp_path / "export")
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.eval().encode(x).indices, again.eval().encode(x).indices)
    assert again.config.encoder.tower == TOWER
    loss_cfg = LossConfig(lpips_weight=0.0, gan_weight=0.0)
    for stage in (1, 2):
        model.train()
        model.freeze_encoder(stage == 1)
        teacher = copy.deepcopy(model.encoder).requires_grad_(False) if stage == 2 else None
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss, parts = generator_loss(dataclasses.replace(loss_cfg, distill_weight=0.1 if stage == 2 else 0.0),
                                     model(x), x, 0, None, teacher, None, model.config.output_patch_size)
        loss.backward()
        opt.step()
        moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved == ({"quantizer", "decoder"} if stage == 1 else {"quantizer", "decoder", "encoder"})
        if stage == 2:
            assert "distill" in parts and distillation_loss(model.encoder(x), teacher(x)) > 0


def test_gradient_checkpointing_gives_the_same_gradients(weights):
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    grads = []
    for enable in (False, True):
        model = VQRAE.from_pretrained_encoder(config(), weights).train()
        model.set_gradient_checkpointing(enable)
        model.encode_features(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
    assert model.encoder.tower.grad_checkpointing
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_refusals_are_one_line(weights, tmp_path):
    cfg = config().encoder
    with pytest.raises(FileNotFoundError, match="timm weights file .* not found"):
        load_pretrained_encoder(tmp_path / "missing.safetensors", cfg)
    state = timm_reference().state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("blocks.2.")}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="does not fit .*blocks.2") as e:
        load_pretrained_encoder(tmp_path / "cut.safetensors", cfg)
    assert "\n" not in str(e.value)
    for name in ("", 5):
        with pytest.raises(ConfigError, match="needs a 'model_name'"):
            VQRAE(dataclasses.replace(config(), encoder=EncoderConfig(tower={**TOWER, "model_name": name})))
    with pytest.raises(ConfigError, match="timm has no model"):
        VQRAE(dataclasses.replace(config(), encoder=EncoderConfig(tower={**TOWER, "model_name": "vit_nothing"})))
    with pytest.raises(ConfigError, match="feature_layer must be in \\[-3, -1\\]"):
        VQRAE(config(feature_layer=-4))
    from tokenizer.encoder import VisionEncoder

    for layer in (-4, 0):  # the encoder's own check, for a config not validated as a whole
        with pytest.raises(ConfigError, match="feature_layer must be in \\[-3, -1\\]"):
            VisionEncoder(EncoderConfig(tower=dict(TOWER), feature_layer=layer))
    from llm.understanding import vision_tower

    with pytest.raises(ConfigError, match="timm tower .* no transformers vision-model class"):
        vision_tower(VQRAE(config()))


def test_timm_presets_describe_their_models():
    for name, model_name in (("timm-dinov2-b14-224", "vit_base_patch14_dinov2"),
                             ("timm-internvit-300m-p14-448", "vit_intern300m_patch14_448")):
        cfg = get_preset(name)
        assert cfg.encoder.tower["model_name"] == model_name and timm.is_model(model_name)
        reference = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=cfg.encoder.image_size,
                                      device="meta")
        assert reference.embed_dim == cfg.encoder.hidden_size and len(reference.blocks) == cfg.decoder.num_hidden_layers
        assert reference.patch_embed.patch_size[0] == cfg.encoder.patch_size
