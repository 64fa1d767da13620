"""Benchmark the quantizer's nearest-code search against the naive full-distance-matrix searches.

    python scripts/bench_quantizer.py                      # N=16384 vectors, K=16384 codes, D=1536, CPU
    python scripts/bench_quantizer.py --device cuda        # the same on a GPU
    python scripts/bench_quantizer.py -n 4096 -k 4096      # smaller

Baselines, measured in the same run on the same inputs:
  cdist  torch.cdist(z, codebook).argmin(1)
  naive  ((z**2).sum(1, keepdim=True) - 2 * z @ C.T + (C**2).sum(1)).argmin(1), the whole (N, K) matrix
Prints time (best of --repeats), peak extra memory over the inputs, the ratios, and index agreement.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tokenizer.quantizer import nearest_code


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, device: torch.device, repeats: int) -> tuple[torch.Tensor, float, float]:
    """Run fn `repeats` times; return (result, best seconds, peak extra MiB over the memory held before)."""
    best, peak, result = float("inf"), 0.0, None
    for _ in range(repeats):
        result = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
            base = _rss_kb("VmRSS:") * 1024
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
        else:
            extra = _rss_kb("VmHWM:") * 1024 - base
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, extra / 2**20)
    return result, best, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=16384, help="vectors to quantize")
    parser.add_argument("-k", type=int, default=16384, help="codebook size")
    parser.add_argument("-d", type=int, default=1536, help="code dimension")
    parser.add_argument("--budget-mb", type=int, default=64, help="distance block budget of the chunked search")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.n, args.d, generator=gen).to(device)
    codebook = (torch.randn(args.k, args.d, generator=gen) * args.d**-0.5).to(device)
    # SimVQ's z is a linear map of encoder features: give it a similar scale to the codes plus structure.
    z = z * args.d**-0.5 + codebook[torch.randint(0, args.k, (args.n,), generator=gen).to(device)]

    runs = {
        "cdist": lambda: torch.cdist(z, codebook).argmin(1),
        "naive": lambda: ((z**2).sum(1, keepdim=True) - 2 * z @ codebook.t() + (codebook**2).sum(1)).argmin(1),
        "chunked": lambda: nearest_code(z, codebook, budget_mb=args.budget_mb),
    }
    results = {name: measure(fn, device, args.repeats) for name, fn in runs.items()}
    ours, t_ours, m_ours = results["chunked"]
    print(f"nearest-code search  N={args.n} K={args.k} D={args.d}  device={device}  threads={torch.get_num_threads()}")
    print(f"{'method':<8} {'time s':>8} {'peak extra MiB':>15} {'speed vs it':>12} {'mem ratio':>10} {'identical':>10}")
    for name, (idx, t, mem) in results.items():
        same = int((idx == ours).sum())
        print(f"{name:<8} {t:8.3f} {mem:15.1f} {t / t_ours:11.2f}x {m_ours / max(mem, 1e-9):10.3f} "
              f"{same:>5}/{args.n}")
    print("speed vs it = baseline time / chunked time (>= 1 means chunked is at least as fast);"
          " mem ratio = chunked peak / baseline peak")


if __name__ == "__main__":
    main()
