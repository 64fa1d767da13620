"""Metrics against independent references: scikit-image PSNR/SSIM, scipy's sqrtm Frechet distance, numpy
mean/cov, pytorch-fid's own InceptionV3 class, and direct usage counts."""

import argparse
import json
import math
import multiprocessing
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from eval.metrics import (
    CodeUsage,
    FeatureStats,
    InceptionFeatureExtractor,
    build_fid_inception,
    frechet_distance,
    load_fid_stats,
    psnr,
    resize_bilinear_tf1,
    ssim,
)


def _image_pairs(height: int = 40, width: int = 33) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) originals and distorted copies in [0, 1]: noise, smooth gradients, blocks."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, height, width, generator=g, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height, dtype=torch.float64),
                            torch.linspace(0, 1, width, dtype=torch.float64), indexing="ij")
    gradient = torch.stack([xx, yy, (xx + yy) / 2])[None]
    blocks = ((torch.arange(height)[:, None] // 8 + torch.arange(width)[None] // 8) % 2).double().expand(1, 3, -1, -1)
    originals = torch.cat([noise, gradient, blocks])
    distorted = (originals + 0.1 * torch.randn(originals.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    distorted[-1] = torch.roll(originals[-1], shifts=3, dims=-1)  # a structural change, not only noise
    return originals, distorted


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_psnr_matches_skimage(data_range):
    a, b = _image_pairs()
    ours = psnr(a, b, data_range=data_range)
    assert ours.shape == (a.shape[0],)
    expected = [peak_signal_noise_ratio(_hwc(x), _hwc(y), data_range=data_range) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-5)
    assert psnr(a[0], b[0], data_range).shape == ()
    assert torch.isinf(psnr(a, a)).all()


@pytest.mark.parametrize("data_range", [1.0, 2.0])
@pytest.mark.parametrize("size", [(40, 33), (7, 9), (64, 64)])
def test_ssim_matches_skimage(data_range, size):
    a, b = _image_pairs(*size)
    ours = ssim(a, b, data_range=data_range)
    assert ours.shape == (a.shape[0],)
    expected = [structural_similarity(_hwc(x), _hwc(y), channel_axis=-1, data_range=data_range) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-5)
    float32 = ssim(a.float(), b.float(), data_range=data_range)  # float32 input is computed in float64 too
    np.testing.assert_allclose(float32.numpy(), expected, rtol=0, atol=1e-5)


def test_ssim_properties_and_errors():
    a, b = _image_pairs()
    torch.testing.assert_close(ssim(a, a), torch.ones(a.shape[0], dtype=torch.float64))
    assert (ssim(a, b, data_range=2.0) > ssim(a, b, data_range=1.0)).all()  # LlamaGen's data_range inflates SSIM
    assert ssim(a[0], b[0]).shape == ()
    with pytest.raises(ValueError, match="win_size"):
        ssim(a[..., :6, :6], b[..., :6, :6])
    for x, y in ((a, b[:1]), (a[:1], b)):
        with pytest.raises(ValueError, match="same shape|one shape"):
            ssim(x, y)
    torch.testing.assert_close(ssim(a, b), ssim(a, b, data_range=1.0), rtol=0, atol=0)  # images in [0, 1] by default
    torch.testing.assert_close(psnr(a, b), psnr(a, b, data_range=1.0), rtol=0, atol=0)
    for even in (2, 4):
        with pytest.raises(ValueError, match=f"odd .* got {even} for"):
            ssim(a, b, win_size=even)
    with pytest.raises(ValueError, match=r"got 7 for \(5, 6\)$"):  # the message names the image's (H, W)
        ssim(a[..., :5, :6], b[..., :5, :6])
    with pytest.raises(ValueError, match=r"got 7 for \(5, 9\)$"):  # one side too short is enough
        ssim(a[..., :5, :9], b[..., :5, :9])
    for odd in (3, 9):  # every odd window up to the image side is accepted, multiples of 3 included
        expected = [structural_similarity(_hwc(x), _hwc(y), channel_axis=-1, data_range=1.0, win_size=odd)
                    for x, y in zip(a, b)]
        np.testing.assert_allclose(ssim(a, b, win_size=odd).numpy(), expected, rtol=0, atol=1e-5)


def _scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance: scipy sqrtm of the product, offset retry, real part."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("dim", [1, 16, 64])
def test_frechet_distance_matches_scipy_reference(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(400, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(loc=0.3, size=(400, dim)) @ rng.normal(size=(dim, dim))
    mu1, s1 = a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))
    mu2, s2 = b.mean(0), np.atleast_2d(np.cov(b, rowvar=False))
    expected = _scipy_frechet(mu1, s1, mu2, s2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(expected, rel=1e-7, abs=1e-7)
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(ours, rel=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7 * np.trace(s1))


def test_frechet_distance_closed_form_and_singular_covariances():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(
        9.0 + 1.0)
    # fewer samples than dimensions: rank-deficient covariances stay finite and match scipy with an offset
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(ours)
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1, mu2[:3], s2)


def test_frechet_distance_refuses_every_mismatched_shape():
    rng = np.random.default_rng(0)
    d = 4
    mu, sigma = rng.normal(size=d), np.eye(d)
    wider = np.eye(d + 1)
    for args in ((mu[None], sigma, mu, sigma),  # a (1, D) mean is not a (D,) one
                 (mu, sigma, np.append(mu, 0.0), sigma),  # a longer second mean
                 (mu, wider, mu, sigma), (mu, sigma, mu, wider),  # larger covariances on either side
                 (mu, sigma[:, :3], mu, sigma), (mu, sigma, mu, sigma[:3])):
        with pytest.raises(ValueError, match="do not match"):
            frechet_distance(*args)


def test_feature_stats_match_numpy_and_merge(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(loc=0.5, size=(300, 24)).astype(np.float32)
    whole, first, second = FeatureStats(24), FeatureStats(24), FeatureStats(24)
    for chunk in np.array_split(features, 7):
        whole.update(torch.from_numpy(chunk))
    first.update(torch.from_numpy(features[:100]))
    second.update(torch.from_numpy(features[100:]))
    first.merge(second)
    expected_mu, expected_cov = features.astype(np.float64).mean(0), np.cov(features.astype(np.float64), rowvar=False)
    for stats in (whole, first):
        mu, cov = stats.mean_cov()
        assert stats.count == 300
        np.testing.assert_allclose(mu, expected_mu, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cov, expected_cov, rtol=0, atol=1e-10)
    whole.save_npz(tmp_path / "stats.npz")
    mu, sigma = load_fid_stats(tmp_path / "stats.npz")
    np.testing.assert_array_equal(sigma, whole.mean_cov()[1])
    with pytest.raises(ValueError, match=r"\(N, 24\)"):
        whole.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(3).mean_cov()
    with pytest.raises(FileNotFoundError):
        load_fid_stats(tmp_path / "missing.npz")


def test_feature_stats_errors(tmp_path):
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        stats.update(torch.zeros(3))  # 1-D
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        stats.update(torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        stats.update(torch.zeros(2, 4))  # more columns than the dimension
    stats.update(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2 features .* have 1"):  # one feature has no covariance
        stats.mean_cov()
    stats.update(torch.tensor([[1.0, 2.0, 3.0]]))
    mu, cov = stats.mean_cov()  # two features are enough
    np.testing.assert_allclose(cov, np.cov(np.array([[1.0, 1, 1], [1, 2, 3]]), rowvar=False))
    big = json.loads("300")  # an int built at run time: another object than the literal 300 below
    FeatureStats(big).update(torch.zeros(2, 300))  # a dimension past the small-integer cache
    FeatureStats(big).merge(FeatureStats(300))
    stats.all_reduce()  # not distributed: a no-op
    assert stats.count == 2
    for smaller, larger in ((3, 8), (8, 3)):
        with pytest.raises(ValueError, match="cannot merge"):
            FeatureStats(larger).merge(FeatureStats(smaller))
    for present in ("mu", "sigma"):  # a statistics file with only one of the two arrays
        np.savez(tmp_path / f"{present}.npz", **{present: np.zeros(3)})
        with pytest.raises(ValueError, match="expected arrays 'mu' and 'sigma'"):
            load_fid_stats(tmp_path / f"{present}.npz")


def _all_reduce_worker(rank: int, init_file: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stats, usage = FeatureStats(4), CodeUsage(6)
    stats.update(torch.full((rank + 1, 4), float(rank)))
    usage.update(torch.tensor([rank, rank, 5]))
    stats.all_reduce()
    usage.all_reduce()
    queue.put((rank, stats.count, stats.sum.tolist(), usage.counts.tolist()))
    torch.distributed.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for _, count, total, counts in results:
        assert count == 3 and total == [2.0] * 4  # rank 0 adds 1 row of 0s, rank 1 two rows of 1s
        assert counts == [2, 2, 0, 0, 0, 2]


def test_code_usage_matches_direct_computation():
    rng = np.random.default_rng(0)
    batches = [rng.zipf(1.5, size=(4, 16)) % 50 for _ in range(5)]
    usage, other = CodeUsage(64), CodeUsage(64)
    for i, batch in enumerate(batches):
        (usage if i < 3 else other).update(torch.from_numpy(batch))
    usage.merge(other)
    counts = np.bincount(np.concatenate([b.ravel() for b in batches]), minlength=64)
    p = counts[counts > 0] / counts.sum()
    entropy = -(p * np.log(p)).sum()
    assert usage.counts.tolist() == counts.tolist()
    assert usage.utilisation() == pytest.approx((counts > 0).mean())
    assert usage.entropy() == pytest.approx(entropy, rel=1e-12)
    assert usage.perplexity() == pytest.approx(np.exp(entropy), rel=1e-12)
    assert usage.summary()["tokens"] == counts.sum()


def test_code_usage_extremes_and_errors():
    uniform = CodeUsage(8)
    uniform.update(torch.arange(8).repeat(3))
    assert uniform.utilisation() == 1.0 and uniform.perplexity() == pytest.approx(8.0)
    single = CodeUsage(8)
    assert single.entropy() == 0.0 and single.utilisation() == 0.0
    single.update(torch.full((5,), 3))
    assert single.utilisation() == 1 / 8 and single.perplexity() == pytest.approx(1.0)
    for past in (8, 9):
        with pytest.raises(ValueError, match=r"\[0, 8\)"):
            single.update(torch.tensor([past]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        single.update(torch.tensor([-1]))
    before = single.counts.clone()
    single.update(torch.empty(0, dtype=torch.long))  # an empty batch changes nothing
    single.all_reduce()  # not distributed: a no-op
    assert torch.equal(single.counts, before) and not torch.distributed.is_initialized()
    big = json.loads("300")  # an int built at run time: another object than the literal 300 below
    CodeUsage(big).merge(CodeUsage(300))
    for smaller, larger in ((8, 16), (16, 8)):
        with pytest.raises(ValueError, match="cannot merge"):
            CodeUsage(larger).merge(CodeUsage(smaller))


def test_resize_bilinear_tf1_samples_without_half_pixel_shift():
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(resize_bilinear_tf1(x, 5), x)  # same size: identity
    up = resize_bilinear_tf1(torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]]), 4)
    # TF1 maps output i to input i * 2 / 4: rows/cols at 0, 0.5, 1, 1.5 (clamped to the last pixel)
    expected_row0 = torch.tensor([0.0, 5.0, 10.0, 10.0])
    torch.testing.assert_close(up[0, 0, 0], expected_row0)
    torch.testing.assert_close(up[0, 0, :, 0], expected_row0 * 2)
    # a longer, non-linear row: output i samples input i / 2, between its two nearest pixels
    row = torch.tensor([0.0, 1.0, 4.0, 9.0])
    wide = resize_bilinear_tf1(row.view(1, 1, 1, 4).expand(1, 1, 2, 4), 8)  # not square: each axis its own scale
    torch.testing.assert_close(wide[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 2.5, 4.0, 6.5, 9.0, 9.0]))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random state dict of the real FID Inception-v3, scaled so activations stay O(1)."""
    torch.manual_seed(0)
    net = build_fid_inception()
    state = {}
    for name, tensor in net.state_dict().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = tensor[0].numel()
            tensor = torch.randn_like(tensor) * math.sqrt(2.0 / fan_in)
        elif name.endswith(("bn.weight", "running_var")):
            tensor = torch.rand_like(tensor) + 0.5
        elif name.endswith(("bn.bias", "running_mean")) or name == "fc.bias":
            tensor = torch.randn_like(tensor) * 0.1
        state[name] = tensor
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def extractor(inception_weights):
    return InceptionFeatureExtractor.from_file(inception_weights[0], "cpu")


@pytest.fixture(scope="module")
def uint8_images():
    return torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_inception_checkpoint_layouts(tmp_path, inception_weights, extractor, uint8_images):
    """A state dict wrapped as {"state_dict": ...} loads the same; a pickle holding anything but tensors and plain
    containers is never unpickled (weights_only), even around the right tensors."""
    _, state = inception_weights
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, wrapped)
    loaded = InceptionFeatureExtractor.from_file(wrapped)
    torch.testing.assert_close(loaded(uint8_images), extractor(uint8_images), rtol=0, atol=0)
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        InceptionFeatureExtractor.from_file(pickled)


def _pytorch_fid_input(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's InceptionV3 input: x / 255, torch bilinear resize to 299 (no corner alignment), 2x - 1."""
    return torch.nn.functional.interpolate(images.float() / 255, size=(299, 299), mode="bilinear",
                                           align_corners=False) * 2 - 1


def _torch_fidelity_input(images: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's input: TensorFlow-1 bilinear resize of the 0..255 values to 299, then (x - 128) / 128."""
    return (resize_bilinear_tf1(images.float(), 299) - 128) / 128


@pytest.mark.parametrize("preprocessing, reference", [("pytorch-fid", _pytorch_fid_input),
                                                      ("torch-fidelity", _torch_fidelity_input)])
def test_inception_input_follows_each_preprocessing(inception_weights, extractor, uint8_images, preprocessing,
                                                    reference):
    """The network sees exactly the documented (B, 3, 299, 299) input, whichever way the name was built; the
    extractor is frozen."""
    name = "-".join(preprocessing.split("-"))  # a name read at run time: another object than the module's literal
    models = [InceptionFeatureExtractor.from_file(inception_weights[0], preprocessing=name)]
    models += [extractor] if preprocessing == "pytorch-fid" else []  # the default
    for model in models:
        inputs = _network_inputs(model, uint8_images)
        assert len(inputs) == 1 and inputs[0].shape == (2, 3, 299, 299)
        torch.testing.assert_close(inputs[0], reference(uint8_images), rtol=0, atol=1e-5)
        assert not any(p.requires_grad for p in model.parameters())  # frozen: no gradients, no optimizer state


def _network_inputs(model: InceptionFeatureExtractor, images: torch.Tensor) -> list[torch.Tensor]:
    inputs = []
    hook = model.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    try:
        model(images)
    finally:
        hook.remove()
    return inputs


def test_inception_features_shape_determinism_batch_invariance(extractor, uint8_images):
    features = extractor(uint8_images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert features.std() > 1e-3  # the random weights keep activations alive
    torch.testing.assert_close(extractor(uint8_images), features, rtol=0, atol=0)
    single = torch.cat([extractor(uint8_images[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(single, features, rtol=1e-4, atol=1e-5 * features.abs().max().item())


def test_inception_matches_pytorch_fid_class(inception_weights, extractor, uint8_images, monkeypatch):
    import pytorch_fid.inception

    state = inception_weights[1]
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = pytorch_fid.inception.InceptionV3([3]).eval()  # resize + normalise inside, [0, 1] input
    with torch.no_grad():
        expected = reference(uint8_images.float() / 255)[0].flatten(1)  # (B, 2048)
    ours = extractor(uint8_images)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_torch_fidelity_preprocessing_differs_slightly(inception_weights, extractor, uint8_images):
    pytorch_fid = extractor(uint8_images)
    fidelity = InceptionFeatureExtractor.from_file(inception_weights[0], preprocessing="torch-fidelity")(uint8_images)
    assert fidelity.shape == (2, 2048)
    relative = (fidelity - pytorch_fid).norm() / pytorch_fid.norm()
    assert 0 < relative < 0.2


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but such files exist
def test_inception_loading_errors(tmp_path, inception_weights, extractor):
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        InceptionFeatureExtractor.from_file(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        InceptionFeatureExtractor.from_file(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    try:
        torch.load(garbage, weights_only=True)
    except Exception as err:  # the reason named is the first line of torch's own error
        reason = str(err).splitlines()[0]
    with pytest.raises(ValueError, match=f"cannot read Inception weights .* as a state dict: {re.escape(reason)}$"):
        InceptionFeatureExtractor.from_file(garbage)
    _, state = inception_weights
    names = sorted(state)
    renamed = dict(state)
    for i, name in enumerate(names[:4]):
        renamed[f"extra.{i}"] = renamed.pop(name)
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=re.escape(f"4 missing keys {names[:3]}, 4 unexpected keys "
                                                   f"{['extra.0', 'extra.1', 'extra.2']}")):
        InceptionFeatureExtractor.from_file(tmp_path / "renamed.pth")
    scripted = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), scripted)
    with pytest.raises(ValueError, match="TorchScript archive"):
        InceptionFeatureExtractor.from_file(scripted)
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.rand(1, 3, 32, 32))
    for shape in ((1, 3, 32, 32, 1), (3, 32, 32), (3, 3, 32), (1, 4, 32, 32), (1, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"expected uint8 \(B, 3, H, W\)"):
            extractor(torch.zeros(shape, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown preprocessing"):
        InceptionFeatureExtractor(preprocessing="clean-fid")
