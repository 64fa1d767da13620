"""DPG-Bench: generate in its layout, score by its rules (eval/dpg_scoring.py, the fixed variant) through a judge.

    # the CPU default: the shapes world's DPG-style set (written by scripts/prepare_world.py), its exact judge
    python eval/dpg_bench.py --model runs/tiny-ar/export --prompts runs/world/dpg/prompts \
        --questions runs/world/dpg/dpg_bench.csv --judge shapes --out runs/tiny-ar/dpg
    # the real benchmark: ELLA's prompt folder and question csv, any LLaVA-format judge from a local path
    python eval/dpg_bench.py --model runs/qwen3-0.6b-ar/export --prompts /data/dpg_bench/prompts \\
        --questions /data/dpg_bench/dpg_bench.csv --judge llava --judge-model /ckpt/llava-1.5-7b-hf \\
        --out outputs/dpg --device cuda --dtype bf16
    # score a folder of 2x2 tiles made by any model
    python eval/dpg_bench.py --score-only outputs/other-model --questions dpg_bench.csv --judge llava --judge-model J

Generation: for every prompt (a folder of {item_id}.txt files, as DPG-Bench ships them, or a jsonl of
{"item_id", "prompt"}), 4 images tiled 2x2 into OUT/images/{item_id}.png (crops in upstream order: top-left,
top-right, bottom-left, bottom-right); image k of prompt i (prompts sorted by item_id) draws from the random stream
(seed, 4 i + k), so a resumed or re-batched run writes the same files; settings in OUT/images/generation.json.
Scoring: every crop answers every question of its prompt; OUT/answers.jsonl (one line per prompt, all crops; an
interrupted scoring resumes), OUT/scores.jsonl (per prompt), OUT/summary.json (overall, L1, L2), a printed table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import add_device_arguments, dtype_of, reported_errors
from common.plugins import load_plugin, plugin_names
from eval.dpg_generation import generate, read_prompts
from eval.dpg_judges import JUDGE_PLUGINS
from eval.dpg_scoring import format_summary, read_question_csv, score_folder
from llm.sampler import add_sampling_arguments, sampling_from_arguments


def build_judge(args: argparse.Namespace):
    """A LLaVA-format judge from a local path, or a judge a package declares (eval.dpg_judges.JUDGE_PLUGINS)."""
    from eval.dpg_judges import LlavaJudge

    if args.judge != "llava":
        return load_plugin(JUDGE_PLUGINS, args.judge)()
    if args.judge_model is None:
        raise FileNotFoundError("--judge llava needs --judge-model DIR (a LLaVA-format export)")
    return LlavaJudge(args.judge_model, args.device, dtype_of(args.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="generator export (not needed with --score-only)")
    parser.add_argument("--prompts", type=Path, default=None, help="prompt folder or jsonl")
    parser.add_argument("--questions", type=Path, required=True, help="question csv")
    parser.add_argument("--out", type=Path, default=None, help="tiles in OUT/images, scores in OUT (default with "
                        "--score-only DIR: DIR/dpg_scores)")
    parser.add_argument("--score-only", type=Path, default=None, metavar="DIR", help="score this folder of tiles")
    parser.add_argument("--judge", default="llava", help="llava (with --judge-model), or a declared judge: "
                        + ", ".join(plugin_names(JUDGE_PLUGINS)))
    parser.add_argument("--judge-model", type=Path, default=None, help="LLaVA-format export (--judge llava)")
    parser.add_argument("--prompts-per-batch", type=int, default=8)
    add_sampling_arguments(parser, cfg_scale=3.0, seed=42)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.score_only is None and (args.model is None or args.prompts is None or args.out is None):
        parser.error("--model, --prompts and --out are required unless --score-only")
    with reported_errors():
        questions = read_question_csv(args.questions)
        judge = build_judge(args)
        out = args.out or args.score_only / "dpg_scores"
        images = args.score_only or out / "images"
        if args.score_only is None:
            from llm.pipeline import TextToImage

            t2i = TextToImage.from_pretrained(args.model, device=args.device, dtype=dtype_of(args.dtype))
            sampling = sampling_from_arguments(args, t2i.recommended)
            generate(t2i, read_prompts(args.prompts), images, sampling, args.prompts_per_batch,
                     str(args.model.resolve()))
        summary = score_folder(images, questions, judge, out)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
