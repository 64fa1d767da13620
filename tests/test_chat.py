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
from demo.chat import ChatSettings, Models, Session, draw_prompt
from llm.generator import SequenceFormat, save_generator
from llm.sampler import SamplingConfig
from llm.understanding import answer, build_llava, load_llava, reply, save_llava, user_turn
from llm.vocab import build_tiny_qwen3, expand_vocabulary
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
    shown = chat.handle("/settings draw.count=1 draw.spec_window=4")["settings"]
    assert set(shown) == {"answer.temperature", "answer.top_p", "answer.max_new_tokens"} | {
        f"draw.{k}" for k in ("cfg_scale", "temperature", "top_k", "top_p", "seed", "spec_window", "spec_init", "count")}
    assert (shown["draw.count"], shown["draw.spec_window"]) == (1, 4)
    assert len(chat.handle("/draw two squares")["paths"]) == 1


def test_help_lists_every_command_and_setting(models, tmp_path):
    chat, _ = session(models, tmp_path)
    record = chat.handle("/help")
    assert record["kind"] == "help"
    commands = ("/image", "/draw", "/reconstruct", "/settings", "/reset", "/help", "/quit")
    assert all(c in record["text"] for c in commands)
    settings = chat.handle("/settings")["settings"]
    assert all(name in record["text"] for name in settings)


def test_reconstruct_reports_the_psnr_of_what_it_saved(models, exports, tmp_path):
    chat, _ = session(models, tmp_path)
    record = chat.handle(f"/reconstruct {exports / 'scene.png'}")
    assert record["kind"] == "reconstruct" and record["codes"] == 64 and record["codebook_size"] == 512
    original = np.asarray(Image.open(exports / "scene.png").convert("RGB"), np.float64)
    rebuilt = np.asarray(Image.open(record["paths"][0]), np.float64)
    expected = 10 * np.log10(255.0**2 / np.mean((original - rebuilt) ** 2))
    assert record["psnr"] == pytest.approx(expected, abs=1e-4)
    assert f"PSNR {expected:.2f} dB" in record["text"]


