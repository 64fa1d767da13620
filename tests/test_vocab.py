"""Text tokenizer, vocabulary expansion and the generation sequence format."""

import dataclasses
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from llm.text_tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    tokenizer_fingerprint,
    train_text_tokenizer,
)
from llm.vocab import (
    FALLBACK_CHAT,
    IGNORE_INDEX,
    IMAGE_END,
    IMAGE_START,
    PAD_FALLBACK,
    VOCAB_FILE,
    ImageVocab,
    build_prompt_ids,
    build_sequence,
    build_tiny_qwen3,
    caption_problem,
    code_token,
    codebook_rows,
    expand_vocabulary,
    image_prefix_ids,
    unconditional_prompt_ids,
)
from world.shapes import shapes_world_tokenizer, world_texts

CAPTIONS = ["a photo of a red square", "a photo of three circles", "a photo of a triangle left of a circle"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "shapes"
    shapes_world_tokenizer(out)
    return out


def fresh(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_offline_as_qwen2_and_round_trips(tok_dir):
    tok = fresh(tok_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN and tok.eos_token_id != tok.pad_token_id
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    for text in [*CAPTIONS, "Zebra 123, ünïcode ✓ and\nnewlines"]:  # byte-level: any text encodes losslessly
        assert tok.decode(tok(text)["input_ids"]) == text
    # BPE learned the world's words: a caption is a handful of tokens, not one per byte
    assert len(tok(CAPTIONS[0])["input_ids"]) < len(CAPTIONS[0]) / 2


def test_tokenizer_is_deterministic_and_validates(tmp_path, tok_dir):
    again = shapes_world_tokenizer(tmp_path / "again")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(fresh(tok_dir))
    other = train_text_tokenizer(world_texts()[:50], tmp_path / "small", vocab_size=300)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(again) and len(other) <= 300
    with pytest.raises(ValueError, match="non-empty"):
        train_text_tokenizer([], tmp_path / "x")
    with pytest.raises(ValueError, match="vocab_size"):
        train_text_tokenizer(["abc"], tmp_path / "x", vocab_size=100)


# ----------------------------------------------------------------------------------------------- expansion


@pytest.mark.parametrize("tied", [True, False])
def test_mean_expansion_keeps_text_and_initialises_new_rows(tok_dir, tied):
    tok = fresh(tok_dir)
    model = build_tiny_qwen3(tok, tie_word_embeddings=tied)
    before_ids = [tok(c)["input_ids"] for c in CAPTIONS]
    text = len(tok)
    w_in = model.get_input_embeddings().weight.detach().clone()
    w_out = model.get_output_embeddings().weight.detach().clone()

    vocab = expand_vocabulary(model, tok, codebook_size=100, pad_to_multiple_of=64)
    assert [tok(c)["input_ids"] for c in CAPTIONS] == before_ids  # text tokenization unchanged
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == vocab.embedding_rows == model.config.vocab_size and new_in.shape[0] % 64 == 0
    assert new_in.shape[0] >= len(tok) == text + 2 + 100
    assert torch.equal(new_in[:text], w_in[:text]) and torch.equal(new_out[:text], w_out[:text])
    assert torch.allclose(new_in[text:], w_in[:text].mean(0).expand(new_in.shape[0] - text, -1), atol=1e-6)
    assert torch.allclose(new_out[text:], w_out[:text].mean(0).expand(new_in.shape[0] - text, -1), atol=1e-6)
    assert (new_in.data_ptr() == new_out.data_ptr()) == tied
    # codes: contiguous ids right after the two markers
    assert tok.convert_tokens_to_ids([IMAGE_START, IMAGE_END]) == [text, text + 1]
    assert tok.convert_tokens_to_ids([code_token(i, 100) for i in range(100)]) == list(range(text + 2, text + 102))
    assert vocab.code_range == (text + 2, text + 102) and vocab.pad_id == tok.pad_token_id
    assert tok.decode([vocab.code_offset + 42]) == "<|img_00042|>"


def test_a_head_stored_apart_from_a_tied_config_gets_the_input_rows_after_transformers_reties_it(tok_dir):
    """A checkpoint whose config ties the embeddings but whose head is a separate tensor: transformers re-ties them
    when resizing, so the new rows are the input rows' mean, never overwritten by the stale head's mean."""
    tok = fresh(tok_dir)
    model = build_tiny_qwen3(tok, tie_word_embeddings=True)
    text = len(tok)
    w_in = model.get_input_embeddings().weight.detach().clone()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(w_in) + 5.0)  # untied, far from the input rows
    expand_vocabulary(model, tok, codebook_size=10)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.data_ptr() == new_out.data_ptr()
    assert torch.allclose(new_in[text:], w_in[:text].mean(0).expand(new_in.shape[0] - text, -1), atol=1e-6)


def test_codebook_init_is_a_scaled_linear_map_of_the_codebook(tok_dir):
    tok = fresh(tok_dir)
    model = build_tiny_qwen3(tok, tie_word_embeddings=False)
    text_rows = model.get_input_embeddings().weight[: len(tok)].detach().clone()
    text_out = model.get_output_embeddings().weight[: len(tok)].detach().clone()
    codebook = torch.randn(50, 24)
    codebook[2] = codebook[0] + 3 * codebook[1]  # linear relations must survive
    codebook[3] = codebook[4]
    vocab = expand_vocabulary(model, tok, 50, init="codebook", codebook=codebook)
    rows = model.get_input_embeddings().weight[vocab.code_offset : vocab.code_end]
    scale = rows.norm(dim=1).mean() / text_rows.norm(dim=1).mean()
    assert torch.allclose(scale, torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(rows[2], rows[0] + 3 * rows[1], atol=1e-5) and torch.equal(rows[3], rows[4])
    assert not torch.allclose(rows[0], rows[1])
    assert torch.equal(rows, codebook_rows(codebook, text_rows, seed=0))  # deterministic for a seed
    gaussian = torch.randn(24, text_rows.shape[1], generator=torch.Generator().manual_seed(0))
    expected = codebook @ gaussian
    expected *= text_rows.norm(dim=1).mean() / expected.norm(dim=1).mean()
    torch.testing.assert_close(rows, expected)  # the codebook through a seeded Gaussian map, at the text rows' norm
    torch.testing.assert_close(codebook_rows(codebook * 1e-4, text_rows), rows)  # whatever the codebook's scale
    assert not torch.allclose(rows, codebook_rows(codebook, text_rows, seed=1))
    out_rows = model.get_output_embeddings().weight[vocab.code_offset : vocab.code_end]
    assert torch.allclose(out_rows, text_out.mean(0).expand_as(out_rows), atol=1e-6)  # untied head: mean
    assert vocab.init == "codebook"


def test_a_one_code_vocabulary_and_the_tokenizer_check(tok_dir):
    tok = fresh(tok_dir)
    vocab = expand_vocabulary(build_tiny_qwen3(tok), tok, 1)
    assert vocab.code_range == (len(tok) - 1, len(tok)) and tok.convert_tokens_to_ids(code_token(0, 1)) == len(tok) - 1
    vocab.check_tokenizer(tok)  # its first and last code are the same token
    # image tokens are special: a decode that skips special tokens (the chat's streamer) keeps only the text
    ids = [*tok("a red square")["input_ids"], vocab.image_start_id, vocab.code_offset, vocab.image_end_id]
    assert tok.decode(ids, skip_special_tokens=True) == "a red square"
    for pad in (vocab.pad_id - 1, vocab.pad_id + 1):
        with pytest.raises(ValueError, match="does not match the image vocabulary"):
            dataclasses.replace(vocab, pad_id=pad).check_tokenizer(tok)


def test_a_checkpoints_padding_rows_are_kept_and_an_untied_head_found_wherever_it_lies(tok_dir):
    """A checkpoint with more rows than tokens (Qwen's 151936 for 151669) keeps them; an untied head is told from a
    tied one by identity, not by where its memory lies."""
    tok = fresh(tok_dir)
    text = len(tok)
    model = build_tiny_qwen3(tok, tie_word_embeddings=False, vocab_size=text + 300)
    out_first = torch.randn(2 * (text + 300), 64)  # the head's rows at the lower address
    model.get_output_embeddings().weight = torch.nn.Parameter(out_first[: text + 300])
    model.get_input_embeddings().weight = torch.nn.Parameter(out_first[text + 300 :])
    w_out = model.get_output_embeddings().weight.detach().clone()
    vocab = expand_vocabulary(model, tok, 16)
    rows = -(-(text + 300) // 64) * 64  # all of the checkpoint's rows, padded to a multiple of 64
    assert vocab.embedding_rows == rows == model.get_input_embeddings().weight.shape[0]
    out = model.get_output_embeddings().weight[text:]
    assert torch.allclose(out, w_out[:text].mean(0).expand_as(out), atol=1e-6)


def test_codebook_init_of_a_tied_model_is_its_output_rows_too(tok_dir):
    tok = fresh(tok_dir)
    model = build_tiny_qwen3(tok, tie_word_embeddings=True)
    text_rows = model.get_input_embeddings().weight[: len(tok)].detach().clone()
    codebook = torch.randn(300, 24)  # past 256: sizes compared by value
    vocab = expand_vocabulary(model, tok, 300, init="codebook", codebook=codebook)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    rows = model.get_output_embeddings().weight[vocab.code_offset : vocab.code_end]
    assert torch.equal(rows, codebook_rows(codebook, text_rows))  # not reset to the mean as an untied head's
    dead = codebook_rows(torch.zeros(4, 24), text_rows)  # a codebook of zeros gives zero rows, not NaN
    assert torch.equal(dead, torch.zeros(4, text_rows.shape[1]))
    default = build_tiny_qwen3(tok)  # tied, as Qwen3-0.6B
    assert default.get_output_embeddings().weight is default.get_input_embeddings().weight


def test_expansion_errors_and_pad_fallback(tok_dir, tmp_path):
    tok = fresh(tok_dir)
    model = build_tiny_qwen3(tok)
    with pytest.raises(ValueError, match="codebook"):
        expand_vocabulary(model, tok, 16, init="codebook")
    with pytest.raises(ValueError, match="shape"):
        expand_vocabulary(model, tok, 16, init="codebook", codebook=torch.zeros(8, 4))
    with pytest.raises(ValueError, match="init"):
        expand_vocabulary(model, tok, 16, init="zeros")
    expand_vocabulary(model, tok, 16)
    with pytest.raises(ValueError, match="already expanded"):
        expand_vocabulary(model, tok, 16)

    # a tokenizer without a pad token gets one
    nopad = train_text_tokenizer(CAPTIONS, tmp_path / "nopad", vocab_size=300)
    nopad.pad_token = None
    vocab = expand_vocabulary(build_tiny_qwen3(nopad), nopad, 8)
    assert nopad.pad_token == PAD_FALLBACK and vocab.pad_id == nopad.convert_tokens_to_ids(PAD_FALLBACK)

    # ids read back from JSON (ints past 256 are then other objects) still match the tokenizer
    big = fresh(tok_dir)
    big.pad_token = big.convert_ids_to_tokens(300)
    vocab = expand_vocabulary(build_tiny_qwen3(big), big, 8)
    vocab.save(tmp_path)
    assert vocab.pad_id == 300
    ImageVocab.load(tmp_path).check_tokenizer(big)

    # a tokenizer that already holds one of the code names cannot give the codes contiguous ids
    clash = fresh(tok_dir)
    clash.add_tokens(["<|img_00003|>"])
    with pytest.raises(RuntimeError, match="contiguous ids"):
        expand_vocabulary(build_tiny_qwen3(clash), clash, 16)


def test_expansion_arguments_padding_and_token_names(tok_dir):
    tok = fresh(tok_dir)
    model = build_tiny_qwen3(tok)
    for size in (0, -1):
        with pytest.raises(ValueError, match=f"codebook_size must be positive, got {size}"):
            expand_vocabulary(model, tok, size)
    with pytest.raises(ValueError, match="only it accepts one"):  # a codebook is refused by the mean init
        expand_vocabulary(model, tok, 16, init="mean", codebook=torch.zeros(16, 4))
    with pytest.raises(ValueError, match=r"shape \(16, D\)"):  # one row per code, no more
        expand_vocabulary(model, tok, 16, init="codebook", codebook=torch.zeros(17, 4))
    for shape in ((16,), (16, 4, 1)):  # a matrix
        with pytest.raises(ValueError, match=rf"shape \(16, D\), got {re.escape(str(shape))}"):
            expand_vocabulary(model, tok, 16, init="codebook", codebook=torch.zeros(shape))
    with pytest.raises(ValueError, match=f"{len(tok) - 1} embedding rows but the tokenizer {len(tok)} tokens"):
        expand_vocabulary(build_tiny_qwen3(tok, vocab_size=len(tok) - 1), tok, 16)
    vocab = expand_vocabulary(model, tok, 100)  # rows padded to the next multiple of 64 by default
    assert vocab.embedding_rows % 64 == 0 and vocab.code_end <= vocab.embedding_rows < vocab.code_end + 64
    assert model.get_input_embeddings().weight.shape[0] == vocab.embedding_rows
    # code names: zero-padded to 5 digits, wider only past 99999 codes
    assert [code_token(42, k) for k in (100, 16384, 100000)] == ["<|img_00042|>"] * 3
    assert code_token(42, 100001) == "<|img_000042|>"


def test_captions_holding_image_or_special_token_strings_are_named(tok_dir):
    tok = fresh(tok_dir)
    assert caption_problem("a photo of a red square", tok) is None
    assert caption_problem(3, tok) == "captions must be strings, got int"
    assert caption_problem("a <|img_00007|> square", tok) == "caption contains the image token string '<|img_00007|>'"
    for special in tok.all_special_tokens:
        assert caption_problem(f"a red {special} square", tok) == f"caption contains the special token string {special!r}"


def test_real_qwen3_directory_round_trip(tok_dir, tmp_path):
    """Save a (tiny) Qwen3 + tokenizer as a checkpoint folder, load it the way a real one is loaded, expand, save the
    expanded model with image_vocab.json and reload all three."""
    tok = fresh(tok_dir)
    build_tiny_qwen3(tok, tie_word_embeddings=False).save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3")
    tok = AutoTokenizer.from_pretrained(tmp_path / "qwen3")
    assert isinstance(model, Qwen3ForCausalLM)
    vocab = expand_vocabulary(model, tok, 64)

    model.save_pretrained(tmp_path / "expanded")
    tok.save_pretrained(tmp_path / "expanded")
    vocab.save(tmp_path / "expanded")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "expanded")
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "expanded")
    loaded_vocab = ImageVocab.load(tmp_path / "expanded")
    assert loaded_vocab == vocab
    loaded_vocab.check_tokenizer(loaded_tok)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    with pytest.raises(ValueError, match="does not match"):
        loaded_vocab.check_tokenizer(fresh(tok_dir))


# ----------------------------------------------------------------------------------------------- ImageVocab


def test_image_vocab_mapping_and_json(tmp_path):
    vocab = ImageVocab(codebook_size=10, code_offset=100, image_start_id=98, image_end_id=99, pad_id=1,
                       text_vocab_size=98, embedding_rows=128)
    codes = torch.tensor([[0, 9], [3, 4]])
    assert torch.equal(vocab.code_to_token(codes), codes + 100)
    assert torch.equal(vocab.token_to_code(vocab.code_to_token(codes)), codes)
    assert vocab.is_code(torch.tensor([99, 100, 109, 110, 111])).tolist() == [False, True, True, False, False]
    with pytest.raises(ValueError, match="not image codes"):
        vocab.token_to_code(torch.tensor([100, 110]))
    for outside in (10, 11, -1):
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            vocab.code_to_token(torch.tensor([outside]))
    vocab.save(tmp_path)
    assert json.loads((tmp_path / VOCAB_FILE).read_text())["code_offset"] == 100
    assert ImageVocab.load(tmp_path) == vocab
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE):
        ImageVocab.load(tmp_path / "missing")
    for inside in (100, 105):
        with pytest.raises(ValueError, match="inside the code id range"):
            ImageVocab(codebook_size=10, code_offset=100, image_start_id=inside, image_end_id=99, pad_id=1,
                       text_vocab_size=98, embedding_rows=128)
    with pytest.raises(ValueError, match="rows"):
        ImageVocab(codebook_size=10, code_offset=120, image_start_id=98, image_end_id=99, pad_id=1,
                   text_vocab_size=98, embedding_rows=128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vocab.code_offset = 0
    ImageVocab(codebook_size=1, code_offset=0, image_start_id=1, image_end_id=2, pad_id=3, text_vocab_size=0,
               embedding_rows=1)  # the smallest: specials right after the one code
    for size, offset in ((0, 100), (-1, 100), (10, -1)):
        with pytest.raises(ValueError, match="invalid ImageVocab"):
            ImageVocab(codebook_size=size, code_offset=offset, image_start_id=98, image_end_id=99, pad_id=1,
                       text_vocab_size=98, embedding_rows=128)


# ----------------------------------------------------------------------------------------------- sequences


@pytest.fixture(scope="module")
def expanded(tok_dir):
    tok = fresh(tok_dir)
    model = build_tiny_qwen3(tok, tie_word_embeddings=False)
    vocab = expand_vocabulary(model, tok, 32)
    return tok, model, vocab


def test_prompt_templates(expanded, tok_dir, tmp_path):
    tok, _, _ = expanded
    caption = CAPTIONS[1]
    assert build_prompt_ids(tok, caption) == tok(caption)["input_ids"]
    chat = tok.decode(build_prompt_ids(tok, caption, "chat"))
    assert chat == f"<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n"
    plain_tok = train_text_tokenizer(CAPTIONS, tmp_path / "nochat", vocab_size=300, chat_template=None)
    assert tok.decode(build_prompt_ids(plain_tok, caption, "chat")) != chat
    assert plain_tok.decode(build_prompt_ids(plain_tok, caption, "chat")) == f"User: {caption}\nAssistant:"
    assert build_prompt_ids(plain_tok, caption, "chat", FALLBACK_CHAT) == build_prompt_ids(plain_tok, caption, "chat")
    # a pinned template wins over the tokenizer's own
    assert tok.decode(build_prompt_ids(tok, caption, "chat", FALLBACK_CHAT)) == f"User: {caption}\nAssistant:"
    for template in ("alpaca", "vicuna"):  # sorting before and after "plain"
        with pytest.raises(ValueError, match="template"):
            build_prompt_ids(tok, caption, template)


def test_unconditional_prompts(expanded):
    tok, _, vocab = expanded
    plain = build_prompt_ids(tok, CAPTIONS[2])
    assert unconditional_prompt_ids(tok, plain, vocab) == [vocab.pad_id] * len(plain)  # Janus: same length
    chat = build_prompt_ids(tok, CAPTIONS[2], "chat")
    uncond = unconditional_prompt_ids(tok, chat, vocab, template="chat")
    specials = set(tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    assert len(uncond) == len(chat)
    assert all((u == c) if c in specials else (u == vocab.pad_id) for u, c in zip(uncond, chat))
    # the unconditional prompt is the same for every caption of the same token length
    red, blue = (build_prompt_ids(tok, f"a photo of a {c} square", "chat") for c in ("red", "blue"))
    assert red != blue and len(red) == len(blue)
    assert unconditional_prompt_ids(tok, red, vocab, template="chat") == unconditional_prompt_ids(
        tok, blue, vocab, template="chat")
    assert unconditional_prompt_ids(tok, chat, vocab, "empty", "chat") == build_prompt_ids(tok, "", "chat")
    assert unconditional_prompt_ids(tok, plain, vocab, "empty") == []
    for mode in ("blank", "null", "zeros"):  # sorting before "empty", between, after "pad"
        with pytest.raises(ValueError, match="unconditional mode"):
            unconditional_prompt_ids(tok, plain, vocab, mode)


def test_the_tokenizer_check_reads_the_codes(expanded):
    tok, _, vocab = expanded
    vocab.check_tokenizer(tok)
    shifted = dataclasses.replace(vocab, code_offset=vocab.code_offset + 1)  # markers and pad where they are
    assert shifted.code_end <= shifted.embedding_rows
    with pytest.raises(ValueError, match="does not match the image vocabulary"):
        shifted.check_tokenizer(tok)


def test_options_read_from_a_config_are_compared_by_value(expanded, tok_dir):
    """Strings built at run time (a YAML value, a CLI flag) are equal to, never the same object as, the literals."""
    tok, _, vocab = expanded
    chat, plain, pad, empty = ("".join(parts) for parts in (("ch", "at"), ("pl", "ain"), ("p", "ad"), ("em", "pty")))
    assert chat == "chat" and chat is not sys.intern("chat")
    prompt = build_prompt_ids(tok, CAPTIONS[0], chat)
    assert prompt == build_prompt_ids(tok, CAPTIONS[0], "chat")
    assert build_prompt_ids(tok, CAPTIONS[0], plain) == build_prompt_ids(tok, CAPTIONS[0], "plain")
    assert unconditional_prompt_ids(tok, prompt, vocab, pad, chat) == unconditional_prompt_ids(tok, prompt, vocab)
    assert unconditional_prompt_ids(tok, prompt, vocab, empty, chat) == build_prompt_ids(tok, "", "chat")
    fresh_tok = fresh(tok_dir)
    model = build_tiny_qwen3(fresh_tok)
    codebook = torch.randn(8, 4)
    text_rows = model.get_input_embeddings().weight[: len(fresh_tok)].detach().clone()
    new = expand_vocabulary(model, fresh_tok, 8, init="".join(("code", "book")), codebook=codebook)
    rows = model.get_input_embeddings().weight[new.code_offset : new.code_end]
    assert new.init == "codebook" and torch.equal(rows, codebook_rows(codebook, text_rows))


def test_sequence_layout_and_labels_match_the_models_loss(expanded):
    tok, model, vocab = expanded
    prompt = build_prompt_ids(tok, CAPTIONS[0])
    codes = torch.randint(0, vocab.codebook_size, (4, 4))
    input_ids, labels = build_sequence(prompt, codes, vocab)
    n = len(prompt)
    assert input_ids.tolist() == [*prompt, vocab.image_start_id, *(codes.flatten() + vocab.code_offset).tolist(),
                                  vocab.image_end_id]
    assert input_ids[: n + 1].tolist() == image_prefix_ids(prompt, vocab)
    assert (labels[: n + 1] == IGNORE_INDEX).all() and torch.equal(labels[n + 1 :], input_ids[n + 1 :])
    # transformers shifts labels itself: its loss is the mean cross-entropy of predicting codes and <|image_end|>
    with torch.no_grad():
        out = model(input_ids=input_ids[None], labels=labels[None])
    logits = out.logits[0, n:-1]  # positions that predict tokens n+1 .. end
    manual = F.cross_entropy(logits.float(), input_ids[n + 1 :])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    with pytest.raises(ValueError):
        build_sequence(prompt, torch.tensor([vocab.codebook_size]), vocab)
