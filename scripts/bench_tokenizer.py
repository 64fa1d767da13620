"""Tokenizer training-step benchmark: images/s, model FLOPs utilisation (MFU) and peak memory.

    python scripts/bench_tokenizer.py                                   # tiny preset, CPU, fp32, stage 1 and 2
    python scripts/bench_tokenizer.py --preset siglip2-so400m-p16-256 --device cuda --dtype bf16 --batch 32

One step (--loss full, the default) is the trainer's micro-step with the GAN on, by the trainer's own loss functions:
VQRAE forward; L2 + LPIPS (random VGG16: speed does not depend on the weights) + VQ + adaptive-weighted hinge GAN
(stage 2: + distillation to the frozen teacher, whose forward is included, and the encoder trains); backward; AdamW;
then the discriminator's hinge + LeCAM loss, backward and AdamW. --loss core keeps only L2 + VQ (+ distillation).
FLOPs are counted by torch.utils.flop_counter on one step without checkpointing (model FLOPs: the
recomputation of checkpointed layers is not counted); MFU = those FLOPs / step time / the dense matmul throughput
of this device measured in the same run (--peak-n square matmuls in the same dtype).
Each configuration runs with gradient checkpointing off and on (--ckpt).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.cli import DTYPES, default_device
from tokenizer import VQRAE, get_preset
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import build_lpips
from tokenizer.objective import LeCAMState, LossConfig, discriminator_loss, generator_loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Measured dense matmul FLOP/s of an (n x n) @ (n x n) product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def make_step(model: VQRAE, teacher: torch.nn.Module | None, x: torch.Tensor, dtype: torch.dtype, full: bool):
    """One training step on the fixed batch x, as a closure; `full`: the trainer's whole loss (see the docstring)."""
    device = x.device
    cfg = LossConfig(disc_start=0, gan_start=0)
    if not full:
        cfg.lpips_weight = cfg.gan_weight = 0.0
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused)
    lpips = build_lpips(None, allow_random=True).to(device) if full else None
    disc = d_opt = None
    if full:
        with device:
            disc = PatchDiscriminator(DiscriminatorConfig())
        d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-4, fused=fused)
    d_state = LeCAMState()
    patch = model.config.output_patch_size

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if disc is not None:
                disc.requires_grad_(False)
            out = model(x)
            loss, _ = generator_loss(cfg, out, x, 0, lpips, teacher, disc, patch, bf16=dtype == torch.bfloat16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if disc is not None:
            disc.requires_grad_(True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                d_loss, _ = discriminator_loss(cfg, disc, x, out.reconstruction, d_state)
            d_loss.backward()
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)

    return step


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def bench(args: argparse.Namespace, stage: int, ckpt: bool, peak: float) -> dict:
    """One configuration. FLOPs are counted on an eager step without checkpointing (model FLOPs: recomputation is
    not counted), then the configuration is timed."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    cfg.encoder.attn_implementation = args.attn
    with device:  # built on the device: random init of a 400M+ model on the host is slow
        model = VQRAE(cfg)
    teacher = None
    if stage == 1:
        model.encoder.requires_grad_(False)
    else:
        teacher = copy.deepcopy(model.encoder).requires_grad_(False).eval()
    size = cfg.encoder.image_size
    x = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
    step = make_step(model, teacher, x, dtype, args.loss == "full")
    with FlopCounterMode(display=False) as counter:  # eager, so that compiled kernels cannot hide FLOPs
        step()
    flops = counter.get_total_flops()
    model.set_gradient_checkpointing(ckpt)
    if args.compile:
        model.compile()
        if teacher is not None:
            teacher.compile()
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _rss_peak_reset()
        base = _rss_kb("VmRSS:") * 1024
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**30
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        mem = _rss_kb("VmHWM:") / 2**20
        extra = (_rss_kb("VmHWM:") * 1024 - base) / 2**30
    return {"stage": stage, "ckpt": ckpt, "img_s": args.batch / dt, "step_s": dt, "flops": flops,
            "tflop_step": flops / 1e12,
            "mfu": flops / dt / peak, "peak_gib": mem, "step_extra_gib": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--loss", choices=("full", "core"), default="full",
                        help="full: the trainer's whole loss with LPIPS and the GAN; core: L2 + VQ (+ distillation)")
    parser.add_argument("--ckpt", default="off,on", help="gradient checkpointing settings to run: off, on or off,on")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--attn", default="auto", help="auto | sdpa | flash_attention_2 | eager")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 8192 GPU, 2048 CPU)")
    args = parser.parse_args()
    settings = {"off": False, "on": True}
    if not set(args.ckpt.split(",")) <= set(settings):
        parser.error(f"--ckpt takes off, on or off,on; got {args.ckpt!r}")
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    peak = matmul_peak(device, DTYPES[args.dtype], args.peak_n or (8192 if device.type == "cuda" else 2048))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"tokenizer training step  preset={args.preset} batch={args.batch} dtype={args.dtype} attn={args.attn} "
          f"compile={args.compile} loss={args.loss}  device={name}")
    print(f"measured matmul peak: {peak / 1e12:.2f} TFLOP/s")
    print(f"{'stage':>5} {'ckpt':>5} {'img/s':>9} {'step s':>8} {'TFLOP/step':>11} {'MFU':>6} {'peak GiB':>9} "
          f"{'step +GiB':>9}")
    results = []
    for stage in (int(s) for s in args.stages.split(",")):
        for ckpt in (settings[c] for c in args.ckpt.split(",")):
            r = bench(args, stage, ckpt, peak)
            results.append(r)
            print(f"{r['stage']:>5} {str(r['ckpt']):>5} {r['img_s']:9.1f} {r['step_s']:8.3f} {r['tflop_step']:11.3f} "
                  f"{r['mfu']:6.1%} {r['peak_gib']:9.2f} {r['step_extra_gib']:9.2f}")
    if args.json:
        record = {"settings": vars(args), "device": name, "matmul_peak_tflops": peak / 1e12, "results": results}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
