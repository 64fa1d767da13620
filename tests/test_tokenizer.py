"""Invariants of the VQRAE tokenizer model: presets, quantizer, encoder towers, decoder, persistence, errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from common.config import ConfigError, apply_overrides, from_dict, to_dict
from tokenizer import PRESETS, VQRAE, EncoderConfig, VQRAEConfig, get_preset
from tokenizer.decoder import sincos_2d
from tokenizer.encoder import VisionEncoder
from tokenizer.quantizer import SimVQ, nearest_code, nearest_code_full, perplexity


def tiny_model(seed: int = 0, **encoder_overrides) -> VQRAE:
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    if encoder_overrides:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **encoder_overrides))
    return VQRAE(cfg)


def images(b: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----- presets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = VQRAE(cfg)
        x = torch.empty(1, 3, cfg.encoder.image_size, cfg.encoder.image_size)
        feats = model.encoder(x)
        q = model.quantizer.in_proj(feats)
        out = model.decoder(q)
    assert feats.shape == (1, cfg.num_tokens, cfg.encoder.hidden_size)
    assert model.quantizer.codebook.shape == (cfg.quantizer.codebook_size, cfg.quantizer.codebook_dim)
    assert model.quantizer.codebook_proj.weight.shape == (cfg.quantizer.codebook_dim,) * 2
    assert out.shape == x.shape
    assert from_dict(VQRAEConfig, to_dict(cfg)) == cfg


def test_published_preset_shapes():
    so400m = get_preset("siglip2-so400m-p16-256")
    assert (so400m.encoder.hidden_size, so400m.encoder.patch_size, so400m.encoder.image_size) == (1152, 16, 256)
    assert so400m.encoder.tower["num_hidden_layers"] == 27 and so400m.encoder.tower["intermediate_size"] == 4304
    assert (so400m.quantizer.codebook_size, so400m.quantizer.codebook_dim) == (16384, 1536)
    intern = get_preset("internvit-300m-p14-448")
    assert (intern.encoder.hidden_size, intern.encoder.patch_size, intern.encoder.image_size) == (1024, 14, 448)
    assert intern.num_tokens == 32 * 32


# ----- quantizer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget_mb", [0, 1, 64])
def test_chunked_search_equals_full_search(budget_mb):
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(700, 48, generator=gen)
    z = torch.randn(1000, 48, generator=gen)
    chunked = nearest_code(z, codebook, budget_mb=budget_mb)  # budget 0 -> one row per block
    assert torch.equal(chunked, nearest_code_full(z, codebook))
    # an independent computation: the true nearest neighbour by pairwise distances
    assert torch.equal(chunked, torch.cdist(z.double(), codebook.double()).argmin(1))


@pytest.mark.parametrize("budget_mb, rows", [(0, 1), (1, 131), (2, 262), (64, 1000)])
def test_search_blocks_fill_the_memory_budget(monkeypatch, budget_mb, rows):
    """Each (rows, K) fp32 score block is the largest that fits `budget_mb` (at least one row, at most all)."""
    import tokenizer.quantizer as quantizer

    blocks = []
    real = quantizer.code_scores
    monkeypatch.setattr(quantizer, "code_scores", lambda z, *a: blocks.append(z.shape[0]) or real(z, *a))
    gen = torch.Generator().manual_seed(0)
    codebook, z = torch.randn(2000, 8, generator=gen), torch.randn(1000, 8, generator=gen)
    expected = nearest_code_full(z, codebook)
    blocks.clear()
    assert torch.equal(quantizer.nearest_code(z, codebook, budget_mb=budget_mb), expected)
    assert rows == min(1000, max(1, (budget_mb << 20) // (4 * 2000)))  # the budget's arithmetic, by hand
    assert blocks[:-1] == [rows] * (len(blocks) - 1) and 0 < blocks[-1] <= rows and sum(blocks) == 1000


def test_search_finds_exact_codes():
    codebook = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    idx = torch.randint(0, 300, (500,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(nearest_code(codebook[idx] + 1e-4, codebook, budget_mb=0), idx)


def test_quantizer_eval_quantized_equals_lookup():
    model = tiny_model().eval()
    with torch.no_grad():
        enc = model.encode(images())
    assert torch.equal(enc.quantized, model.quantizer.decode_codes(enc.indices))
    assert enc.indices.dtype == torch.int64 and enc.indices.shape == (2, 64)


def test_straight_through_and_loss_formula():
    torch.manual_seed(0)
    q = SimVQ(get_preset("tiny").quantizer, in_dim=32)
    feats = torch.randn(2, 10, 32, requires_grad=True)
    out = q(feats)
    z = q.in_proj(feats)
    z_q = q.decode_codes(out.indices)
    assert torch.equal(out.quantized, z_q)  # forward value is exactly the code vector
    expected = 0.25 * ((z - z_q) ** 2).mean() + ((z_q - z) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    # straight-through: d(sum(g * quantized)) / dz = g, so in_proj sees the decoder's gradient
    g = torch.randn_like(out.quantized)
    grad_feats = torch.autograd.grad((out.quantized * g).sum(), feats, retain_graph=True)[0]
    torch.testing.assert_close(grad_feats, g @ q.in_proj.weight)
    # the codebook term trains W (the frozen C gets nothing), the commitment term trains in_proj
    out.loss.backward()
    assert q.codebook_proj.weight.grad.abs().sum() > 0
    assert q.codebook.grad is None and not q.codebook.requires_grad


def random_w_quantizer(seed: int = 0, in_dim: int = 32) -> SimVQ:
    """A SimVQ whose W is far from its identity initialisation, where C W and C differ."""
    torch.manual_seed(seed)
    q = SimVQ(get_preset("tiny").quantizer, in_dim=in_dim)
    with torch.no_grad():
        q.codebook_proj.weight.copy_(torch.randn(128, 128) * 128**-0.5)
    return q


def test_codes_are_rows_of_c_w_never_of_the_frozen_c():
    q = random_w_quantizer()
    cw = q.codebook @ q.codebook_proj.weight.T  # (K, D): the effective codebook, computed independently
    assert not torch.allclose(cw, q.codebook, atol=1e-2)
    feats = torch.randn(3, 20, 32)
    out = q(feats)
    z = q.in_proj(feats).detach().flatten(0, 1)
    assert torch.equal(out.indices.flatten(), torch.cdist(z.double(), cw.double()).argmin(1))  # searched in C W
    torch.testing.assert_close(out.quantized, cw[out.indices])  # the forward's vectors
    torch.testing.assert_close(q.decode_codes(out.indices), cw[out.indices])  # decoding


def test_vq_loss_terms_reach_their_parameters_with_their_weights():
    """beta * ||sg(z_q) - z||^2 trains the encoder side (in_proj) at weight beta; ||z_q - sg(z)||^2 trains W at
    weight 1: the forward value alone cannot tell the two terms apart."""
    q = random_w_quantizer(seed=1)
    beta = q.cfg.beta
    assert beta != 1.0
    feats = torch.randn(2, 30, 32)
    out = q(feats)
    got_in, got_w = torch.autograd.grad(out.loss, [q.in_proj.weight, q.codebook_proj.weight])
    z = q.in_proj(feats)
    z_q = F.embedding(out.indices, q.codebook @ q.codebook_proj.weight.T)
    want_in = torch.autograd.grad(beta * ((z - z_q.detach()) ** 2).mean(), q.in_proj.weight)[0]
    want_w = torch.autograd.grad(((z_q - z.detach()) ** 2).mean(), q.codebook_proj.weight)[0]
    torch.testing.assert_close(got_in, want_in)
    torch.testing.assert_close(got_w, want_w)
    assert want_in.abs().sum() > 0 and want_w.abs().sum() > 0


def test_quantizer_codebook_is_drawn_at_scale_d_to_the_minus_half():
    """C ~ N(0, 1/D): its rows have squared norm about 1 whatever D is."""
    for d in (16, 256):
        torch.manual_seed(0)
        q = SimVQ(dataclasses.replace(get_preset("tiny").quantizer, codebook_size=4096, codebook_dim=d), in_dim=8)
        assert q.codebook.std().item() == pytest.approx(d**-0.5, rel=0.02)
        assert q.codebook.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=0.02)


def test_decode_codes_accepts_exactly_the_codebook_range():
    q = SimVQ(get_preset("tiny").quantizer, in_dim=8)
    k = q.codebook_size
    assert q.decode_codes(torch.tensor([0, k - 1])).shape == (2, 128)
    assert q.decode_codes(torch.tensor([], dtype=torch.long)).shape == (0, 128)
    for bad in (-1, k, k + 1):
        with pytest.raises(ValueError, match="out of range"):
            q.decode_codes(torch.tensor([0, bad]))


def test_usage_metrics_match_direct_computation():
    q = SimVQ(get_preset("tiny").quantizer, in_dim=64)
    out1, out2 = q(torch.randn(4, 64, 64)), q(torch.randn(4, 64, 64))
    for out in (out1, out2):
        counts = torch.bincount(out.indices.flatten(), minlength=512).double()
        p = counts[counts > 0] / counts.sum()
        assert out.metrics["code_usage"].item() == pytest.approx(len(p) / 512)
        assert out.metrics["code_perplexity"].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-5)
    both = torch.cat([out1.indices.flatten(), out2.indices.flatten()])
    assert q.usage()["utilisation"] == pytest.approx(both.unique().numel() / 512)
    q.reset_usage()
    assert q.usage() == {"utilisation": 0.0, "perplexity": 1.0}
    assert perplexity(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([0, 1, 0])).item() == 1.0 and perplexity(torch.zeros(3)).item() == 1.0


# ----- model --------------------------------------------------------------------------------------------------


def test_forward_backward_finite_and_gradients_reach_encoder_side():
    model = tiny_model()
    x = images()
    out = model(x)
    assert out.reconstruction.shape == x.shape
    loss = F.mse_loss(out.reconstruction, x) + out.vq_loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the reconstruction loss alone reaches the projection before the quantizer through the STE
    model.zero_grad()
    F.mse_loss(model(x).reconstruction, x).backward()
    assert model.quantizer.in_proj.weight.grad.abs().sum() > 0
    assert model.encoder.tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_decode_matches_forward_in_eval():
    model = tiny_model().eval()
    x = images()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.decode(out.indices), out.reconstruction)
        assert torch.equal(model.decode(out.indices.view(2, 8, 8)), out.reconstruction)


def test_gradient_checkpointing_gives_same_gradients():
    x = images()
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=5)
        model.encoder.tower.embeddings.requires_grad_(False)  # the first layer's input then needs no gradient
        if ckpt:
            model.set_gradient_checkpointing()  # on by default
            flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
            assert flags and all(flags)
        F.mse_loss(model(x).reconstruction, x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_forward_traces_as_one_graph():
    # torch.compile sees the whole training forward (quantizer metrics included) without a graph break
    model = tiny_model()
    explanation = torch._dynamo.explain(model)(images())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_save_load_round_trip(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    record = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert record == {"model_type": "vqrae", "format_version": 2, **to_dict(model.config)}
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary left behind
    loaded = VQRAE.from_pretrained(tmp_path / "tok").eval()
    assert loaded.config == model.config
    x = images()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.indices, b.indices)
    model.save_pretrained(tmp_path / "tok")  # overwriting an export is atomic too
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]
    wide = VQRAE.from_pretrained(pretrained=tmp_path / "tok", device="cpu", dtype=torch.float64)  # all by keyword
    assert all(v.dtype == torch.float64 for v in wide.state_dict().values() if v.is_floating_point())
    with pytest.raises(TypeError):  # the Hub options are keyword-only
        VQRAE.from_pretrained(tmp_path / "tok", "cpu", None, "main")


@pytest.mark.parametrize("layer", [-1, -2])
def test_features_are_the_hidden_states_llava_reads(layer):
    """feature_layer k = transformers' hidden_states[k] of the unpruned tower: never its final norm."""
    torch.manual_seed(2)
    tower = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in get_preset("tiny").encoder.tower.items()
                                                    if k != "model_type"})).eval()
    model = tiny_model(seed=2, feature_layer=layer)
    assert len(model.encoder.tower.encoder.layers) == 2 + layer + 1
    assert isinstance(model.encoder.tower.post_layernorm, torch.nn.Identity)
    model.encoder.tower.load_state_dict(tower.state_dict(), strict=False)
    x = images()
    with torch.no_grad():
        out = tower(pixel_values=x * model.encoder.scale + model.encoder.shift, output_hidden_states=True)
        torch.testing.assert_close(model.encode_features(x), out.hidden_states[layer])
        assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)  # the norm would have mattered


