"""The CPU default's summary: each phase's headline number next to its baseline, where its outputs are and how long
it took, from what the pipeline wrote (runs/foundation_report.json, runs/cpu_report.json,
runs/understanding_report.json, runs/cpu_phases.tsv).
Prints a markdown table and writes runs/cpu_summary.json.

    python scripts/cpu_summary.py           # the last step of scripts/cpu_demo.sh
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import reported_errors
from common.files import atomic_write

REPO = Path(__file__).resolve().parents[1]


def read_json(path: Path, command: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {command} writes it")
    return json.loads(path.read_text())


def phase_seconds(path: Path) -> dict[str, int]:
    """Phase name -> seconds of its latest run (runs/cpu_phases.tsv, one line per finished phase)."""
    out: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, seconds, *_ = line.split("\t")
            out[name] = int(seconds)
    return out


def number(value: float) -> str:
    """A table's number: two decimals from 10 up (dB, DPG x 100), three for rates, two significant digits below 0.01."""
    if abs(value) >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def summary_rows(runs: Path) -> list[dict]:
    foundation = read_json(runs / "foundation_report.json", "python scripts/foundation_report.py")
    report = read_json(runs / "cpu_report.json", "python scripts/cpu_report.py")
    understanding = read_json(runs / "understanding_report.json", "python scripts/understanding_report.py")
    tok, gen, dpg = report["tokenizer"], report["geneval"], report["dpg"]
    und, captions = understanding["rows"], understanding["stage 1 captions"]
    probes = foundation["probes"]
    pretrained, random, pixels = probes["SigLIP (pretrained)"], probes["random encoder"], probes["pixels"]
    types = ("existence", "count", "color", "position")
    return [
        {"phase": "SigLIP pretraining", "measure": "held-out zero-shot GenEval-prompt retrieval",
         "value": foundation["siglip_retrieval"]["geneval_prompts"],
         "baseline": f"chance about {1 / foundation['siglip_retrieval']['geneval_prompts_candidates']:.3f}",
         "output": "runs/world/siglip"},
        *({"phase": "SigLIP pretraining", "measure": f"held-out linear probe, {a}", "value": pretrained[a],
           "baseline": f"random encoder {random[a]:.3f}, pixels {pixels[a]:.3f}, majority {pretrained['majority ' + a]:.3f}",
           "output": "runs/foundation_report.json"} for a in ("presence", "count", "color", "position")),
        {"phase": "Qwen3 pretraining", "measure": "held-out answers read from a description",
         "value": foundation["lm_reading"]["overall"], "baseline": "", "output": "runs/world/qwen3"},
        {"phase": "tokenizer stage 1 + 2", "measure": "held-out PSNR (dB)", "value": tok["stage 2"]["psnr"],
         "baseline": f"untrained {tok['untrained']['psnr']:.2f}", "output": "runs/tiny-stage2/export"},
        {"phase": "tokenizer stage 1 + 2", "measure": "GenEval of reconstructions", "value": tok["stage 2"]["recon_geneval"],
         "baseline": f"untrained {tok['untrained']['recon_geneval']:.3f}", "output": "runs/tiny-stage2/export"},
        {"phase": "tokenizer stage 2", "measure": "encoder's squared distance to its teacher / teacher feature variance",
         "value": tok["stage 2"]["distillation"]["relative"], "baseline": "", "output": "runs/cpu_report.json"},
        {"phase": "generator", "measure": "GenEval overall (held-out prompts)", "value": gen["trained"]["overall"],
         "baseline": f"untrained {gen['untrained']['overall']:.3f}", "output": "runs/tiny-ar/export"},
        {"phase": "generator", "measure": "DPG-Bench overall (x 100)", "value": dpg["trained"]["overall"],
         "baseline": f"untrained {dpg['untrained']['overall']:.2f}, real images {dpg['real rendered images']['overall']:.2f}",
         "output": "runs/cpu_report_dpg"},
        {"phase": "understanding stage 1", "measure": "held-out captions true of their image", "value": captions["true"],
         "baseline": f"in the caption grammar {captions['in_grammar']:.3f}", "output": "runs/tiny-und-stage1/export"},
        {"phase": "understanding stage 1 + 2", "measure": "held-out exact match", "value": und["stage 2"]["overall"],
         "baseline": f"majority {und['majority answer per type']['overall']:.3f}, blank image "
                     f"{und['stage 2, blank image']['overall']:.3f}", "output": "runs/tiny-und-stage2/export"},
        *({"phase": "understanding stage 1 + 2", "measure": f"held-out exact match, {t} questions",
           "value": und["stage 2"]["types"][t]["accuracy"],
           "baseline": f"majority {und['majority answer per type']['types'][t]['accuracy']:.3f}, blank image "
                       f"{und['stage 2, blank image']['types'][t]['accuracy']:.3f}",
           "output": "runs/understanding_report.json"} for t in types),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    args = parser.parse_args()
    with reported_errors():
        rows = summary_rows(args.runs)
    seconds = phase_seconds(args.runs / "cpu_phases.tsv")
    with atomic_write(args.runs / "cpu_summary.json") as f:
        json.dump({"rows": rows, "phase_seconds": seconds, "total_seconds": sum(seconds.values())}, f, indent=2)
    print("| phase | measure | value | baseline | output |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['measure']} | {number(r['value'])} | {r['baseline']} | `{r['output']}` |")
    if seconds:
        print("\nphase minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()) +
              f"; total {sum(seconds.values()) / 60:.1f} (installation not included)")
    if (args.runs / "chat_transcript.txt").is_file():
        print(f"chat transcript: {args.runs / 'chat_transcript.txt'}")


if __name__ == "__main__":
    main()