@pytest.mark.parametrize("size", [(48, 32), (32, 52)])
def test_reconstruct_centre_crops_a_non_square_image_to_the_models_size(models, exports, tmp_path, size):
    """A wide or tall image whose short side is the model's: the middle square (floor offset) is what is encoded,
    saved and compared; the reconstruction is the model's decode of that square's codes."""
    width, height = size
    rng = np.random.default_rng(width)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    chat, _ = session(models, tmp_path)
    record = chat.handle(f"/reconstruct {tmp_path / 'wide.png'}")
    top, left = (height - 32) // 2, (width - 32) // 2
    square = pixels[top : top + 32, left : left + 32].astype(np.float64)
    rebuilt = np.asarray(Image.open(record["paths"][0]), np.float64)
    assert rebuilt.shape == (32, 32, 3)
    assert record["psnr"] == pytest.approx(10 * np.log10(255.0**2 / np.mean((square - rebuilt) ** 2)), abs=1e-4)
    vqrae = models.vqrae
    with torch.no_grad():
        codes = vqrae.encode(torch.from_numpy(square / 127.5 - 1).permute(2, 0, 1)[None].float()).indices
        expected = ((vqrae.decode(codes).clamp(-1, 1)[0] + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(rebuilt - expected).max() <= 1


@pytest.mark.parametrize("message, prompt", [
    ("draw a photo of a red circle", "a photo of a red circle"),
    ("Please draw me a picture of a cat", "a cat"),
    ("generate an image of two squares", "two squares"),
    ("paint a drawing of a blue triangle", "a blue triangle"),
    ("create an image of three circles", "three circles"),
    ("create three circles", None),  # "generate" / "create" draw only "an image / a picture / a drawing of" ...
    ("Create a caption for this image", None),
    ("Generate a description of the picture.", None),
    ("Can you draw a circle?", None),  # a question
    ("draw me a circle?", None),
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
    for limit in (100, 600):  # 32 x 32 = 1024 pixels: PIL refuses past twice its limit and only warns below
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
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
    from demo.chat import add_model_arguments
    from llm.unified import expand_llava, save_unified

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


def test_a_terminal_chat_answers_each_line_as_it_is_typed(exports, tmp_path):
    """Through a pseudo-terminal, as a user types: the answer to a line comes before the next line is typed, and
    /quit ends the session (nothing is read ahead until end of input)."""
    import pty
    import select
    import time

    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "scripts/chat.py", "--und", str(exports / "und"), "--gen",
                             str(exports / "gen"), "--out", str(tmp_path), "--device", "cpu",
                             "answer.max_new_tokens=4"], cwd=REPO, env=env, stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120) -> bytes:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < end and proc.poll() is None, seen.decode(errors="replace")[-2000:]
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        return seen

    try:
        read_until(b">>> ")
        os.write(leader, b"/settings draw.count=1\n")
        read_until(b"draw.count")  # answered while the session waits for the next line
        seen = b""
        os.write(leader, f"/reconstruct {exports / 'scene.png'}\n".encode())
        read_until(b"PSNR")
        read_until(b">>> ")
        os.write(leader, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_a_chat_whose_image_cannot_be_read_stops_with_one_line(exports):
    proc = chat_script("--und", str(exports / "und"), "--gen", str(exports / "gen"), "--device", "cpu",
                       "--image", str(exports / "notes.txt"), "--prompt", "What color is the circle?")
    assert proc.returncode != 0 and "not a readable image" in proc.stderr.strip().splitlines()[-1]
    assert proc.stdout == ""  # nothing answered without the image


def test_drawing_defaults_to_the_generators_recommended_sampling(exports, tmp_path):
    import shutil

    from llm.sampler import load_recommended, save_recommended

    shutil.copytree(exports / "gen", tmp_path / "gen")
    save_recommended(tmp_path / "gen", {"cfg_scale": 2.5, "temperature": 0.9, "top_k": 0, "top_p": 1.0})
    assert load_recommended(tmp_path / "gen")["cfg_scale"] == 2.5 and load_recommended(exports / "gen") == {}
    models = Models(None, tmp_path / "gen", None, "cpu", torch.float32)
    chat = Session(models, tmp_path / "out")
    assert (chat.settings.draw.cfg_scale, chat.settings.draw.temperature) == (2.5, 0.9)
    record = chat.handle("/draw a photo of a red circle")
    expected, _ = models.gen.generate(["a photo of a red circle"] * 4, SamplingConfig(cfg_scale=2.5, temperature=0.9))
    assert np.array_equal(np.asarray(Image.open(record["paths"][0])), np.asarray(to_pil(expected[0])))
    proc = chat_script("--gen", str(tmp_path / "gen"), "--und", str(exports / "und"), "--device", "cpu", "--prompt",
                       "/settings")
    assert "drawing with the generator's recommendation: cfg_scale 2.5" in proc.stderr


def test_web_demo_runs_one_model_call_at_a_time_and_checks_the_pages_numbers(models, exports, tmp_path, monkeypatch):
    """Answering and drawing requests from two browser sessions at once never run together (one device, one lock);
    a number the page sends that is not one is refused before the settings; a session's folder goes when it ends,
    and past max_sessions the oldest goes."""
    import threading
    import time

    pytest.importorskip("gradio")
    import llm.understanding
    from demo.web import Demo

    running, most = [0], [0]
    lock = threading.Lock()

    def exclusive(fn):
        def run(*args, **kwargs):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.2)
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    running[0] -= 1
        return run

    monkeypatch.setattr(llm.understanding, "reply", exclusive(llm.understanding.reply))
    monkeypatch.setattr(models.gen, "generate", exclusive(models.gen.generate))
    demo = Demo(models, tmp_path, max_sessions=2)
    calls = [lambda: demo.ask(str(exports / "scene.png"), "What color is the circle?", [], None),
             lambda: demo.draw("a photo of a circle", 2.5, 1.0, 0, 1, None)] * 2
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1  # never two model calls at once
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) <= 2  # capped at max_sessions
    import gradio as gr

    for bad in ({"cfg_scale": float("nan")}, {"cfg_scale": "five"}, {"count": 2.5}, {"count": 0}, {"seed": -1},
                {"temperature": None}):
        values = {"cfg_scale": 2.5, "temperature": 1.0, "seed": 0, "count": 1} | bad
        with pytest.raises(gr.Error):
            demo.draw("a circle", values["cfg_scale"], values["temperature"], values["seed"], values["count"], None)
    _, session = demo.draw("a circle", 2.5, 1.0, 3, 1, None)
    assert session.settings.draw.seed == 3 and session.out_dir.is_dir()
    for _ in range(3):  # failed first requests (their sessions never reach the page) push no live folder out
        with pytest.raises(gr.Error):
            demo.draw("", 2.5, 1.0, 0, 1, None)
    assert session.out_dir.is_dir()
    demo.forget(session)
    assert not session.out_dir.exists()