@pytest.mark.parametrize("model_type", ["dinov2", "dinov2_with_registers", "vit"])
@pytest.mark.parametrize("layer", [-1, -2])
def test_generic_tower_features_are_its_hidden_states(model_type, layer):
    """A tower with no family entry (here HF DINOv2, with and without registers, and ViT) is read through
    output_hidden_states: features = hidden_states[feature_layer] with the prefix tokens (CLS, registers) removed."""
    from transformers import AutoConfig, AutoModel

    tower = {"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
             "intermediate_size": 64, "patch_size": 8, "image_size": 32}
    cfg = dataclasses.replace(get_preset("tiny").encoder, tower=tower, feature_layer=layer)
    torch.manual_seed(3)
    encoder = VisionEncoder(cfg).eval()
    reference = AutoModel.from_config(AutoConfig.for_model(**tower)).eval()
    reference.load_state_dict(encoder.tower.state_dict())
    x = images(size=32)
    with torch.no_grad():
        hidden = reference(pixel_values=x * encoder.scale + encoder.shift, output_hidden_states=True).hidden_states
        feats = encoder(x)
    prefix = 1 + (4 if model_type == "dinov2_with_registers" else 0)  # CLS (+ 4 registers by default)
    assert hidden[layer].shape[1] == prefix + 16
    torch.testing.assert_close(feats, hidden[layer][:, prefix:])
    assert not torch.allclose(hidden[-1], hidden[-2])  # the layer chosen matters


