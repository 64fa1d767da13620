"""VQRAE's codebook ablation (the paper's Table 5) as one command: codebook dimension x codebook size against
whole-pass codebook utilisation, perplexity and PSNR on held-out images, each point a short stage-1 run of the real
trainer.

    python scripts/ablate_codebook.py          # CPU default: the shapes world, tiny-p4-32 (encoder width 64)
    python scripts/ablate_codebook.py --config train/configs/tokenizer/siglip2-stage1.yaml \\
        --launcher "deepspeed --num_gpus 8" --dim-ratios 0.333,0.667,1,1.333,1.667 --sizes 16384,32768 \\
        --steps 20000 --eval-data /data/imagenet/val --eval-images 50000 --inception pt_inception.pth \\
        --out runs/ablate-siglip2 model.encoder_path=/ckpt/siglip2-so400m-patch16-256 data.train=/data/shards

Every point (dimension D, size K) runs `train/tokenizer.py --config CONFIG OVERRIDES model.quantizer.codebook_dim=D
model.quantizer.codebook_size=K run.steps=STEPS run.output_dir=OUT/points/dD-kK`: the same recipe, seed and steps
for every point, only the codebook differs. Its export then reconstructs the held-out images (data.eval of the
config, or --eval-data) once: whole-pass utilisation and perplexity, PSNR (and SSIM, rFID with --inception), the
same numbers `eval/reconstruction.py` reports.

Converged, the stated rule: no logged loss is non-finite, no step was skipped as non-finite, and the held-out PSNR
beats that of the held-out set's mean image (what a decoder that ignores its codes can reach) by at least
CONVERGED_MARGIN_DB, i.e. at most half its squared error.

Resumable: a finished point (OUT/points/<name>.json) is kept and skipped; an unfinished one resumes its run folder
from the last checkpoint. OUT/settings.json records the sweep's settings and a rerun with others is refused. Outputs:
OUT/ablation.json (the settings and every point, its resolved trainer config and loss curve included),
OUT/ablation.md (the table) and OUT/ablation.png (utilisation and PSNR against dimension, one line per size).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from common.cli import DTYPES, add_device_arguments, reported_errors
from common.config import ConfigError
from common.files import atomic_write, ensure_settings
from data.images import build_image_dataset
from data.transforms import ImageTransform
from eval.metrics import InceptionFeatureExtractor
from eval.reconstruction_scoring import CONVERGED_MARGIN_DB, converged, evaluate, mean_image_psnr
from tokenizer import VQRAE
from tokenizer.encoder import vision_config
from train.config import read_config
from train.tokenizer_config import CONFIG_DIR, TokenizerTrainConfig

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "train" / "tokenizer.py"
SWEPT = ("model.quantizer.codebook_dim", "model.quantizer.codebook_size", "run.steps", "run.output_dir")
PAPER = {  # Table 5 of the paper (ImageNet, SigLIP2-so400m, width 1152): codebook utilisation
    "dimension at 16384 codes": {"<=256": "does not converge", 384: 0.64, 768: 0.69, 1152: 0.83, 1536: 1.00},
    "size": {4096: 0.98, 8192: 1.00, 16384: 1.00, 32768: 0.96},
}


def parse_list(text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"expected positive values, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "tiny-stage1.yaml",
                        help="a stage-1 tokenizer config (default: the CPU default's)")
    parser.add_argument("--dim-ratios", default="0.125,0.25,0.5,1,2,4",
                        help="codebook dimensions as multiples of the encoder width")
    parser.add_argument("--dims", default="", help="codebook dimensions, absolute (instead of --dim-ratios)")
    parser.add_argument("--sizes", default="128,512,2048", help="codebook sizes")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of every point")
    parser.add_argument("--out", type=Path, default=Path("runs/ablate-codebook"), help="the sweep's folder")
    parser.add_argument("--eval-data", default="", help="held-out images (default: the config's data.eval)")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluate only the first N held-out images")
    parser.add_argument("--inception", type=Path, default=None, help="FID Inception-v3 weights, for rFID")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass in the evaluation")
    parser.add_argument("--launcher", default=sys.executable,
                        help='what runs the trainer, e.g. "deepspeed --num_gpus 8" (default: this python)')
    add_device_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the trainer, e.g. data.train=...")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The sweep's points


def encoder_width(cfg: TokenizerTrainConfig) -> int:
    """The width of the features the codebook quantizes: the pretrained tower's when model.encoder_path is a
    transformers directory, else the config's encoder."""
    path = Path(cfg.model.encoder_path) if cfg.model.encoder_path else None
    if path is not None and cfg.model.encoder.model_type != "timm":
        return int(vision_config(path).hidden_size)
    return cfg.model.encoder.hidden_size


