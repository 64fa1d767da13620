"""The non-finite loss guard: a micro-step whose loss is NaN or inf on any rank is skipped on every rank, counted,
and too many in a row stop the run with `NonFiniteLossError`."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from common.distributed import all_reduce

log = logging.getLogger("vqrae")


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


class NonFiniteGuard:
    """Decides, identically on every rank, whether a micro-step's loss is finite; counts skips; raises after
    `max_consecutive` non-finite micro-steps in a row."""

    def __init__(self, max_consecutive: int, skipped: int = 0):
        self.max_consecutive, self.skipped, self.consecutive = max_consecutive, skipped, 0

    def ok(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach().float()).all().to(torch.float32).reshape(1)
        finite = all_reduce(finite, dist.ReduceOp.MIN)
        if bool(finite.item()):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(
                f"loss was non-finite for {self.consecutive} consecutive micro-steps ({self.skipped} in total); "
                "lower the learning rate, check the data, or raise run.max_bad_steps"
            )
        log.warning("non-finite loss: micro-step skipped (%d skipped so far)", self.skipped)
        return False