def test_an_unknown_tower_model_type_is_one_config_error():
    tower = {"model_type": "no_such_tower", "hidden_size": 32, "patch_size": 8, "image_size": 32}
    with pytest.raises(ConfigError, match="encoder.tower: unknown transformers model_type 'no_such_tower'"):
        VisionEncoder(dataclasses.replace(get_preset("tiny").encoder, tower=tower))


def test_generic_tower_reads_a_non_square_grid():
    """N = (H / p) * (W / p) patch tokens for a tower that takes any image size (here DINOv2 on 32 x 48)."""
    from transformers import AutoConfig, AutoModel

    tower = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "patch_size": 8, "image_size": 32}
    torch.manual_seed(3)
    encoder = VisionEncoder(dataclasses.replace(get_preset("tiny").encoder, tower=tower, feature_layer=-1)).eval()
    reference = AutoModel.from_config(AutoConfig.for_model(**tower)).eval()
    reference.load_state_dict(encoder.tower.state_dict())
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        hidden = reference(pixel_values=x * encoder.scale + encoder.shift, output_hidden_states=True).hidden_states
        torch.testing.assert_close(encoder(x), hidden[-1][:, 1:])  # 1 CLS + 4 x 6 patches
    assert hidden[-1].shape[1] == 1 + 24


