"""Exponential moving average of the trained weights, kept in fp32 from DeepSpeed's fp32 master weights."""

from __future__ import annotations

import torch


def master_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 value of a parameter: DeepSpeed's fp32 master copy when the engine keeps one (bf16 training,
    any ZeRO stage; a collective call there, so every rank must make it), else the parameter itself as fp32."""
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full
    return param.detach().float()


class EMA:
    """fp32 exponential moving average of named parameters: shadow = d * shadow + (1 - d) * master, with the usual
    warmup d = min(decay, (1 + step) / (10 + step)) so that short runs are not dominated by their first weights.

    Build it before `deepspeed.initialize` (it copies the fp32 weights as they are then); `update` reads the
    engine's fp32 master weights, not the bf16 copies the model computes with. Call `update` on every rank.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for k, p in self.params.items():
            master = master_weight(p)
            if self.shadow[k].device != master.device:  # built on the host, trained on an accelerator
                self.shadow[k] = self.shadow[k].to(master.device)
            self.shadow[k].lerp_(master, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = set(self.shadow) - set(state), set(state) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the trained parameters: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k].to(self.shadow[k].device))
