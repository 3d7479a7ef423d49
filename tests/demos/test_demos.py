"""The Gradio demos, served for real on 127.0.0.1: driven through their named endpoints with
``gradio_client`` and, for one generation each, through the page in headless Chromium.

Set ``MMSPEC_SCREENSHOT_DIR=docs/images`` to also write the README screenshots
(``demo_image.png``, ``demo_chat.png``) from the browser tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

gr = pytest.importorskip("gradio", reason="the demos need the 'demo' extra (gradio)")
pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")

from gradio_client import Client, handle_file  # noqa: E402  (after the skip)

from mmspec.app.defaults import default_llamagen_classes, load_default_captioner, load_default_llamagen  # noqa: E402
from mmspec.app.demos import chat_app, image_app  # noqa: E402
from mmspec.app.demos.serving import MAX_UPLOAD_MB, launch  # noqa: E402
from mmspec.drafters import ModelDrafter  # noqa: E402
from mmspec.pipelines.llamagen import LlamaGenPipeline  # noqa: E402
from mmspec.pipelines.vlm.pipeline_vlm import VLMPipeline  # noqa: E402

from ..conftest import tiny_llamagen  # noqa: E402
from ..pipelines.vlm.test_vlm import image as tiny_image  # noqa: E402
from ..pipelines.vlm.test_vlm import noisy_decoder, tiny_pipeline  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="headless browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
GRID = 8  # the reference model's 8x8 token grid (a 32x32-pixel image)
CLASS, SEED = 2, 5
QUESTION = "describe the image"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(demo):
    """Launch on a free loopback port with mmspec's queue and upload limits; the app's URL."""
    _, url, _ = launch(demo, port=_free_port(), prevent_thread_lock=True, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    return url


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image_pipe() -> LlamaGenPipeline:
    """The embedded reference model (8x8 tokens, with a draft GPT): what `mmspec demo image` serves
    offline, so the page and its screenshot show real images."""
    return load_default_llamagen()


@pytest.fixture(scope="module")
def image_url(image_pipe):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_app, "PREVIEW_INTERVAL_S", 0.01)  # so that even this tiny model streams previews
        demo = image_app.build_image_demo(image_pipe, class_names=[c["name"] for c in default_llamagen_classes()])
        yield _serve(demo)
        demo.close()


@pytest.fixture(scope="module")
def chat_pipe() -> VLMPipeline:
    base = tiny_pipeline("llava")
    drafter = ModelDrafter(base.target.with_decoder(noisy_decoder(base.target.decoder, 0.3)))
    return VLMPipeline(base.target, base.processor, drafter=drafter)


@pytest.fixture(scope="module")
def chat_url(chat_pipe):
    demo = chat_app.build_chat_demo(chat_pipe)
    yield _serve(demo)
    demo.close()


@pytest.fixture(scope="module")
def captioner_url():
    """The chat demo on the embedded captioner: what `mmspec demo chat` serves offline."""
    demo = chat_app.build_chat_demo(load_default_captioner())
    yield _serve(demo)
    demo.close()


@pytest.fixture(scope="module")
def emoji_photo(tmp_path_factory, image_pipe) -> Path:
    """A grinning face drawn by the embedded image model (no font needed), upscaled for the page."""
    out = image_pipe(class_labels=[0], guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("uploads") / "grinning.png"
    out.images[0].resize((192, 192), PIL.Image.NEAREST).save(path)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("uploads") / "photo.png"
    tiny_image(0).resize((240, 200), PIL.Image.NEAREST).save(path)  # big enough to see in the screenshot
    return path


def _direct(pipe: LlamaGenPipeline, **kwargs):
    return pipe(
        class_labels=[CLASS],
        guidance_scale=4.0,
        temperature=1.0,
        top_k=None,
        generator=torch.Generator().manual_seed(SEED),
        **kwargs,
    )


def _pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- image demo (API)


def test_generate_endpoint_matches_direct_pipeline_calls(image_url, image_pipe):
    """Both images are what the pipeline gives for the same seed; stats and heat-map fit the run."""
    client = Client(image_url, verbose=False)
    baseline, method, heatmap, summary, record = client.predict(
        CLASS, SEED, "sjd", "exact", 4, 4.0, 1.0, 0, api_name="/generate"
    )
    base_out = _direct(image_pipe)
    sjd_out = _direct(image_pipe, speculative="sjd", num_draft_tokens=4)
    np.testing.assert_array_equal(_pixels(baseline), np.asarray(base_out.images[0]))
    np.testing.assert_array_equal(_pixels(method), np.asarray(sjd_out.images[0]))
    cell = image_app.PICTURE_SIZE // GRID
    assert PIL.Image.open(heatmap).size == (GRID * cell, GRID * cell)
    runs = record["runs"]
    assert runs["baseline"]["steps"] == base_out.stats.steps == GRID * GRID - 1
    assert runs["sjd (exact)"]["steps"] == sjd_out.stats.steps
    assert record["speedup_steps"] == pytest.approx(base_out.stats.steps / sjd_out.stats.steps)
    assert record["speedup_wall_time"] > 0 and "Speed-up" in summary


def test_generate_streams_previews_then_results(image_url):
    client = Client(image_url, verbose=False)
    job = client.submit(CLASS, SEED, "draft-model", "exact", 3, 4.0, 1.0, 0, api_name="/generate")
    job.result(timeout=60)
    *streamed, final = job.outputs()
    assert all(out[4] is None for out in streamed)  # stats come with the final result only
    baseline_stage = [out for out in streamed if out[1] is None]
    method_stage = [out for out in streamed if out[1] is not None]
    assert baseline_stage and method_stage, "expected previews while each run was generating"
    # Previews are the partial token grid decoded by the VQ (pending patches grey): image-sized.
    assert PIL.Image.open(baseline_stage[0][0]).size == PIL.Image.open(final[0]).size
    for out in method_stage:  # the finished baseline stays on show while the method runs
        np.testing.assert_array_equal(_pixels(out[0]), _pixels(final[0]))
    assert final[4]["method"] == "draft-model" and PIL.Image.open(final[1]).size == PIL.Image.open(final[0]).size


def test_baseline_only_and_impossible_settings(image_url):
    client = Client(image_url, verbose=False)
    baseline, method, heatmap, _, record = client.predict(
        CLASS, SEED, "none", "exact", 4, 4.0, 1.0, 0, api_name="/generate"
    )
    assert baseline is not None and method is None and heatmap is None and list(record["runs"]) == ["baseline"]
    with pytest.raises(Exception, match="needs greedy decoding"):
        client.predict(CLASS, SEED, "sjd", "greedy", 4, 4.0, 1.0, 0, api_name="/generate")
    with pytest.raises(Exception, match="greater than maximum"):
        client.predict(CLASS, SEED, "sjd", "exact", image_app.MAX_DRAFT_TOKENS + 1, 4.0, 1.0, 0, api_name="/generate")


def test_class_label_sent_as_text_through_the_api(image_url, image_pipe):
    """The endpoint's schema types the class dropdown as a string: "2" means class 2; junk is refused."""
    client = Client(image_url, verbose=False)
    as_text = client.predict(str(CLASS), SEED, "none", "exact", 4, 4.0, 1.0, 0, api_name="/generate")
    np.testing.assert_array_equal(_pixels(as_text[0]), np.asarray(_direct(image_pipe).images[0]))
    first = client.predict("0", SEED, "none", "exact", 4, 4.0, 1.0, 0, api_name="/generate")
    assert first[4]["runs"]["baseline"]["steps"] == GRID * GRID - 1
    for bad, message in (("1.7", "must be a class id"), ("banana", "must be a class id"), ("999", "outside \\[0, ")):
        with pytest.raises(Exception, match=message):
            client.predict(bad, SEED, "none", "exact", 4, 4.0, 1.0, 0, api_name="/generate")