def test_old_format_exports_are_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path / "tok")
    path = tmp_path / "tok" / "config.json"
    record = json.loads(path.read_text())
    del record["format_version"]
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="format version 1, this code reads 2"):
        VQRAE.from_pretrained(tmp_path / "tok")
    path.write_text(json.dumps({**record, "format_version": 3}))  # a newer format is refused as well
    with pytest.raises(ConfigError, match="format version 3, this code reads 2"):
        VQRAE.from_pretrained(tmp_path / "tok")


def test_encoder_normalisation_follows_config():
    enc = VisionEncoder(dataclasses.replace(get_preset("tiny").encoder, image_mean=(0.485, 0.456, 0.406),
                                            image_std=(0.229, 0.224, 0.225)))
    x = images()
    expected = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.tower(pixel_values=expected).last_hidden_state)


def _tiny_siglip_config() -> SiglipConfig:
    tiny = get_preset("tiny").encoder.tower
    vision = {k: v for k, v in tiny.items() if k != "model_type"}
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 99}
    return SiglipConfig(vision_config=vision, text_config=text)


@pytest.mark.parametrize("kind", ["dual", "vision"])
def test_load_pretrained_encoder_from_local_directory(tmp_path, kind):
    torch.manual_seed(0)
    dual = SiglipModel(_tiny_siglip_config())
    reference = SiglipVisionModel(dual.config.vision_config)
    reference.load_state_dict({k.removeprefix("vision_model."): v for k, v in dual.state_dict().items()
                               if k.startswith("vision_model.")}, strict=False)
    (dual if kind == "dual" else reference).save_pretrained(tmp_path / "siglip")
    (tmp_path / "siglip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    model = VQRAE.from_pretrained_encoder(get_preset("tiny"), tmp_path / "siglip")
    x = images()
    with torch.no_grad():
        expected = reference.eval()(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.encode_features(x), expected)
    # the exported tokenizer no longer needs the encoder directory
    model.save_pretrained(tmp_path / "tok")
    with torch.no_grad():
        torch.testing.assert_close(VQRAE.from_pretrained(tmp_path / "tok").encode_features(x), model.encode_features(x))


def test_siglip2_naflex_tower_patch_order():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    tower = {"model_type": "siglip2_vision_model", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "patch_size": 8, "num_patches": 64, "vision_use_head": False}
    enc = VisionEncoder(EncoderConfig(tower=tower))
    assert EncoderConfig(tower=tower).image_size == 64
    x = images()
    patches = torch.stack([convert_image_to_patches(img, 8) for img in x])  # the processor's own patch order
    with torch.no_grad():
        ref = enc.tower(pixel_values=patches, spatial_shapes=torch.tensor([[8, 8]] * 2),
                        pixel_attention_mask=torch.ones(2, 64, dtype=torch.long)).last_hidden_state
        torch.testing.assert_close(enc(x), ref)


def test_internvit_tower_drops_cls_token():
    cfg = get_preset("internvit-300m-p14-448")
    small = dict(cfg.encoder.tower, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 image_size=56)
    enc = VisionEncoder(dataclasses.replace(cfg.encoder, tower=small))
    with torch.no_grad():
        out = enc(images(size=56))
        full = enc.tower(pixel_values=(images(size=56) * enc.scale + enc.shift)).last_hidden_state
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, full[:, 1:])


