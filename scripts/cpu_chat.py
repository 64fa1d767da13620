"""The CPU default's scripted chat (run after its understanding and generator phases): the first held-out image of
the world with two shapes whose relation a question asks about, its questions asked plainly (existence, count,
position, colour, as its metadata holds them), one drawing and one reconstruction, through scripts/chat.py.

    python scripts/cpu_chat.py              # prints the transcript and writes runs/chat_transcript.txt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common.cli import reported_errors
from common.files import write_atomic
from world.probes import read_split

REPO = Path(__file__).resolve().parents[1]
ASKED = ("existence", "count", "position", "color")  # the order the chat asks in


def script_lines(runs: Path) -> list[str]:
    """The chat's input lines: the image, its questions, a drawing, a reconstruction."""
    split = runs / "world" / "heldout"
    meta = next(m for m in read_split(split) if any(qa["type"] == "position" for qa in m["qa"]))
    image = split / meta["image"]
    shown = image.relative_to(REPO) if image.is_relative_to(REPO) else image
    questions = [next(qa["question"] for qa in meta["qa"] if qa["type"] == kind) for kind in ASKED
                 if any(qa["type"] == kind for qa in meta["qa"])]
    return [f"/image {shown}", *questions, "/draw a photo of a red circle", f"/reconstruct {shown}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    args = parser.parse_args()
    with reported_errors():
        lines = script_lines(args.runs)
    # the chat draws with the generator export's recommended settings (its sampling.json: the run's sample.sampling)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), "--out", str(args.runs / "chat"),
                           "draw.count=4"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=REPO, check=True)
    print(proc.stdout, end="")
    write_atomic(args.runs / "chat_transcript.txt", proc.stdout)


if __name__ == "__main__":
    main()
