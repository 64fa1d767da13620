"""VQRAE: a pretrained vision encoder whose continuous features serve understanding, a high-dimensional SimVQ
codebook that turns them into discrete codes for generation, and a symmetric ViT decoder back to pixels.

    model = VQRAE(get_preset("tiny"))
    enc = model.encode(images)            # images (B, 3, H, W) in [-1, 1]
    enc.features                          # (B, N, C) continuous, for understanding
    enc.indices                           # (B, N) int64 codes, for generation
    images = model.decode(enc.indices)    # (B, 3, H, W) in [-1, 1]
    model.save_pretrained("out/tok"); VQRAE.from_pretrained("out/tok")   # a local folder, or a Hub id online
    model.push_to_hub("me/my-vqrae")                                      # huggingface_hub's ModelHubMixin
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn

from common.config import ConfigError, from_dict, to_dict
from common.files import atomic_directory
from tokenizer.config import VQRAEConfig
from tokenizer.decoder import ViTDecoder
from tokenizer.encoder import VisionEncoder, load_pretrained_encoder, set_gradient_checkpointing
from tokenizer.quantizer import SimVQ

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: features are hidden states without the tower's final norm (1 applied it at feature_layer -1)


@dataclass
class VQRAEEncoding:
    """Args: features (B, N, C) continuous encoder features; indices (B, N) int64 codes; quantized (B, N, D)."""

    features: torch.Tensor
    indices: torch.Tensor
    quantized: torch.Tensor


@dataclass
class VQRAEOutput:
    """Args: reconstruction (B, 3, H, W); features (B, N, C); indices (B, N); vq_loss scalar (beta * commitment +
    codebook); metrics: detached scalars (commitment, codebook, code_usage, code_perplexity); decoder_states
    (B, N, d): the decoder's normalised states fed to its pixel head (for the adaptive GAN weight)."""

    reconstruction: torch.Tensor
    features: torch.Tensor
    indices: torch.Tensor
    vq_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    decoder_states: torch.Tensor


