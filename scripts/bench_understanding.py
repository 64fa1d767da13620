"""Answers per second of batched greedy answering (llm.understanding.answer: left-padded batches, what
eval/understanding.py runs) against one-at-a-time transformers `generate` on the same model and questions, in one run.

    python scripts/bench_understanding.py                   # the CPU default's stage-2 export, held-out questions
    python scripts/bench_understanding.py --model EXPORT --questions Q.jsonl --device cuda --dtype bfloat16

Methods (the same N questions, greedy, the same max_new_tokens):
- one_at_a_time: one (image, question) per `generate` call, no padding (what a chat loop or a naive eval does).
- batched_B:     B questions per `generate` call, left-padded, for each B of --batch-sizes.
Printed per method: answers/s, the ratio to one_at_a_time, and the fraction of answers identical to one_at_a_time's
(padding must not change a greedy answer; a low agreement is a bug, an occasional flip is float rounding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common.cli import add_device_arguments, dtype_of, reported_errors
from data.transforms import open_rgb

REPO = Path(__file__).resolve().parents[1]


def timed(device: str, fn, *args) -> tuple[list[str], float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "tiny-und-stage2" / "export")
    parser.add_argument("--questions", type=Path, default=REPO / "runs" / "world" / "heldout" / "questions.jsonl")
    parser.add_argument("--images", type=Path, default=None, help="image root (default: the question file's folder)")
    parser.add_argument("--num-questions", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as json")
    add_device_arguments(parser)
    args = parser.parse_args()
    with reported_errors():
        run(args)


def run(args: argparse.Namespace) -> None:
    from eval.understanding_scoring import read_questions
    from llm.understanding import answer, is_llava_export, load_llava

    if not is_llava_export(args.model):
        raise FileNotFoundError(f"{args.model} is not a LLaVA export: train one first (deepspeed "
                                "train/understanding.py, then its stage 2) or pass --model")
    if not args.questions.is_file():
        raise FileNotFoundError(f"{args.questions} not found: python scripts/understanding_report.py writes the "
                                "CPU default's held-out questions, or pass --questions")
    questions = read_questions(args.questions, "shapes")[: args.num_questions]
    root = args.images or args.questions.parent
    images = [open_rgb(root / q["image"]) for q in questions]
    texts = [q["text"] for q in questions]
    model, processor = load_llava(args.model, args.device, dtype_of(args.dtype))
    torch.set_grad_enabled(False)

    def batched(size: int) -> list[str]:
        return [a for s in range(0, len(texts), size)
                for a in answer(model, processor, images[s : s + size], texts[s : s + size], args.max_new_tokens,
                                short=False)]

    batched(max(args.batch_sizes))  # warm-up: allocator, kernels, tokenizer caches
    reference, seconds = timed(args.device, batched, 1)
    rows = {"one_at_a_time": {"answers_per_s": len(texts) / seconds, "agreement": 1.0}}
    for size in args.batch_sizes:
        out, seconds = timed(args.device, batched, size)
        rows[f"batched_{size}"] = {"answers_per_s": len(texts) / seconds,
                                   "agreement": sum(a == b for a, b in zip(out, reference)) / len(texts)}
    base = rows["one_at_a_time"]["answers_per_s"]
    print(f"{len(texts)} questions, {args.model}, {args.device} {args.dtype}, max_new_tokens {args.max_new_tokens}")
    print(f"{'method':<16}{'answers/s':>12}{'x one-at-a-time':>18}{'same answer':>14}")
    for name, r in rows.items():
        r["ratio"] = r["answers_per_s"] / base
        print(f"{name:<16}{r['answers_per_s']:>12.1f}{r['ratio']:>18.2f}{r['agreement']:>14.3f}")
    if args.out:
        args.out.write_text(json.dumps({"questions": len(texts), "device": args.device, "dtype": args.dtype,
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