# ----- errors -------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tmp_path):
    model = tiny_model().eval()
    for channels in (1, 4):
        with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
            model.encode(torch.zeros(1, channels, 64, 64))
    with pytest.raises(ValueError, match="not divisible by the encoder patch size 8"):
        model.encode(torch.zeros(1, 3, 60, 64))
    for size in (32, 128):
        with pytest.raises(ValueError, match="does not match the model's 64x64"):
            model.encode(torch.zeros(1, 3, size, size))
    for shape in ((3, 64, 64), (1, 1, 3, 64, 64)):
        with pytest.raises(ValueError, match="\\(B, 3, H, W\\) tensor, got \\("):
            model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="\\(B, 3, H, W\\) tensor, got <class 'list'>"):
        model.encode([[0.0]])
    with pytest.raises(ValueError, match="out of range"):
        model.decode(torch.full((1, 64), 512))
    with pytest.raises(ValueError, match="out of range"):
        model.decode(torch.full((1, 64), -1))
    for shape in ((1, 63), (1, 65), (64,), (1, 1, 8, 8), (1, 64, 1, 1)):
        with pytest.raises(ValueError, match="must have shape \\(B, 64\\)"):
            model.decode(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model.decode(torch.zeros(1, 64))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="unknown config key 'quantizer.codebook_sz'"):
        from_dict(VQRAEConfig, {"quantizer": {"codebook_sz": 3}, "encoder": to_dict(get_preset("tiny").encoder)})
    with pytest.raises(ConfigError, match="unknown config key 'decoder.depth'"):
        apply_overrides(get_preset("tiny"), ["decoder.depth=3"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(get_preset("tiny"), ["quantizer.codebook_size=big"])
    with pytest.raises(FileNotFoundError, match="not a VQRAE directory"):
        VQRAE.from_pretrained(tmp_path / "missing")
    model.save_pretrained(tmp_path / "other")
    record = json.loads((tmp_path / "other" / "config.json").read_text())
    for model_type in ("llava", "whisper", None):  # names sorting before and after "vqrae", and none
        (tmp_path / "other" / "config.json").write_text(json.dumps({**record, "model_type": model_type}))
        with pytest.raises(ConfigError, match="not a VQRAE config"):
            VQRAE.from_pretrained(tmp_path / "other")
    record["quantizer"]["codebook_size"] = 256  # weights of a 512-code model under a 256-code config
    (tmp_path / "other" / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="cannot load the VQRAE weights of .*size mismatch"):
        VQRAE.from_pretrained(tmp_path / "other")
    model.save_pretrained(tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "decoder.head.bias"}, tmp_path / "partial" / "model.safetensors")
    with pytest.raises(ValueError, match="cannot load the VQRAE weights of .*Missing key.*decoder.head.bias"):
        VQRAE.from_pretrained(tmp_path / "partial")
    (tmp_path / "partial" / "model.safetensors").unlink()  # a config alone is no VQRAE folder
    with pytest.raises(FileNotFoundError, match="not a VQRAE directory"):
        VQRAE.from_pretrained(tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="encoder weights directory"):
        VQRAE.from_pretrained_encoder(get_preset("tiny"), tmp_path / "missing")
    assert apply_overrides(get_preset("tiny"), ["quantizer.beta=0.5"]).quantizer.beta == 0.5


# ----- CUDA (skipped without a GPU) --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_search_and_bf16_forward_agree_with_cpu():
    gen = torch.Generator().manual_seed(0)
    codebook, z = torch.randn(4096, 256, generator=gen), torch.randn(3000, 256, generator=gen)
    expected = torch.cdist(z.double(), codebook.double()).argmin(1)
    assert torch.equal(nearest_code(z.cuda(), codebook.cuda(), budget_mb=1).cpu(), expected)
    model = tiny_model().eval()
    x = images(4)
    with torch.no_grad():
        reference = model(x)
        gpu = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.cuda())
    model.cpu()
    assert torch.isfinite(out.reconstruction).all()
    # bf16 moves a few tokens across Voronoi boundaries, not most of them
    assert (out.indices.cpu() == reference.indices).float().mean() > 0.9
    torch.testing.assert_close(out.features.float().cpu(), reference.features, atol=0.1, rtol=0.1)


