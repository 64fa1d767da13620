"""lmms-eval's own code run on an understanding export, as the oracle our evaluator must equal: its `llava_hf` model
class (the way an lmms-eval user evaluates a transformers LLaVA checkpoint: the tokenizer's chat template, the
processor, greedy `generate` stopping at the tokenizer's EOS, one question a batch) and its MME and POPE task
functions (prompt, `process_results`, aggregation), with the generation settings and prompt options read from its
task yaml files. No dataset is downloaded: the documents are given, in the fields its tasks read.

    scores = run_lmms_eval("runs/tiny-und-stage2/export", {"mme": mme_docs, "pope": pope_docs})

Needs `pip install -e ".[lmms]"` (lmms-eval, decord).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

TASK_METRICS = {"mme": ("mme_perception_score",),
                "pope": ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")}


def task_yaml(task: str) -> dict[str, Any]:
    """lmms-eval's `{task}.yaml`, its `!function utils.name` values read as the name."""
    package = importlib.import_module(f"lmms_eval.tasks.{task}")
    loader = type("TaskLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda load, node: load.construct_scalar(node).split(".", 1)[1])
    return yaml.load((Path(package.__path__[0]) / f"{task}.yaml").read_text(), Loader=loader)


def run_lmms_eval(model_dir: str | Path, docs: Mapping[str, Sequence[dict]], device: str = "cpu") -> dict[str, Any]:
    """Per task ("mme", "pope"): lmms-eval's predictions (one per document, in order) and its aggregated metrics.

    Args:
        model_dir: a transformers LLaVA export folder.
        docs: task -> documents with the fields the task reads (MME: question_id shared by an image's pair,
            question, answer "Yes" / "No", category, image (PIL); POPE: question_id, question, answer, category,
            image).
        device: where lmms-eval's model runs.
    """
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.simple.llava_hf import LlavaHf

    # device_map: its default "" is refused by transformers 5 (from_pretrained wants a device name)
    model = LlavaHf(pretrained=str(model_dir), device=device, device_map=device, dtype="float32")
    model.task_dict = {task: {"test": list(d)} for task, d in docs.items()}
    out = {}
    for task, task_docs in docs.items():
        config = task_yaml(task)
        utils = importlib.import_module(f"lmms_eval.tasks.{task}.utils")
        to_text, to_visual = getattr(utils, config["doc_to_text"]), getattr(utils, config["doc_to_visual"])
        prompt = config["lmms_eval_specific_kwargs"]["default"]
        requests = [Instance("generate_until", (to_text(doc, prompt), copy.deepcopy(config["generation_kwargs"]),
                                                to_visual, i, task, "test"), idx=0,
                             metadata={"task": task, "doc_id": i, "repeats": 1})
                    for i, doc in enumerate(task_docs)]
        predictions = model.generate_until(requests)
        processed = [getattr(utils, config["process_results"])(doc, [p]) for doc, p in zip(task_docs, predictions)]
        aggregations = {m["metric"]: getattr(utils, m["aggregation"]) for m in config["metric_list"]}
        metrics = {}
        for name in TASK_METRICS[task]:
            values = [r[name] for r in processed if name in r]
            metrics[name] = aggregations[name](values)
        out[task] = {"predictions": predictions, "metrics": metrics,
                     "max_new_tokens": config["generation_kwargs"]["max_new_tokens"], "prompt": prompt}
    return out