def test_class_label_parsing():
    assert image_app.parse_class_label(" 3 ", 5) == 3 and image_app.parse_class_label(4, 5) == 4
    with pytest.raises(gr.Error, match="class id"):
        image_app.parse_class_label(True, 5)


def test_image_page_does_not_promise_equal_pictures_for_sampling(image_pipe):
    demo = image_app.build_image_demo(image_pipe, warmup=False)
    text = " ".join(b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and isinstance(b.value, str))
    assert (
        "lossless *in distribution*" in text and "only greedy decoding (temperature 0) gives the same picture" in text
    )
    assert "**same seed**" not in text


def test_preview_decodes_the_generated_tokens_and_greys_the_rest(image_pipe):
    out = _direct(image_pipe, output_type="np")
    tokens = out.tokens[0].flatten()
    full = np.asarray(image_app.preview_image(image_pipe, GRID * GRID, tokens), dtype=np.float64)
    np.testing.assert_allclose(full, out.images[0] * 255, atol=1)
    half = np.asarray(image_app.preview_image(image_pipe, GRID * GRID // 2, tokens))
    rows = half.shape[0] // 2
    assert (half[rows:] == image_app.PENDING_GREY).all() and half[:rows].std() > 5


def test_methods_offered_are_those_the_pipeline_can_run(image_pipe):
    gpt, vq = tiny_llamagen(grid=GRID, vocab_size=32)
    assert "draft-model" in image_app.runnable_methods(image_pipe)
    assert image_app.runnable_methods(LlamaGenPipeline(target=gpt, vq=vq)) == ["mc-sjd", "sjd"]
    # Relaxed rules get their codebook tables from the pipeline, so they are offered too.
    assert {"exact", "greedy", "lantern", "gsd"} <= set(image_app.buildable_rules(image_pipe))


# --------------------------------------------------------------------------- chat demo (API)


def test_chat_endpoint_streams_highlights_and_compares(chat_url, chat_pipe, photo):
    client = Client(chat_url, verbose=False)
    drafter = next(name for name in chat_app.default_drafters(chat_pipe) if name.startswith("model:"))
    job = client.submit(handle_file(str(photo)), QUESTION, drafter, 3, 24, 0.0, 0, True, api_name="/chat")
    answer, summary, baseline_answer, record = job.result(timeout=60)
    assert len(job.outputs()) >= 3, "expected the answer to stream"
    base = chat_pipe(PIL.Image.open(photo), QUESTION, max_new_tokens=24, num_draft_tokens=0)
    spec = chat_pipe(PIL.Image.open(photo), QUESTION, max_new_tokens=24, num_draft_tokens=3)
    text = "".join(piece["token"] for piece in answer)
    assert text == baseline_answer == base.text[0] and record["same_answer"]  # greedy: lossless
    expected = chat_app.highlighted_answer(chat_pipe, spec)
    assert [(p["token"], p["class_or_confidence"]) for p in answer] == expected
    assert any(label == chat_app.ACCEPTED for _, label in expected)
    run = record["runs"][drafter]
    assert run["steps"] == spec.stats.steps < record["runs"][chat_app.BASELINE]["steps"]
    assert run["mean_accepted_without_bonus"] == pytest.approx(spec.stats.mean_accepted) and run["tokens_per_s"] > 0
    assert "Speed-up" in summary


def test_bad_uploads_get_clear_messages(chat_url, tmp_path):
    client = Client(chat_url, verbose=False)

    def ask(path):
        return client.predict(
            handle_file(str(path)), QUESTION, chat_app.BASELINE, 3, 8, 0.0, 0, False, api_name="/chat"
        )

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(Exception, match="notes.png is not an image"):
        ask(tmp_path / "notes.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(Exception, match="Invalid file type"):
        ask(tmp_path / "notes.txt")
    PIL.Image.new("RGB", (chat_app.MAX_IMAGE_SIDE + 1, 2)).save(tmp_path / "wide.png")
    with pytest.raises(Exception, match="4097×2 pixels; the limit is 4096"):
        ask(tmp_path / "wide.png")
    with open(tmp_path / "huge.png", "wb") as f:  # sparse: no need to write the bytes
        f.truncate((MAX_UPLOAD_MB + 1) * 2**20)
    with pytest.raises(Exception, match="maximum file size"):  # refused before upload by Gradio's limit
        ask(tmp_path / "huge.png")
    with pytest.raises(gr.Error, match=f"huge.png is 11.0 MB; the limit is {MAX_UPLOAD_MB} MB"):
        chat_app.load_upload(str(tmp_path / "huge.png"))  # and by the app itself, for other launchers
    with pytest.raises(Exception, match="Upload an image first"):
        client.predict(None, QUESTION, chat_app.BASELINE, 3, 8, 0.0, 0, False, api_name="/chat")


def test_long_questions_are_refused_before_the_queue_is_held(chat_url, chat_pipe, photo):
    """A 200,000-character question is refused at once, with the limit (characters, then tokens)."""
    client = Client(chat_url, verbose=False)
    start = time.perf_counter()
    with pytest.raises(
        Exception, match=f"The question is 200,000 characters long; the limit is {chat_app.MAX_QUESTION_CHARS:,}"
    ):
        client.predict(
            handle_file(str(photo)), "why " * 50_000, chat_app.BASELINE, 3, 8, 0.0, 0, False, api_name="/chat"
        )
    assert time.perf_counter() - start < 10
    long_in_tokens = " ".join(["a"] * (chat_app.MAX_QUESTION_TOKENS + 1))
    assert len(long_in_tokens) <= chat_app.MAX_QUESTION_CHARS
    with pytest.raises(gr.Error, match=f"tokens long; the limit is {chat_app.MAX_QUESTION_TOKENS} tokens"):
        chat_app.check_question(chat_pipe, long_in_tokens)
    assert chat_app.check_question(chat_pipe, QUESTION) == QUESTION


# --------------------------------------------------------------------------- MAR tab (API)


@pytest.fixture(scope="module")
def mar_pipe():
    from mmspec.pipelines.mar import MARPipeline

    from ..conftest import tiny_mar, tiny_mar_vae

    pipe = MARPipeline(target=tiny_mar(seed=0), vae=tiny_mar_vae(), drafter=tiny_mar(seed=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def mar_url(mar_pipe):
    import gradio as gr

    from mmspec.app.demos.mar_tab import add_mar_tab

    with gr.Blocks() as demo:
        add_mar_tab(mar_pipe, warmup=False)
    yield _serve(demo)
    demo.close()


def test_mar_endpoint_matches_direct_pipeline_calls(mar_url, mar_pipe):
    """Baseline and CSpD pictures are the pipeline's for the same seed; the stats are the CSpD call's."""
    client = Client(mar_url, verbose=False)
    baseline, cspd, heatmap, summary, record = client.predict(
        "2", 7, 4, 2, "gaussian-exact", 3.0, 1.0, api_name="/generate_mar"
    )
    common = dict(class_labels=[2], num_iter=4, guidance_scale=3.0, temperature=1.0)
    base = mar_pipe(**common, generator=torch.Generator().manual_seed(7))
    spec = mar_pipe(**common, speculative="cspd", num_draft_tokens=2, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(_pixels(baseline), np.asarray(base.images[0]))
    np.testing.assert_array_equal(_pixels(cspd), np.asarray(spec.images[0]))
    assert record["baseline_target_forwards"] == 4 and record["cspd_target_forwards"] == spec.stats.steps
    assert record["acceptance_rate"] == spec.stats.draft_acceptance_rate and "Acceptance rate" in summary
    assert PIL.Image.open(heatmap).size[0] >= image_app.PICTURE_SIZE // 2
    with pytest.raises(Exception, match="outside"):
        client.predict("99", 7, 4, 2, "gaussian-exact", 3.0, 1.0, api_name="/generate_mar")


# --------------------------------------------------------------------------- command line


def test_demo_command_serves_a_saved_pipeline_on_loopback(image_pipe, tmp_path, monkeypatch):
    """``mmspec demo image --model DIR`` builds the app from the folder (with its class names) and
    launches it on 127.0.0.1 unless told otherwise; chat without a VLM says what it needs."""
    import argparse
    import json

    import mmspec.app.demos as demos

    image_pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "classes.json").write_text(
        json.dumps(
            [{"label": i, "char": "x", "name": f"thing {i}"} for i in range(image_pipe.target.config.num_classes)]
        )
    )
    parser = argparse.ArgumentParser()
    demos.add_demo_args(parser)
    launched = {}
    monkeypatch.setattr(demos, "launch", lambda demo, **kw: launched.update(demo=demo, **kw))
    assert demos.demo_command(parser.parse_args(["image", "--model", str(tmp_path / "pipe"), "--port", "7999"])) == 0
    assert launched["host"] == "127.0.0.1" and launched["port"] == 7999 and not launched["share"]
    config = launched["demo"].get_config_file()
    labels = [c[0] for comp in config["components"] for c in comp["props"].get("choices") or [] if "thing" in str(c[0])]
    assert labels[:2] == ["0: x thing 0", "1: x thing 1"]
    with pytest.raises(SystemExit, match="no captioner in .* pass --vlm DIR"):
        demos.demo_command(parser.parse_args(["chat", "--vlm", str(tmp_path / "nothing")]))


# --------------------------------------------------------------------------- in the browser


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="browser tests need selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Flags that work on this project's machines (closed network, running as root, no GPU).
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _screenshot(driver, tmp_path: Path, name: str) -> PIL.Image.Image:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("MMSPEC_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["MMSPEC_SCREENSHOT_DIR"]) / name)
    return PIL.Image.open(path).convert("RGB")


def _crop(shot: PIL.Image.Image, element) -> np.ndarray:
    box = element.rect
    return np.asarray(
        shot.crop((box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"])), dtype=np.float64
    )


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _element(driver, css: str):
    """The first element matching ``css`` once the page has rendered it."""
    from selenium.webdriver.common.by import By

    return _wait(driver, lambda d: (d.find_elements(By.CSS_SELECTOR, css) or [None])[0], timeout=30)


@needs_chromium
def test_image_page_generates_and_shows_the_images(browser, image_url, tmp_path):
    browser.get(image_url)
    _element(browser, "#generate-button").click()
    _wait(browser, lambda d: "Speed-up" in _element(d, "#summary").text)
    shot = _screenshot(browser, tmp_path, "demo_image.png")
    for elem_id in ("baseline-image", "method-image", "heatmap-image"):
        picture = _element(browser, f"#{elem_id} img")
        assert picture.rect["width"] > 50 and picture.rect["height"] > 50, elem_id
        assert _crop(shot, picture).std() > 10, f"{elem_id} looks blank in the screenshot"


@needs_chromium
def test_chat_page_answers_with_highlights(browser, captioner_url, emoji_photo, tmp_path):
    browser.get(captioner_url)
    _element(browser, "#image-upload input[type=file]").send_keys(str(emoji_photo))
    preview = _element(browser, "#image-preview img")
    _element(browser, "#ask-button").click()
    _wait(browser, lambda d: "Speed-up" in _element(d, "#summary").text)
    shot = _screenshot(browser, tmp_path, "demo_chat.png")
    answer = _element(browser, "#answer")
    assert "grinning face" in " ".join(answer.text.split())  # the captioner names the emoji the image model drew
    assert _crop(shot, answer).std() > 10 and _crop(shot, preview).std() > 10