# ----- precision, attention kernels, frozen encoder ---------------------------------------------------------


def test_nearest_code_stays_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    codebook, z = torch.randn(2048, 512, generator=gen) * 512**-0.5, torch.randn(1024, 512, generator=gen) * 0.05
    expected = nearest_code_full(z, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        downcast = torch.addmm(codebook.pow(2).sum(1), z, codebook.t(), alpha=-2.0).argmin(1)
        searched = nearest_code(z, codebook, budget_mb=1)
    assert (downcast != expected).any()  # autocast really would change indices here
    assert torch.equal(searched, expected)
    quantizer = SimVQ(get_preset("tiny").quantizer, in_dim=512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert quantizer.effective_codebook().dtype == torch.float32


def test_auto_attention_never_picks_flash_for_fp32_weights(monkeypatch):
    from tokenizer import encoder

    monkeypatch.setattr(encoder, "flash_attention_available", lambda: True)
    assert encoder.resolve_attn_implementation("auto", torch.float32) == "sdpa"
    assert encoder.resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert encoder.resolve_attn_implementation("eager", torch.bfloat16) == "eager"
    model = VQRAE(get_preset("tiny"))
    tower, layers = model.encoder.tower.config, model.decoder.layers.config
    assert tower._attn_implementation == layers._attn_implementation == "sdpa"
    model.to(torch.bfloat16)  # DeepSpeed's bf16 conversion goes through the same _apply
    assert tower._attn_implementation == layers._attn_implementation == "flash_attention_2"
    model.float()
    assert tower._attn_implementation == layers._attn_implementation == "sdpa"


@pytest.mark.parametrize("installed", [True, False])
def test_flash_attention_needs_the_package_and_a_gpu(monkeypatch, installed):
    from tokenizer import encoder

    find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args):
        if name == "flash_attn":
            return object() if installed else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert encoder.flash_attention_available() is installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert encoder.flash_attention_available() is False


def test_frozen_encoder_stays_in_eval_mode():
    model = tiny_model()
    assert model.train().encoder.training  # a new model's encoder is not frozen
    model.freeze_encoder()
    model.train()
    assert not model.encoder.training and not any(m.training for m in model.encoder.modules())
    assert model.decoder.training and model.quantizer.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.freeze_encoder(False)
    assert model.encoder.training and all(p.requires_grad for p in model.encoder.parameters())


# ----- Hugging Face Hub -------------------------------------------------------------------------------------


def test_hub_id_loads_from_the_hub_cache(tmp_path, monkeypatch):
    model = tiny_model().eval()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-vqrae"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = VQRAE.from_pretrained("someone/tiny-vqrae", cache_dir=tmp_path / "cache", local_files_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    for name in ("someone/other", "no-owner"):  # a name that is no folder is a Hub id, with or without an owner
        with pytest.raises(FileNotFoundError, match="neither a local VQRAE directory nor a reachable Hub repository "
                                                    "\\(\\w+: \\w"):  # the cause's type and its first line
            VQRAE.from_pretrained(name, cache_dir=tmp_path / "cache", local_files_only=True)
    for name in ("./missing-vqrae", "~/missing-vqrae", "a/b/c"):  # path-like: a missing folder, never a Hub id
        with pytest.raises(FileNotFoundError, match="not a VQRAE directory \\(no such folder\\)"):
            VQRAE.from_pretrained(name, cache_dir=tmp_path / "cache", local_files_only=True)


def test_push_to_hub_uploads_the_vqrae_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'someone/' + repo_id}")  # as the Hub

    def upload_folder(self, repo_id, folder_path, **kwargs):
        uploaded.update(repo=repo_id, files=sorted(p.name for p in Path(folder_path).iterdir()),
                        config=json.loads((Path(folder_path) / "config.json").read_text()))
        return "https://huggingface.co/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = tiny_model()
    model.push_to_hub("someone/tiny-vqrae")
    assert uploaded["repo"] == "someone/tiny-vqrae"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"] == {"model_type": "vqrae", "format_version": 2, **to_dict(model.config)}
    model.save_pretrained(tmp_path / "my-vqrae", push_to_hub=True)  # no repo_id: the folder's name, in the user's
    assert uploaded["repo"] == "someone/my-vqrae"
    assert uploaded["files"] == sorted(p.name for p in (tmp_path / "my-vqrae").iterdir())


def test_decoder_positions_start_as_the_2d_sincos_table_of_rows_then_columns():
    """Token (y, x) of a g x g grid starts at [sin(y w), cos(y w), sin(x w), cos(x w)], w_i = 10000^(-i / (d/4))."""
    g, d = 5, 16
    table = sincos_2d(g, d)
    w = [10000 ** (-i / (d // 4)) for i in range(d // 4)]
    for y, x in ((0, 0), (1, 3), (4, 2)):
        expected = ([math.sin(y * f) for f in w] + [math.cos(y * f) for f in w] + [math.sin(x * f) for f in w]
                    + [math.cos(x * f) for f in w])
        assert torch.allclose(table[y * g + x], torch.tensor(expected), atol=1e-6)
    model = VQRAE(get_preset("tiny"))
    assert torch.equal(model.decoder.pos_embed.table[0], sincos_2d(model.config.grid_size, model.config.decoder.hidden_size))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 6)
