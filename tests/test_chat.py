"""scripts/chat.py with tiny real exports (LLaVA, generator, VQRAE): answers, history, streaming, drawing,
reconstruction, settings, bad input, and the script itself driven through stdin."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.transforms import to_pil
from llm.generator import SequenceFormat, save_generator
from llm.sampler import SamplingConfig
from llm.understanding import answer, build_llava, load_llava, reply, save_llava, user_turn
from llm.vocab import build_tiny_qwen3, expand_vocabulary
from scripts.chat import ChatSettings, Models, Session, draw_prompt
from tokenizer import VQRAE, get_preset
from world.shapes import render_sample, shapes_world_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    vqrae = VQRAE(get_preset("tiny-p4-32")).eval()
    vqrae.save_pretrained(root / "tok")
    tokenizer = shapes_world_tokenizer(root / "text")
    lm = build_tiny_qwen3(tokenizer, seed=3)
    with torch.no_grad():  # large weights: long, image-dependent answers
        for p in lm.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    model, processor = build_llava(vqrae, lm, tokenizer)
    save_llava(model, processor, root / "und")
    gen_tok = shapes_world_tokenizer(root / "gen-text")
    gen_lm = build_tiny_qwen3(gen_tok, seed=4)
    vocab = expand_vocabulary(gen_lm, gen_tok, vqrae.config.quantizer.codebook_size)
    save_generator(root / "gen", gen_lm.eval(), gen_tok, vocab, SequenceFormat(), root / "tok")
    image = render_sample(5, 0, 32)[0]
    image.save(root / "scene.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def models(exports):
    return Models(exports / "und", exports / "gen", None, "cpu", torch.float32)


def session(models, tmp_path, **settings) -> tuple[Session, list[str]]:
    chunks: list[str] = []
    s = Session(models, tmp_path, ChatSettings(), sink=chunks.append)
    if settings:
        assert s.handle("/settings " + " ".join(f"{k}={v}" for k, v in settings.items()))["kind"] == "settings"
    return s, chunks


def test_answers_follow_the_model_keep_history_and_stream(models, exports, tmp_path):
    chat, chunks = session(models, tmp_path, **{"answer.max_new_tokens": 12})
    model, processor, _ = models.und
    image = Image.open(exports / "scene.png").convert("RGB")
    first = chat.handle(f"{exports / 'scene.png'} What color is the circle?")  # a path at the start attaches
    assert first["kind"] == "answer" and first["turns"] == 1
    assert first["text"] == answer(model, processor, [image], ["What color is the circle?"], 12, short=False)[0]
    assert first["text"] and "".join(chunks).strip() == first["text"]  # streamed, in order, nothing else
    chunks.clear()
    second = chat.handle("How many squares are there?")
    assert second["turns"] == 2 and "".join(chunks).strip() == second["text"]
    history = [user_turn("What color is the circle?", with_image=True),
               {"role": "assistant", "content": [{"type": "text", "text": first["text"]}]},
               user_turn("How many squares are there?")]
    assert chat.messages[:3] == history  # the image in the first turn only
    assert second["text"] == reply(model, processor, history, image, max_new_tokens=12)
    assert reply(model, processor, history, image, max_new_tokens=2) != second["text"]  # the setting is what acts
    assert chat.handle("/reset")["kind"] == "reset" and chat.messages == [] and chat.image is None


def test_draw_writes_the_generators_images_and_settings_change_them(models, tmp_path):
    chat, _ = session(models, tmp_path, **{"draw.count": 3, "draw.seed": 7, "draw.cfg_scale": 2.0})
    record = chat.handle("draw a photo of a red circle")  # the plain-words rule
    assert record["kind"] == "draw" and record["prompt"] == "a photo of a red circle" and len(record["paths"]) == 3
    expected, _ = models.gen.generate(["a photo of a red circle"] * 3,
                                      SamplingConfig(cfg_scale=2.0, temperature=1.0, seed=7))
    for path, image in zip(record["paths"], expected):
        saved = Image.open(path)
        assert saved.size == (32, 32) and saved.mode == "RGB"
        assert np.array_equal(np.asarray(saved), np.asarray(to_pil(image)))
    assert len(chat.handle("/settings draw.count=1")["settings"]) == 9
    assert len(chat.handle("/draw two squares")["paths"]) == 1


def test_reconstruct_reports_the_psnr_of_what_it_saved(models, exports, tmp_path):
    chat, _ = session(models, tmp_path)
    record = chat.handle(f"/reconstruct {exports / 'scene.png'}")
    assert record["kind"] == "reconstruct" and record["codes"] == 64 and record["codebook_size"] == 512
    original = np.asarray(Image.open(exports / "scene.png").convert("RGB"), np.float64)
    rebuilt = np.asarray(Image.open(record["paths"][0]), np.float64)
    expected = 10 * np.log10(255.0**2 / np.mean((original - rebuilt) ** 2))
    assert record["psnr"] == pytest.approx(expected, abs=1e-4)
    assert f"PSNR {expected:.2f} dB" in record["text"]


@pytest.mark.parametrize("message, prompt", [
    ("draw a photo of a red circle", "a photo of a red circle"),
    ("Please draw me a picture of a cat", "a cat"),
    ("generate an image of two squares", "two squares"),
    ("paint a drawing of a blue triangle", "a blue triangle"),
    ("create three circles", "three circles"),
    ("What would you draw here?", None),
    ("drawing is fun", None),
    ("draw", None),
])
def test_the_drawing_rule(message, prompt):
    assert draw_prompt(message) == prompt


def test_bad_input_is_one_line_and_the_chat_goes_on(exports, tmp_path, monkeypatch):
    understanding_only = Models(exports / "und", None, None, "cpu", torch.float32)
    chat, _ = session(understanding_only, tmp_path)
    for line, cause in [("/image nowhere.png", "no image file"), (f"/image {exports / 'notes.txt'}", "not a readable"),
                        ("/bogus", "unknown command /bogus"), ("/draw a circle", "no generator loaded"),
                        ("/reconstruct x.png", "no VQRAE loaded"), ("/settings draw.top_p=2", "top_p"),
                        ("/settings answer.colour=1", "unknown config key"), ("/image", "needs an argument")]:
        record = chat.handle(line)
        assert record["kind"] == "error" and cause in record["text"] and "\n" not in record["text"], (line, record)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 is then a decompression bomb
    record = chat.handle(f"/image {exports / 'scene.png'}")
    assert record["kind"] == "error" and "too large an image" in record["text"] and "\n" not in record["text"]
    monkeypatch.undo()
    assert chat.handle("Is there a circle in the image?")["kind"] == "answer"  # text-only: no image attached
    assert chat.handle("/quit") is None and chat.handle("") is None


def chat_script(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    code = ("import runpy, sys; sys.argv = ['chat.py', *sys.argv[1:]]; "
            "runpy.run_path('scripts/chat.py', run_name='__main__'); "
            "print('deepspeed imported' if 'deepspeed' in sys.modules else 'no deepspeed', file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_the_script_through_stdin_prints_one_json_object_per_turn(exports, tmp_path):
    lines = [f"/image {exports / 'scene.png'}", "What color is the circle?", "/draw a photo of a circle",
             f"/reconstruct {exports / 'scene.png'}", "/nonsense", "/settings draw.count=1", ""]
    proc = chat_script("--und", str(exports / "und"), "--gen", str(exports / "gen"), "--out", str(tmp_path),
                       "--json", "--device", "cpu", "answer.max_new_tokens=6", "draw.count=2",
                       stdin="\n".join([*lines, "/draw never reached"]) + "\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["image", "answer", "draw", "reconstruct", "error", "settings"]
    assert len(records[2]["paths"]) == 2 and all(Path(p).is_file() for p in records[2]["paths"])
    assert all(r["seconds"] >= 0 for r in records) and "no deepspeed" in proc.stderr


def test_one_unified_export_answers_draws_and_reconstructs(exports, tmp_path):
    from llm.unified import expand_llava, save_unified
    from scripts.chat import add_model_arguments

    model, processor = load_llava(exports / "und")
    vqrae = VQRAE.from_pretrained(exports / "tok")
    vocab = expand_llava(model, processor, vqrae)
    save_unified(tmp_path / "uni", model, processor, vocab, SequenceFormat(), exports / "tok")
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    models = Models.from_arguments(parser.parse_args(["--model", str(tmp_path / "uni"), "--device", "cpu"]))
    shared = {p.data_ptr() for p in models.und[0].parameters()}
    assert {p.data_ptr() for p in models.gen.model.parameters()} <= shared  # loaded once
    assert models.vqrae is models.gen.vqrae
    lines = [f"/image {exports / 'scene.png'}", "What color is the circle?", "draw a photo of a circle",
             f"/reconstruct {exports / 'scene.png'}", ""]
    proc = chat_script("--model", str(tmp_path / "uni"), "--out", str(tmp_path / "out"), "--json", "--device", "cpu",
                       "answer.max_new_tokens=4", "draw.count=1", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["image", "answer", "draw", "reconstruct"]
    with Image.open(records[2]["paths"][0]) as drawn:
        assert drawn.size == (32, 32)
    refused = chat_script("--model", str(exports / "und"), "--device", "cpu")
    assert refused.returncode == 2 and "is not a unified export" in refused.stderr.strip().splitlines()[-1]


def test_wrong_kind_of_export_is_one_line(exports):
    proc = chat_script("--und", str(exports / "gen"), "--device", "cpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("is not an understanding export (it is one for --gen)")


# ----------------------------------------------------------------------------------------------- the web demo

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
def test_web_demo_answers_draws_and_reconstructs_in_a_browser(exports, tmp_path):
    """The page on localhost, driven in headless Chromium: an answer, a gallery of drawings and a reconstruction
    appear. VQRAE_SCREENSHOT=path keeps a screenshot of the page; VQRAE_DEMO_UND / VQRAE_DEMO_GEN serve other
    exports (the README's screenshot: the CPU default's trained ones)."""
    import shutil
    import time
    import urllib.request

    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Debian's chromium package")
    from tests.helpers import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    und = os.environ.get("VQRAE_DEMO_UND", str(exports / "und"))
    gen = os.environ.get("VQRAE_DEMO_GEN", str(exports / "gen"))
    server = subprocess.Popen([sys.executable, "scripts/web_demo.py", "--und", und, "--gen", gen,
                               "--port", str(port), "--out", str(tmp_path / "out"),
                               "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.set_input_files("#und-image input[type=file]", str(exports / "scene.png"))
            page.fill("#question textarea", "What color is the circle?")
            page.click("#ask")
            page.wait_for_function("document.querySelectorAll('#conversation .message').length >= 2", timeout=60_000)
            assert "What color is the circle?" in page.inner_text("#conversation")
            page.get_by_role("tab", name="Generation").click()
            page.click("#draw")
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 4", timeout=60_000)
            page.get_by_role("tab", name="Reconstruction").click()
            page.set_input_files("#rec-image input[type=file]", str(exports / "scene.png"))
            page.click("#reconstruct")
            page.wait_for_function("document.querySelector('#rec-info textarea').value.includes('PSNR')",
                                   timeout=60_000)
            assert "64 codes of 512" in page.input_value("#rec-info textarea")
            assert page.locator("#reconstruction img").count() == 1
            if os.environ.get("VQRAE_SCREENSHOT"):
                page.get_by_role("tab", name="Generation").click()
                page.screenshot(path=os.environ["VQRAE_SCREENSHOT"], full_page=True)
            browser.close()
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert "127.0.0.1" in log and "gradio.live" not in log, log[-2000:]
