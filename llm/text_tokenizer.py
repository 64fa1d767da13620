"""Small byte-level BPE text tokenizers trained locally, loadable offline as Qwen2-style tokenizers.

Real runs use the LLM's own tokenizer (`AutoTokenizer.from_pretrained(qwen3_dir)`). Tests and the CPU default need a
tokenizer without downloads: `train_text_tokenizer` trains a byte-level BPE with `tokenizers` using Qwen2's
pre-tokenizer (transformers' own split regex, so the merges match what `Qwen2Tokenizer` applies), saves vocab.json +
merges.txt + tokenizer_config.json naming `Qwen2Tokenizer`, and reloads the folder through `AutoTokenizer`. Any text
encodes (byte-level alphabet).

    tok = corpus_tokenizer(captions, "runs/tokenizers/shapes")  # then AutoTokenizer.from_pretrained(that folder)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from common.files import atomic_directory

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS)  # ids 0..3, in this order
# ChatML, the format of Qwen's own chat template, without the tool/thinking branches.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERIC_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Hello, world! What is in this image? Describe it in one sentence.",
    "user assistant system: yes no left right above below and or of a an the",
)


def train_text_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, min_frequency: int = 1,
    chat_template: str | None = CHATML_TEMPLATE,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on `texts`, save it as a Qwen2-style tokenizer in `out_dir` (atomically), reload it.

    Special tokens: "<|endoftext|>" (eos, id 0), "<|pad|>" (pad, id 1), "<|im_start|>", "<|im_end|>" (ChatML).
    The vocabulary may end up smaller than `vocab_size` when the texts admit no more merges.

    Args:
        texts: training texts (deterministic order gives a deterministic tokenizer).
        out_dir: folder to write vocab.json, merges.txt, tokenizer_config.json (replaced if it exists).
        vocab_size: upper bound on the vocabulary size, at least 256 bytes + the special tokens.
        min_frequency: a pair must occur this often to be merged.
        chat_template: jinja chat template stored in tokenizer_config.json; None for a tokenizer without one.
    """
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("train_text_tokenizer needs a non-empty iterable of strings")
    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be at least {smallest} (256 bytes + special tokens), got {vocab_size}")

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "bos_token": None,
        "additional_special_tokens": list(CHAT_TOKENS),
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        bpe.model.save(str(tmp))  # vocab.json + merges.txt
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(str(out_dir))


def corpus_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 512
                     ) -> PreTrainedTokenizerBase:
    """A small tokenizer for a caption corpus (the CPU default's): a BPE trained on `texts` followed by a few generic
    strings (chat words, digits), deterministic for the same texts and vocab size.

    Args:
        texts: the captions, in a fixed order.
        out_dir: where to save it; None writes to a fresh temporary folder (the tokenizer is returned loaded).
        vocab_size: upper bound on the vocabulary size.
    """
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="corpus-tokenizer-")) / "tokenizer"
    return train_text_tokenizer([*texts, *GENERIC_TEXTS], out_dir, vocab_size=vocab_size)


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 400
                                  ) -> PreTrainedTokenizerBase:
    """A LLaMA-family tokenizer (sentencepiece BPE with byte fallback, `<unk>` 0, `<s>` 1, `</s>` 2, no pad, BOS added
    as LLaMA's is) trained offline on `texts`: `tokenizer.model` + `tokenizer_config.json` naming `LlamaTokenizer`,
    written atomically and reloaded through `AutoTokenizer`. The tokenizer of a Vicuna / LLaMA-2 checkpoint, in
    miniature (tests and experiments; real runs load the LLM's own).

    Args:
        texts: training sentences (deterministic order gives a deterministic model).
        out_dir: the folder to write (replaced if it exists).
        vocab_size: the sentencepiece vocabulary size, bytes (256) and the three special pieces included.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece_tokenizer needs non-empty texts")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tmp / "sp"), vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2)
        (tmp / "sp.model").rename(tmp / "tokenizer.model")
        for name in ("sp.vocab", "corpus.txt"):
            (tmp / name).unlink()
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": None, "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
                  "clean_up_tokenization_spaces": False}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(str(out_dir))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id), to check that two tokenizers agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

