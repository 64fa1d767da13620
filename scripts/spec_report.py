"""Speculative Jacobi decoding on the CPU default's generator (runs/tiny-ar/export, after scripts/cpu_demo.sh): GenEval
of the held-out prompts (n images each, the world's exact detector), drawn one code per forward and with each window,
in one run; per setting the overall score with its standard error (prompts as the unit), the model forwards per batch
(a batch's images are drawn together, so this is the number of sequential steps) and the seconds per image.
Writes runs/spec_report.json and prints a markdown table. Every setting is drawn afresh, so the timings are whole runs.

    python scripts/spec_report.py                          # windows 2, 4 and 16, both initialisations
    python scripts/spec_report.py --window 8 --prompts runs/world/geneval_prompts_val.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from common.files import atomic_write
from eval.geneval_generation import generate, read_prompts
from eval.geneval_scoring import ScoringConfig, evaluate_folder, overall_standard_error, summarize
from llm.pipeline import TextToImage
from llm.sampler import SPEC_INITS
from world.detector import ShapesDetector
from world.report import RUNS, generator_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--prompts", type=Path, default=None,
                        help="GenEval prompts (default: RUNS/world/geneval_prompts.jsonl, the held-out set)")
    parser.add_argument("-n", type=int, default=4, help="images per prompt")
    parser.add_argument("--window", type=int, action="append", help="spec_window values (default: 2, 4 and 16)")
    parser.add_argument("--prompts-per-batch", type=int, default=8)
    args = parser.parse_args()
    prompts_file = args.prompts or args.runs / "world" / "geneval_prompts.jsonl"
    export = args.runs / "tiny-ar" / "export"
    TextToImage.check(export)
    prompts = read_prompts(prompts_file)
    t2i = TextToImage.from_pretrained(export)
    base = generator_sampling(args.runs)
    settings = {"one code per forward": base}
    for window in args.window or [2, 4, 16]:
        for init in SPEC_INITS:
            settings[f"window {window}, {init}"] = dataclasses.replace(base, spec_window=window, spec_init=init)
    rows = {}
    out = args.runs / "spec_report"
    for name, sampling in settings.items():
        folder = out / name.replace(" ", "-").replace(",", "")
        shutil.rmtree(folder, ignore_errors=True)
        stats = generate(t2i, prompts, folder, args.n, sampling, args.prompts_per_batch, model_name="tiny-ar")
        results = evaluate_folder(folder, ShapesDetector(), ScoringConfig(), progress=False)
        summary = summarize(results)
        rows[name] = {"sampling": sampling.to_dict(), "geneval": summary["overall"],
                      "standard_error": overall_standard_error(results),
                      "tasks": {t: v["score"] for t, v in summary["tasks"].items()},
                      "forwards_per_batch": stats["forwards"] / stats["batches"],
                      "seconds_per_image": stats["seconds"] / stats["images"]}
        print(f"{name}: GenEval {rows[name]['geneval']:.3f} +- {rows[name]['standard_error']:.3f}, "
              f"{rows[name]['forwards_per_batch']:.1f} forwards per batch, "
              f"{rows[name]['seconds_per_image'] * 1e3:.2f} ms per image", flush=True)
    one = rows["one code per forward"]
    report = {"prompts": str(prompts_file), "images_per_prompt": args.n, "prompts_per_batch": args.prompts_per_batch,
              "threads": torch.get_num_threads(), "rows": rows}
    with atomic_write(args.runs / "spec_report.json") as f:
        json.dump(report, f, indent=2)
    print(f"\n{len(prompts)} prompts x {args.n} images, {args.prompts_per_batch * args.n} images per batch\n")
    print("| sampling | GenEval | forwards per batch | fewer forwards | ms per image | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['geneval']:.3f} +- {r['standard_error']:.3f} | {r['forwards_per_batch']:.1f} | "
              f"{one['forwards_per_batch'] / r['forwards_per_batch']:.2f}x | {r['seconds_per_image'] * 1e3:.2f} | "
              f"{one['seconds_per_image'] / r['seconds_per_image']:.2f}x |")


if __name__ == "__main__":
    main()
