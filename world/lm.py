"""The world's language model: a tiny Qwen3 (transformers' `Qwen3ForCausalLM`) with a byte-level BPE tokenizer of the
world's text (`llm.text_tokenizer.corpus_tokenizer`: Qwen2-style, ChatML markers and template), pretrained on the
world's text and saved as a causal-LM folder (`save_pretrained`) that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read, and that the generator (`lm.pretrained`) and the understanding model
(`model.lm_pretrained`) start from, as the real recipe starts from Qwen3-0.6B.

Its text, drawn per step from a split of the world on disk (captions.jsonl):
- captions: one of an image's captions (world/captions.py's kinds), then the end-of-text token, every token
  supervised (language modelling);
- conversations, in ChatML: the image's description, then its questions (the order and the short-answer instruction
  of the LLaVA export, world/export.py) answered turn by turn, the answers supervised (instruction tuning). The
  description names the relation a position question asks about, so every answer follows from the text: the model
  learns to read a scene and answer about it, what an instruction-tuned LLM brings to LLaVA.

    pretrain_lm("runs/world/train", "runs/world/qwen3", LMPretrainConfig())
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from common.files import atomic_directory
from llm.text_tokenizer import corpus_tokenizer
from llm.understanding import CHAT_FORMATS, SHORT_ANSWER, chat_tokens
from llm.vocab import IGNORE_INDEX, build_tiny_qwen3
from world.captions import CAPTION_KINDS, caption_corpus, caption_kinds, description
from world.export import conversation_order
from world.pretrain import RECORD, PretrainConfig, pretrain
from world.shapes import COLOR_NAMES, question_texts, world_texts


@dataclass
class LMPretrainConfig:
    """Args:
    model: Qwen3Config fields of the tiny Qwen3 (`llm.vocab.build_tiny_qwen3` overrides).
    vocab_size: upper bound of the BPE vocabulary.
    chat_share: the share of steps whose batch is conversations (the others: captions, kinds drawn uniformly).
    run: steps, batch, seed, schedule.
    """

    model: dict = field(default_factory=dict)
    vocab_size: int = 512
    chat_share: float = 0.5
    run: PretrainConfig = field(default_factory=PretrainConfig)


def lm_tokenizer_corpus() -> list[str]:
    """The BPE tokenizer's corpus: every GenEval prompt of the world, every group of every caption kind, every
    question, the short-answer instruction and every answer word."""
    answers = [*COLOR_NAMES, *(str(n) for n in range(5)), "yes", "no"]
    return [*world_texts(), *caption_corpus(), *question_texts(), SHORT_ANSWER.strip(), " ".join(answers)]


def scene_text(meta: dict) -> str:
    """What the LM reads in place of an image: its description, naming the relation its position question asks
    about (`world.captions.description` with that pair)."""
    position = [qa["pair"] for qa in meta["qa"] if qa["type"] == "position"]
    return description(meta["objects"], tuple(position[0]) if position else None)


def conversation(meta: dict, seed: int, index: int) -> list[dict[str, str]]:
    """An image's questions as a ChatML conversation whose first user turn holds its description (`scene_text`)
    instead of the image: the questions in the LLaVA export's order, with its short-answer instruction or without."""
    order, short = conversation_order(len(meta["qa"]), seed, index)
    context = scene_text(meta)
    messages = []
    for k, j in enumerate(order):
        qa = meta["qa"][j]
        text = (context + "\n" if k == 0 else "") + qa["question"] + (SHORT_ANSWER if short else "")
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": qa["answer"]}]
    return messages


class WorldText:
    """A split's documents, tokenized once: per image, one caption document of each kind (every token supervised)
    and one conversation (its answers supervised)."""

    def __init__(self, split: Path, tokenizer: PreTrainedTokenizerBase, seed: int, progress: bool = True):
        with open(split / "captions.jsonl", encoding="utf-8") as f:
            metas = [json.loads(line) for line in f]
        eos = tokenizer.eos_token_id
        captions = [caption_kinds(m)[k] for m in metas for k in CAPTION_KINDS]
        ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
        self.captions = [([*row, eos], [*row, eos]) for row in ids]  # index: image * len(CAPTION_KINDS) + kind
        self.chats = [chat_tokens(tokenizer, conversation(m, seed, i), CHAT_FORMATS["chatml"].template)
                      for i, m in enumerate(tqdm(metas, desc="conversations", disable=not progress))]
        self.pad = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.chats)

    def batch(self, generator: torch.Generator, size: int, chat_share: float) -> dict[str, torch.Tensor]:
        """`size` documents drawn with replacement, all conversations (with probability `chat_share`) or all captions
        of kinds drawn per document (a batch of one kind wastes little on padding), right-padded, with their labels
        (padding ignored)."""
        index = torch.randint(0, len(self), (size,), generator=generator).tolist()
        if torch.rand((), generator=generator).item() < chat_share:
            docs = [self.chats[i] for i in index]
        else:
            kind = torch.randint(0, len(CAPTION_KINDS), (size,), generator=generator).tolist()
            docs = [self.captions[i * len(CAPTION_KINDS) + k] for i, k in zip(index, kind)]
        length = max(len(ids) for ids, _ in docs)
        ids = torch.full((size, length), self.pad, dtype=torch.long)
        labels = torch.full((size, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(size, length, dtype=torch.long)
        for row, (doc, supervised) in enumerate(docs):
            ids[row, : len(doc)] = torch.tensor(doc)
            labels[row, : len(doc)] = torch.tensor(supervised)
            mask[row, : len(doc)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain_lm(split: str | Path, out_dir: str | Path, cfg: LMPretrainConfig, world_seed: int, work_dir: str | Path,
                record: dict, progress: bool = True) -> Path:
    """Train the world's Qwen3 on a split of the world on disk (whose world seed is `world_seed`) and save it as a
    causal-LM folder with its tokenizer (atomically, with `record` in its pretraining.json); resumes from `work_dir`.
    Returns `out_dir`."""
    split, out_dir, work_dir = Path(split), Path(out_dir), Path(work_dir)
    tokenizer = corpus_tokenizer(lm_tokenizer_corpus(), work_dir / "tokenizer", cfg.vocab_size)
    text = WorldText(split, tokenizer, world_seed, progress)
    model = build_tiny_qwen3(tokenizer, seed=cfg.run.seed, **cfg.model)

    def loss_fn(generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return model(**text.batch(generator, cfg.run.batch_size, cfg.chat_share)).loss, {}

    pretrain(model, loss_fn, cfg.run, work_dir, "lm pretraining", progress)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir
