"""What the CPU default's foundation models know (run after scripts/prepare_world.py), on the world's held-out split
(world seed 1, which their pretraining never saw):

- the SigLIP: zero-shot caption retrieval (the world's 612 GenEval prompts; the held-out images' own descriptions);
- linear probes per attribute (shapes present, counts, colours, a pair's relative position) on the frozen token
  features VQRAE's encoder reads from it (through model.encoder_path, as from a real SigLIP2), against the same
  probes on a randomly initialised encoder of the same shape (the tokenizer's encoder before the world had a SigLIP)
  and on raw pixels, each with its majority answer;
- the Qwen3: it reads an image's description and answers the image's first question (exact match per type).

    python scripts/foundation_report.py     # prints the tables, writes runs/foundation_report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.cli import reported_errors
from common.files import atomic_write
from data.images import build_image_dataset
from data.transforms import ImageTransform
from world.probes import ATTRIBUTES, attribute_probes, lm_reading, read_split, siglip_retrieval

REPO = Path(__file__).resolve().parents[1]


def pixels(split: Path, count: int, size: int) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]: the split's first `count` images, read as the jsonl dataset they are."""
    dataset = build_image_dataset(str(split / "captions.jsonl"), ImageTransform(size, "center"))
    return torch.stack([dataset[i]["pixel_values"] for i in range(min(count, len(dataset)))])


@torch.no_grad()
def features(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Flattened token features (N, tokens * width) of an encoder, in batches."""
    return torch.cat([encoder(x[i : i + 256]).flatten(1) for i in range(0, len(x), 256)])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--split", default="heldout", help="the split measured on (heldout; val to choose settings)")
    parser.add_argument("--probe-train", type=int, default=4000, help="training images of the probes")
    parser.add_argument("--lm-questions", choices=("first", "all"), default="first",
                        help="the Qwen3 reading a description answers each image's first question (as its "
                             "conversations begin) or every question (each asked first, the short-answer prompt)")
    args = parser.parse_args()
    with reported_errors():
        from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipModel, SiglipTokenizer

        from tokenizer import get_preset
        from tokenizer.encoder import VisionEncoder, load_pretrained_encoder

        world = args.runs / "world"
        siglip_dir, lm_dir, split = world / "siglip", world / "qwen3", world / args.split
        for needed in (siglip_dir, lm_dir, split):
            if not needed.exists():
                raise FileNotFoundError(f"{needed} not found: python scripts/prepare_world.py writes it")
        train_metas, test_metas = read_split(world / "train")[: args.probe_train], read_split(split)
        encoder = load_pretrained_encoder(siglip_dir).eval()
        size = encoder.cfg.image_size
        x_train, x_test = pixels(world / "train", args.probe_train, size), pixels(split, len(test_metas), size)
        siglip = SiglipModel.from_pretrained(siglip_dir).eval()
        retrieval = siglip_retrieval(siglip, SiglipTokenizer.from_pretrained(siglip_dir), x_test, test_metas,
                                     siglip.config.text_config.max_position_embeddings)
        torch.manual_seed(0)
        random = VisionEncoder(get_preset("tiny-p4-32").encoder).eval()
        probes = {name: attribute_probes(f(x_train), train_metas, f(x_test), test_metas) for name, f in (
            ("SigLIP (pretrained)", lambda x: features(encoder, x)),
            ("random encoder", lambda x: features(random, x)),
            ("pixels", lambda x: x.flatten(1)))}
        lm = AutoModelForCausalLM.from_pretrained(lm_dir)
        reading = lm_reading(lm, AutoTokenizer.from_pretrained(lm_dir), test_metas, json.loads(
            (world / "data.json").read_text())[args.split]["seed"], questions=args.lm_questions)
    report = {"split": args.split, "images": len(test_metas), "siglip_retrieval": retrieval, "probes": probes,
              "probe_train_images": len(train_metas), "lm_reading": reading, "lm_questions": args.lm_questions}
    with atomic_write(args.runs / "foundation_report.json") as f:
        json.dump(report, f, indent=2)
    print(f"SigLIP zero-shot retrieval on {len(test_metas)} {args.split} images: GenEval prompts "
          f"{retrieval['geneval_prompts']:.3f} (of {retrieval['geneval_prompts_candidates']}), descriptions "
          f"{retrieval['descriptions']:.3f} (of {retrieval['descriptions_candidates']})")
    print("\n| linear probe | " + " | ".join(ATTRIBUTES) + " |\n|---" * 1 + "|---" * len(ATTRIBUTES) + "|")
    for name, row in probes.items():
        print(f"| {name} | " + " | ".join(f"{row[a]:.3f}" for a in ATTRIBUTES) + " |")
    majority = next(iter(probes.values()))
    print("| majority answer | " + " | ".join(f"{majority['majority ' + a]:.3f}" for a in ATTRIBUTES) + " |")
    print("\nQwen3 reading a description, exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in reading.items()))


if __name__ == "__main__":
    main()
