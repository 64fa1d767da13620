"""Reading transformers-format weight folders and loading them into a module exactly: every tensor the module
needs must be found (under one key prefix), or one error names what is missing."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a transformers checkpoint folder (one file, or the shards its index names)."""
    directory = Path(directory)
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            return [directory / s for s in shards]
    raise FileNotFoundError(f"{directory} holds no weights ({SAFE_WEIGHTS}, {BIN_WEIGHTS} or a sharded index)")


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint folder, on CPU (pickles read with weights_only=True)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def find_prefix(wanted: Iterable[str], available: Iterable[str], prefer: str = "") -> str:
    """The key prefix under which most of `wanted` exist in `available` ("" when they are stored as they are).

    Candidates are the prefixes that turn an available key into a wanted one, e.g. "vision_tower." for an InternVL
    checkpoint whose vision keys are "vision_tower.embeddings..." while the tower's own are "embeddings...". Ties
    (a text tower with the vision tower's layout) go to a prefix containing `prefer`, then to the shortest.
    """
    wanted, available = set(wanted), set(available)
    candidates: dict[str, int] = {}
    for key in available:
        for w in wanted:
            if key.endswith(w) and (len(key) == len(w) or key[-len(w) - 1] == "."):
                prefix = key[: len(key) - len(w)]
                candidates[prefix] = candidates.get(prefix, 0) + 1
    if not candidates:
        return ""
    return max(candidates, key=lambda p: (candidates[p], bool(prefer) and prefer in p, -len(p)))


def in_loaded_layout(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`state` with its keys renamed to the layout transformers gives `module`'s class when it loads a checkpoint.

    Checkpoints keep the layout they were written in (`save_pretrained` writes the original one), which transformers 5
    renames on load for some classes (its checkpoint conversion mapping: ViT's "encoder.layer.0.attention.attention.
    query" is "layers.0.attention.q_proj"); this applies those renamings, with transformers' own functions, to every
    key (a prefix such as "vision_model." is kept). A key a WeightConverter would merge or split (DINOv2's SwiGLU
    "mlp.weights_in") is refused with one ValueError, as this is a rename, not a conversion.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(module)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamed = {}
    for key, tensor in state.items():
        new, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            raise ValueError(f"{source}: tensor {key} needs transformers' weight conversion {converter!r} (a merge or "
                             f"split, not a rename), which this loader does not do")
        renamed[new] = tensor
    return renamed


def load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, prefer: str = "") -> str:
    """Load `module`'s whole state from `state` (keys under one prefix, found by `find_prefix`), strictly: a
    missing tensor or a shape mismatch is a ValueError naming it. Tensors outside the module (e.g. a language model
    beside a vision tower) are ignored. Returns the prefix used.

    Args:
        module: the module to fill.
        state: a checkpoint's tensors (e.g. from `read_state_dict`).
        source: what `state` is, for error messages (e.g. the folder).
        prefer: breaks ties between prefixes (see `find_prefix`), e.g. "vision".
    """
    wanted = module.state_dict()
    prefix = find_prefix(wanted, state, prefer)
    picked = {k: state[prefix + k] for k in wanted if prefix + k in state}
    missing = sorted(set(wanted) - set(picked))
    if missing:
        raise ValueError(f"{source}: {len(missing)} of the {len(wanted)} tensors of {type(module).__name__} are not "
                         f"in the checkpoint (looked under prefix {prefix!r}), e.g. {', '.join(missing[:4])}")
    bad = [k for k in wanted if picked[k].shape != wanted[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"{source}: {len(bad)} tensors have other shapes than {type(module).__name__} expects, "
                         f"e.g. {prefix + k}: {tuple(picked[k].shape)} in the checkpoint, {tuple(wanted[k].shape)}")
    module.load_state_dict(picked, strict=True)
    return prefix