class VQRAE(nn.Module, PyTorchModelHubMixin, library_name="vqrae", tags=["image-tokenizer", "vector-quantization"],
            paper_url="https://arxiv.org/abs/2511.23386"):
    """The unified tokenizer. Pixel range of inputs and outputs: [-1, 1].

    On disk (and on the Hub): config.json ({"model_type": "vqrae", "format_version", encoder, quantizer, decoder})
    + model.safetensors.
    """

    def __init__(self, config: VQRAEConfig, encoder: VisionEncoder | None = None):
        super().__init__()
        self.config = config
        self.encoder_frozen = False
        self.encoder = encoder if encoder is not None else VisionEncoder(config.encoder)
        self.quantizer = SimVQ(config.quantizer, in_dim=config.encoder.hidden_size)
        self.decoder = ViTDecoder(
            config.decoder, in_dim=config.quantizer.codebook_dim, grid=config.grid_size,
            patch_size=config.output_patch_size, attn_implementation=config.encoder.attn_implementation,
        )

    # ----- encoding / decoding -----------------------------------------------------------------------------

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Continuous features for understanding, (B, N, C); never quantized."""
        self._check_pixels(pixel_values)
        return self.encoder(pixel_values)

    def encode(self, pixel_values: torch.Tensor) -> VQRAEEncoding:
        """Images (B, 3, H, W) in [-1, 1] -> features, code indices and quantized vectors."""
        features = self.encode_features(pixel_values)
        q = self.quantizer(features)
        return VQRAEEncoding(features=features, indices=q.indices, quantized=q.quantized)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, N) or (B, h, w) -> images (B, 3, H, W) in [-1, 1] (unclamped)."""
        if indices.dim() == 3:
            indices = indices.flatten(1)
        if indices.dim() != 2 or indices.shape[1] != self.config.num_tokens:
            raise ValueError(
                f"code indices must have shape (B, {self.config.num_tokens}) or (B, {self.config.grid_size}, "
                f"{self.config.grid_size}), got {tuple(indices.shape)}"
            )
        return self.decode_quantized(self.quantizer.decode_codes(indices))

    def decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized vectors (B, N, D) -> images (B, 3, H, W)."""
        return self.decoder(quantized.to(self.decoder.embed.weight.dtype))

    def forward(self, pixel_values: torch.Tensor) -> VQRAEOutput:
        """Encode, quantize and reconstruct. The losses that need the images (L2, LPIPS, GAN) live in the trainer."""
        features = self.encode_features(pixel_values)
        q = self.quantizer(features)
        states = self.decoder.forward_features(q.quantized.to(self.decoder.embed.weight.dtype))
        reconstruction = self.decoder.forward_head(states)
        return VQRAEOutput(reconstruction, features, q.indices, q.loss, q.metrics, states)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (B, 3, H, W) tensor, got {shape}")
        _, c, h, w = pixel_values.shape
        if c != 3:
            raise ValueError(f"pixel_values must have 3 (RGB) channels, got {c}")
        p, size = self.config.encoder.patch_size, self.config.encoder.image_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the encoder patch size {p}")
        if (h, w) != (size, size):
            raise ValueError(f"image size {h}x{w} does not match the model's {size}x{size}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point in [-1, 1], got dtype {pixel_values.dtype}")

    # ----- training helpers --------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every transformer layer (encoder and decoder)."""
        set_gradient_checkpointing(self, enable)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stage 1: the encoder's parameters take no gradient and it stays in eval mode whatever `train()` says."""
        self.encoder_frozen = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> VQRAE:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    # ----- persistence -------------------------------------------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        """The files of a VQRAE folder (the hook `save_pretrained` and `push_to_hub` call)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        record = {"model_type": "vqrae", "format_version": FORMAT_VERSION, **to_dict(self.config)}
        (save_directory / CONFIG_NAME).write_text(json.dumps(record, indent=2))
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})

    def save_pretrained(self, save_directory: str | Path, **hub_kwargs) -> str | None:
        """Write config.json + model.safetensors (+ a model card) to `save_directory`, atomically, in the weights'
        dtype. `push_to_hub=True, repo_id=...` and the other huggingface_hub options work as for any ModelHubMixin."""
        push, repo_id = hub_kwargs.pop("push_to_hub", False), hub_kwargs.pop("repo_id", None)
        local = {k: hub_kwargs.pop(k) for k in ("config", "model_card_kwargs") if k in hub_kwargs}
        with atomic_directory(save_directory) as tmp:
            super().save_pretrained(tmp, **local)
        if push:
            return self.push_to_hub(repo_id or Path(save_directory).name, **local, **hub_kwargs)
        return None

    @classmethod
    def from_pretrained(
        cls, pretrained: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
        revision: str | None = None, cache_dir: str | Path | None = None, token: str | bool | None = None,
        local_files_only: bool = False, force_download: bool = False,
    ) -> VQRAE:
        """Load a VQRAE folder written by `save_pretrained` (or the tokenizer export), or a Hub repository id.

        Args:
            pretrained: a local directory, or "owner/name" on the Hugging Face Hub (downloaded to its cache).
            device, dtype: where and in which dtype to put the model (dtype None: as stored).
            revision, cache_dir, token, local_files_only, force_download: as for `huggingface_hub.snapshot_download`.
        """
        directory = Path(pretrained)
        if not directory.is_dir():
            directory = _download(str(pretrained), revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only, force_download=force_download)
        weights_file = directory / WEIGHTS_NAME
        if not is_vqrae_export(directory):
            raise FileNotFoundError(f"{pretrained} is not a VQRAE directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        model = cls(from_dict(VQRAEConfig, read_config_dict(directory)))
        try:
            model.load_state_dict(load_file(str(weights_file)), strict=True)
        except RuntimeError as err:  # weights that do not fit the config (e.g. an export from another code version)
            raise ValueError(f"cannot load the VQRAE weights of {pretrained}: {' '.join(str(err).split())}") from None
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)

    @classmethod
    def from_pretrained_encoder(cls, config: VQRAEConfig, encoder_path: str | Path) -> VQRAE:
        """A new VQRAE whose encoder is a pretrained vision tower read from `encoder_path` (quantizer and decoder are
        freshly initialised). The tower's own config replaces `config.encoder.tower`."""
        encoder = load_pretrained_encoder(encoder_path, config.encoder)
        config = VQRAEConfig(encoder=encoder.cfg, quantizer=config.quantizer, decoder=config.decoder)
        return cls(config, encoder=encoder)


def is_vqrae_export(directory: str | Path) -> bool:
    """True for a folder holding a VQRAE config.json and model.safetensors."""
    return (Path(directory) / CONFIG_NAME).is_file() and (Path(directory) / WEIGHTS_NAME).is_file()


def read_config_dict(directory: str | Path) -> dict:
    """The VQRAEConfig fields stored in a VQRAE folder's config.json (checked: its model type and format version)."""
    path = Path(directory) / CONFIG_NAME
    data = json.loads(path.read_text())
    if data.pop("model_type", None) != "vqrae":
        raise ConfigError(f"{path} is not a VQRAE config (model_type must be 'vqrae')")
    version = data.pop("format_version", 1)
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path} has format version {version}, this code reads {FORMAT_VERSION}: version 1 applied "
                          "the tower's final norm at feature_layer -1; train or export it again with this version")
    return data


def _download(repo_id: str, **kwargs) -> Path:
    """The local snapshot of a Hub repository's VQRAE files; a path-like name that is not a folder is an error."""
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise FileNotFoundError(f"{repo_id} is not a VQRAE directory (no such folder)")
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"],
                                      **kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise FileNotFoundError(f"{repo_id} is neither a local VQRAE directory nor a reachable Hub repository "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
