"""GenEval: generate images for every prompt of a GenEval prompt file with an exported generator, then score them.

    # the official benchmark (553 prompts, 4 images each), Mask2Former + CLIP from local directories
    python eval/geneval.py --model runs/qwen3-0.6b-ar/export --out outputs/geneval \
        --mask2former /ckpt/mask2former-swin-s-coco-instance --clip /ckpt/clip-vit-large-patch14
    # the CPU default: held-out prompts of the shapes world, scored by its exact detector (world/detector.py,
    # picked by --detector auto since it knows every class the prompts name)
    python eval/geneval.py --model runs/tiny-ar/export --prompts runs/world/geneval_prompts.jsonl \
        --out runs/tiny-ar/geneval
    # score an existing folder only (any generator that wrote GenEval's layout)
    python eval/geneval.py --score-only --out outputs/geneval --mask2former ... --clip ...

Layout (GenEval's): OUT/NNNNN/metadata.jsonl (the prompt's line), OUT/NNNNN/samples/NNNN.png; OUT/generation.json
records the model and every sampling setting; OUT/results.jsonl and OUT/summary.json hold the scores. Generation
resumes: prompt folders that already hold their images are kept (a folder started with other settings is refused,
not mixed). Image k of prompt i draws from its own random stream (--seed, i * images_per_prompt + k), so a resumed
or re-batched run writes the very images an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import add_device_arguments, dtype_of, reported_errors
from common.plugins import plugin_names
from eval.detection import DETECTOR_PLUGINS, build_detector
from eval.geneval_generation import OFFICIAL_PROMPTS, generate, prompt_classes, read_prompts
from eval.geneval_scoring import ScoringConfig, evaluate_folder, summarize, write_summary
from llm.sampler import add_sampling_arguments, sampling_from_arguments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="generator export (train/ar_gen.py); not needed with --score-only")
    parser.add_argument("--prompts", type=Path, default=OFFICIAL_PROMPTS)
    parser.add_argument("--out", type=Path, default=None, help="output folder (required)")
    parser.add_argument("-n", "--images-per-prompt", type=int, default=4)
    parser.add_argument("--prompts-per-batch", type=int, default=4)
    add_sampling_arguments(parser, seed=42)
    add_device_arguments(parser)
    parser.add_argument("--detector", default="auto", help="auto (a declared detector that knows every class of the "
                        "prompts, else mask2former), mask2former, or a declared detector: "
                        + ", ".join(plugin_names(DETECTOR_PLUGINS)))
    parser.add_argument("--mask2former", default="", help="local Mask2Former COCO instance checkpoint directory")
    parser.add_argument("--clip", default="", help="local CLIP ViT-L/14 directory")
    parser.add_argument("--score-only", action="store_true")
    args = parser.parse_args(argv)
    with reported_errors():  # what is wrong, in the order a user fixes it: the model, the output, the detector
        from llm.pipeline import TextToImage

        if not args.score_only:
            if args.model is None:
                raise ValueError("--model is required (a generator export) unless --score-only")
            TextToImage.check(args.model)
        if args.out is None:
            raise ValueError("--out is required (where the images and scores go)")
        if args.score_only:
            rows = [json.loads(p.read_text().splitlines()[0]) for p in sorted(args.out.glob("*/metadata.jsonl"))]
        else:
            rows = read_prompts(args.prompts)
        detector = build_detector(args.detector, prompt_classes(rows), args.mask2former, args.clip, args.device)
        if not args.score_only:
            t2i = TextToImage.from_pretrained(args.model, device=args.device, dtype=dtype_of(args.dtype))
            sampling = sampling_from_arguments(args, t2i.recommended)
            generate(t2i, rows, args.out, args.images_per_prompt, sampling, args.prompts_per_batch,
                     str(args.model.resolve()))
        results = evaluate_folder(args.out, detector, ScoringConfig())
    summary = summarize(results)
    summary["detector"] = detector.name
    write_summary(summary, args.out / "summary.json")


if __name__ == "__main__":
    main()