def points(args: argparse.Namespace, width: int) -> list[dict[str, int]]:
    """(dimension, size) pairs, dimension-major, each dimension once."""
    if args.dims:
        dims = parse_list(args.dims, int)
    else:
        dims = [max(1, round(r * width)) for r in parse_list(args.dim_ratios, float)]
    dims = sorted(set(dims))
    sizes = sorted(set(parse_list(args.sizes, int)))
    if min(sizes) < 2:
        raise ConfigError("--sizes: a codebook needs at least 2 codes")
    return [{"dim": d, "size": k} for d in dims for k in sizes]


def point_name(point: dict[str, int]) -> str:
    return f"d{point['dim']}-k{point['size']}"


def train_point(args: argparse.Namespace, point: dict[str, int], run_dir: Path) -> None:
    """Run (or resume) the trainer for one point; a failure stops the sweep with the trainer's last line."""
    command = [*shlex.split(args.launcher), str(TRAINER), "--config", str(args.config), *args.overrides,
               f"model.quantizer.codebook_dim={point['dim']}", f"model.quantizer.codebook_size={point['size']}",
               f"run.steps={args.steps}", f"run.output_dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE)
    tail = b""
    while chunk := proc.stderr.read1(1 << 16):  # the trainer's log and progress bar pass through; its end is kept
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-8192:]
    if proc.wait():
        lines = [line for line in tail.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
        raise RuntimeError(f"point {point_name(point)}: the trainer exited with {proc.returncode}: "
                           f"{lines[-1] if lines else '(no output)'}")


def loss_curve(run_dir: Path) -> dict[str, Any]:
    """The logged losses of a run: {"step": [...], "l2": [...], "vq": [...], "loss": [...]} and the skipped
    non-finite step count."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    curve: dict[str, Any] = {k: [_finite_or_none(r.get(k)) for r in rows] for k in ("step", "l2", "vq", "loss")}
    curve["skipped_nonfinite"] = rows[-1].get("skipped_nonfinite", 0) if rows else 0
    return curve


def _finite_or_none(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def evaluate_point(args: argparse.Namespace, run_dir: Path, dataset, inception, baseline_psnr: float) -> dict:
    model = VQRAE.from_pretrained(run_dir / "export", device=args.device, dtype=DTYPES[args.dtype])
    summary, _ = evaluate(model, dataset, batch_size=args.batch_size, device=args.device, inception=inception,
                          num_images=args.eval_images, progress=False)
    curve = loss_curve(run_dir)
    keep = ("utilisation", "perplexity", "psnr", "ssim", "rfid", "codes_per_image", "num_images")
    return {**{k: summary[k] for k in keep}, "converged": converged(curve, summary["psnr"], baseline_psnr),
            "loss_curve": curve,
            "final_l2": curve["l2"][-1] if curve["l2"] else None,
            "trainer_config": yaml.safe_load((run_dir / "config.yaml").read_text())}


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def format_table(result: dict[str, Any]) -> str:
    width = result["settings"]["encoder_width"]
    lines = [f"Codebook ablation: {result['settings']['steps']} stage-1 steps per point, encoder width {width}; "
             f"held-out mean-image PSNR {result['mean_image_psnr']:.2f} dB (converged: finite losses and PSNR at least "
             f"{CONVERGED_MARGIN_DB:.2f} dB above it)", "",
             "| dimension | dim / width | size | utilisation | perplexity | PSNR (dB) | final L2 | converged |",
             "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for p in result["points"]:
        final = "nan" if p["final_l2"] is None else f"{p['final_l2']:.4f}"
        lines.append(f"| {p['dim']} | {p['dim'] / width:g} | {p['size']} | {100 * p['utilisation']:.1f}% | "
                     f"{p['perplexity']:.1f} | {p['psnr']:.2f} | {final} | {'yes' if p['converged'] else 'no'} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Utilisation and PSNR against dimension (log 2 axis), one line per codebook size; hollow markers did not
    converge; the dashed line is the encoder width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sizes = sorted({p["size"] for p in result["points"]})
    for size in sizes:
        row = [p for p in result["points"] if p["size"] == size]
        dims = [p["dim"] for p in row]
        for ax, key, scale in ((axes[0], "utilisation", 100), (axes[1], "psnr", 1)):
            (line,) = ax.plot(dims, [scale * p[key] for p in row], label=f"{size} codes")
            for p in row:
                ax.plot(p["dim"], scale * p[key], "o", color=line.get_color(),
                        markerfacecolor=line.get_color() if p["converged"] else "none")
    all_dims = sorted({p["dim"] for p in result["points"]})
    for ax, label in ((axes[0], "utilisation (%)"), (axes[1], "PSNR (dB), held-out")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_dims, [str(d) for d in all_dims])
        ax.minorticks_off()
        ax.axvline(result["settings"]["encoder_width"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("codebook dimension (dashed: encoder width)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(result["mean_image_psnr"], color="grey", linestyle=":", linewidth=1, label="mean image")
    axes[1].axhline(result["mean_image_psnr"] + CONVERGED_MARGIN_DB, color="grey", linestyle="-.", linewidth=1,
                    label="converged above")
    axes[1].legend()
    axes[0].legend()
    fig.suptitle(f"codebook ablation, {result['settings']['steps']} stage-1 steps per point (hollow: not converged)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    taken = sorted(o.split("=", 1)[0] for o in args.overrides if o.split("=", 1)[0] in SWEPT)
    if taken:
        raise ConfigError(f"{', '.join(taken)} are set by the sweep (--dims / --dim-ratios, --sizes, --steps, --out)")
    if args.steps <= 0:
        raise ConfigError(f"--steps must be positive, got {args.steps}")
    cfg = read_config(TokenizerTrainConfig, args.config, args.overrides)
    if cfg.stage != 1:
        raise ConfigError(f"the ablation trains stage 1 (the codebook is learned there); {args.config} is stage "
                          f"{cfg.stage}")
    width = encoder_width(cfg)
    sweep = points(args, width)
    eval_data = args.eval_data or cfg.data.eval
    if not eval_data:
        raise ConfigError("no held-out images: the config has no data.eval; give --eval-data")
    settings = {"config": str(args.config), "overrides": args.overrides, "steps": args.steps,
                "eval_data": eval_data, "eval_images": args.eval_images, "seed": cfg.run.seed,
                "encoder_width": width, "inception": str(args.inception) if args.inception else None}
    ensure_settings(args.out / "settings.json", settings)
    inception = None
    if args.inception is not None:
        inception = InceptionFeatureExtractor.from_file(args.inception, args.device)
    dataset = None
    results = []
    for i, point in enumerate(sweep, 1):
        name = point_name(point)
        record_path = args.out / "points" / f"{name}.json"
        if record_path.is_file():
            results.append(json.loads(record_path.read_text()))
            print(f"== point {i}/{len(sweep)} {name}: done before, kept", flush=True)
            continue
        print(f"== point {i}/{len(sweep)} {name}: {args.steps} steps", flush=True)
        run_dir = args.out / "points" / name
        train_point(args, point, run_dir)
        if dataset is None:  # read once, after the first point has run
            image_size = cfg.model.encoder.image_size
            dataset = build_image_dataset(eval_data, ImageTransform(image_size, mode="center"))
            baseline = mean_image_psnr(dataset, args.eval_images)
        record = {**point, **evaluate_point(args, run_dir, dataset, inception, baseline), "mean_image_psnr": baseline}
        write_json(record_path, record)
        results.append(record)
        print(f"   utilisation {100 * record['utilisation']:.1f}%, perplexity {record['perplexity']:.1f}, "
              f"PSNR {record['psnr']:.2f} dB, converged: {record['converged']}", flush=True)
    result = {"settings": settings, "mean_image_psnr": results[0]["mean_image_psnr"], "paper_utilisation": PAPER,
              "converged_rule": f"finite losses, no non-finite step, held-out PSNR >= mean-image PSNR + "
                                f"{CONVERGED_MARGIN_DB:.2f} dB", "points": results}
    write_json(args.out / "ablation.json", json.loads(json.dumps(result, default=str)))
    table = format_table(result)
    with atomic_write(args.out / "ablation.md") as f:
        f.write(table + "\n")
    plot(result, args.out / "ablation.png")
    print(table)
    print(f"wrote {args.out / 'ablation.json'}, {args.out / 'ablation.md'} and {args.out / 'ablation.png'}")
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with reported_errors(ValueError, FileNotFoundError, RuntimeError):
        run(args)


if __name__ == "__main__":
    main()
