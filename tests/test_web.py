"""The web page in a real browser: `ddpmkit serve` on a loopback port with tiny models the tests
train, driven by Debian's headless Chromium through Playwright. Every flow checks what the page
shows. Skipped when Chromium, Playwright or gradio is missing (`make test` installs the Python
packages, `.ci/run` installs Chromium first).

Screenshots go to $DDPMKIT_SCREENSHOTS (default: a temporary folder). DDPMKIT_WEB_RUNS=FOLDER
serves the runs `uncond` and `class` in FOLDER instead of training tiny ones (for pictures of real
models, e.g. the README's)."""
from __future__ import annotations

import importlib.util
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(
    CHROMIUM is None or importlib.util.find_spec("playwright") is None or importlib.util.find_spec("gradio") is None,
    reason="browser tests need Debian's chromium, playwright and gradio (.ci/run and make test install them)"),
    # under pytest-xdist (make test) every test here goes to one worker, which starts the server and the browser once
    pytest.mark.xdist_group(name="browser"), pytest.mark.slow]

TIMEOUT_MS = 90_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def runs(web_runs) -> Path:
    """The runs `uncond` and `class` (tiny ones trained by conftest, or those in $DDPMKIT_WEB_RUNS)."""
    return Path(os.environ["DDPMKIT_WEB_RUNS"]) if os.environ.get("DDPMKIT_WEB_RUNS") else web_runs


@pytest.fixture(scope="session")
def server(runs, tmp_path_factory):
    """A real `ddpmkit serve` process on a free loopback port, one per worker for the whole session: the
    worker may run other modules' tests between these, and a module-scoped server would start again."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "ddpmkit.cli", "serve", str(runs), "--port", str(port), "--max-steps", "200"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"ddpmkit serve did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()  # SIGTERM, as `kill` or a service manager stops it: the page removes the requests' files
    assert proc.wait(timeout=30) == 0
    log.close()
    said = re.search(r"the requests' files under (\S+),", Path(log.name).read_text())
    assert said and not Path(said[1]).exists(), "ddpmkit serve left its work folder behind"


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DDPMKIT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, server, shots, request):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(server)
    pg.wait_for_selector("#gen-go")
    wait_text(pg, "about", "step")  # the model bar has loaded
    yield pg
    pg.screenshot(path=str(shots / f"{request.node.name}.png"), full_page=True)
    pg.close()


# -- helpers: the page as a person uses it --------------------------------------------------------
def wait_text(pg, elem_id: str, text: str) -> None:
    """Wait until the element shows text (it may not exist yet while the page renders)."""
    pg.wait_for_function(f"(() => {{ const e = document.querySelector('#{elem_id}'); return e && e.innerText.includes({text!r}); }})()")


def field(pg, elem_id: str):
    return pg.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=file])").first


def fill(pg, elem_id: str, value) -> None:
    box = field(pg, elem_id)
    box.fill(str(value))
    box.press("Enter")


def choose(pg, elem_id: str, option: str) -> None:
    """Pick an option of a dropdown from its list (typing it and Enter was lost under load: the box went back to its value)."""
    field(pg, elem_id).click()
    pg.get_by_role("option", name=option, exact=True).click()
    pg.wait_for_function(f"document.querySelector('#{elem_id} input').value === '{option}'")


def choose_model(pg, run: Path, expect: str) -> None:
    fill(pg, "run", run)
    wait_text(pg, "about", str(run))
    assert expect in pg.inner_text("#about")


def value_of(pg, elem_id: str) -> str:
    return field(pg, elem_id).input_value()


def wait_value(pg, elem_id: str) -> str:
    """Wait until a text box shows something, and return it."""
    pg.wait_for_function(f"(() => {{ const e = document.querySelector('#{elem_id} textarea, #{elem_id} input'); "
                         f"return e && e.value !== ''; }})()")
    return value_of(pg, elem_id)


def shown_image(pg, elem_id: str) -> np.ndarray:
    """The pixels of the picture an image component shows, as the browser fetched them."""
    src = pg.locator(f"#{elem_id} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(pg.request.get(src).body())))


def image_src(pg, elem_id: str) -> str | None:
    img = pg.locator(f"#{elem_id} img")
    return img.first.get_attribute("src") if img.count() else None


def downloads(pg) -> list[str]:
    """The links of the generate tab's download list."""
    return [a.get_attribute("href") for a in pg.locator("#gen-files a[href]").all()]


def error_message(pg) -> str:
    """The text of the page's message (gradio's toast: errors, and the note that a run was cancelled)."""
    pg.wait_for_selector("[data-testid=toast-text]")
    return pg.inner_text("[data-testid=toast-text]")


def generate(pg, steps: int, n: int, seed: int, condition: str = "") -> str:
    fill(pg, "condition", condition)
    fill(pg, "gen-steps", steps)
    fill(pg, "gen-n", n)
    fill(pg, "gen-seed", seed)
    pg.click("#gen-go")
    return wait_value(pg, "gen-command")


def grid_shape(n: int, side: int, upscale: int = 4, pad: int = 2) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    cell = side * upscale + pad
    return rows * cell + pad, cols * cell + pad


# -- the flows --------------------------------------------------------------------------------
def test_unconditional_generate_shows_live_preview_result_command_and_downloads(page, runs):
    choose_model(page, runs / "uncond", "unconditional")
    command = generate(page, steps=20, n=16, seed=3)
    assert command.startswith(f"ddpmkit sample {runs / 'uncond'} --n 16 --sampler dpmpp_2m_sde --steps 20 --seed 3")
    assert value_of(page, "gen-seed-used") == "3"
    side = int(page.inner_text("#about").split(" images")[0].split("x")[-1])
    result = shown_image(page, "gen-result")
    assert result.shape[:2] == grid_shape(16, side)
    assert result.std() > 0  # a picture, not a blank
    assert shown_image(page, "gen-x0").shape[:2] == grid_shape(16, side)  # the live preview of the predicted x_0
    assert {Path(h).name for h in downloads(page)} == {"grid.png", "reverse_process.gif", "predicted_x0.gif"}


def test_random_seed_is_drawn_and_shown(page, runs):
    choose_model(page, runs / "uncond", "unconditional")
    page.get_by_role("tab", name="Edit").click()
    assert page.locator("#edit-t input[type=range]").get_attribute("max") == "999" and value_of(page, "edit-t") == "500"  # T = 1000
    page.get_by_role("tab", name="Generate").click()
    command = generate(page, steps=2, n=1, seed=-1)
    seed = int(value_of(page, "gen-seed-used"))
    assert seed >= 0 and f"--seed {seed} " in command


def test_class_generate_conditions_on_the_class(page, runs):
    choose_model(page, runs / "class", "class-conditional (10 classes)")
    assert "class numbers 0..9" in field(page, "condition").get_attribute("placeholder")
    # the edit's and the interpolation's t span this model's T = 100 (a fixed 1..999 ran past it), T / 2 to start
    for tab, slider in (("Edit", "edit-t"), ("Interpolate / voyage", "interp-t")):
        page.get_by_role("tab", name=tab).click()
        assert page.locator(f"#{slider} input[type=range]").get_attribute("max") == "99" and value_of(page, slider) == "50"
    page.get_by_role("tab", name="Generate").click()
    command = generate(page, steps=5, n=4, seed=0, condition="3")
    assert "--class 3 --guidance 3" in command
    assert shown_image(page, "gen-result").std() > 0


def test_a_distilled_run_switches_the_page_to_its_own_few_step_sampler(page, runs):
    choose_model(page, runs / "consistency", "a consistency run, sampled with its own consistency in 1 step(s)")
    assert value_of(page, "gen-sampler") == "consistency" and value_of(page, "gen-steps") == "1"
    fill(page, "condition", "")
    fill(page, "gen-seed", 3)
    page.click("#gen-go")
    command = wait_value(page, "gen-command")
    assert "--sampler consistency --steps 1" in command and shown_image(page, "gen-result").std() > 0


def test_same_seed_and_settings_give_the_same_image_as_the_cli(page, runs, tmp_path):
    from ddpmkit.cli import main
    from ddpmkit.web.actions import picture

    choose_model(page, runs / "class", "class-conditional")
    fill(page, "gen-eta", 0.5)  # the page's default sampler, dpmpp_2m_sde, with half its noise
    command = generate(page, steps=5, n=4, seed=11, condition="1,7")
    argv = shlex.split(command)
    assert argv[:2] == ["ddpmkit", "sample"] and argv[-2:] == ["--out", "samples"] and "--sampler dpmpp_2m_sde --steps 5 --eta 0.5" in command
    assert main([*argv[1:-2], "--out", str(tmp_path), "--no-gif"]) == 0
    cli = torch.load(tmp_path / "samples.pt")
    assert np.array_equal(shown_image(page, "gen-result"), picture(cli))  # what the page shows
    href = next(h for h in downloads(page) if h.endswith("/grid.png"))
    downloaded = np.asarray(Image.open(io.BytesIO(page.request.get(href).body())))
    assert np.array_equal(downloaded, np.asarray(Image.open(tmp_path / "grid.png")))  # the file to download


def test_forward_process_slider_changes_the_picture(page):
    page.get_by_role("tab", name="Forward process").click()
    wait_text(page, "fwd-caption", "t = 250")
    x0 = shown_image(page, "fwd-x0").astype(float)
    fill(page, "fwd-t", 0)
    wait_text(page, "fwd-caption", "t = 0,")
    at_0 = shown_image(page, "fwd-xt").astype(float)
    spectrum_0 = shown_image(page, "fwd-spectrum")
    fill(page, "fwd-t", 900)
    wait_text(page, "fwd-caption", "t = 900,")
    at_900 = shown_image(page, "fwd-xt").astype(float)
    # q(x_t | x_0): at t = 0 x_t is x_0 up to sqrt(beta_0) = 1% noise; at t = 900 it is mostly noise
    assert np.abs(at_0 - x0).mean() < 4
    assert np.corrcoef(at_0.ravel(), x0.ravel())[0, 1] > 0.99
    assert np.corrcoef(at_900.ravel(), x0.ravel())[0, 1] < 0.5
    assert not np.array_equal(spectrum_0, shown_image(page, "fwd-spectrum"))
    assert "alpha_bar_t = " in page.inner_text("#fwd-caption")


def test_img2img_on_an_uploaded_image(page, runs, tmp_path):
    from ddpmkit.images import load_image_as

    choose_model(page, runs / "uncond", "unconditional")
    digit = np.zeros((40, 40), dtype=np.uint8)
    digit[8:32, 17:23] = 255  # a "1", larger than the model's images: the page resizes it
    Image.fromarray(digit).save(tmp_path / "one.png")
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-upload input[type=file]", str(tmp_path / "one.png"))
    fill(page, "edit-steps", 10)
    fill(page, "edit-n", 3)
    fill(page, "edit-eta", 0.5)  # DDIM halfway to Algorithm 2's noise
    page.click("#edit-go")
    command = wait_value(page, "edit-command")
    assert command.startswith(f"ddpmkit img2img {runs / 'uncond'} image.png --strength 0.5 --sampler ddim --eta 0.5 --n 3 --steps 10")
    side = int(page.inner_text("#about").split(" images")[0].split("x")[-1])
    strip = shown_image(page, "edit-result")
    assert strip.shape[:2] == (side * 4 + 4, 4 * (side * 4 + 2) + 2)  # input + 3 edits in a row
    first = strip[2:2 + side * 4:4, 2:2 + side * 4:4].astype(float)
    expected = (load_image_as(str(tmp_path / "one.png"), (1, side, side))[0, 0].numpy() + 1) * 127.5
    assert np.abs(first - expected).max() <= 1  # the first picture is the upload, resized to the model


@pytest.mark.parametrize("where, action, message", [
    ("generate", "prompt for a class model", "takes class numbers 0..9"),
    ("generate", "unknown run", "unknown run"),
    ("generate", "absurd steps", "steps must lie in 1..200"),
    ("generate", "eta for an ODE solver", "sampler 'heun' takes no option(s) ['eta']; eta is for ddim, euler_ancestral"),
    ("forward", "corrupt upload", "not an image Pillow can read"),
])
def test_invalid_input_shows_one_clear_message_and_the_server_keeps_serving(page, runs, shots, tmp_path, where, action, message):
    if action == "prompt for a class model":
        choose_model(page, runs / "class", "class-conditional")
        fill(page, "condition", "a handwritten seven")
        page.click("#gen-go")
    elif action == "unknown run":
        fill(page, "run", runs / "no_such_run")
    elif action == "absurd steps":
        choose_model(page, runs / "uncond", "unconditional")
        fill(page, "gen-steps", 100000)
        page.click("#gen-go")
    elif action == "eta for an ODE solver":  # refused by the sampler, in the page's worker thread
        choose_model(page, runs / "uncond", "unconditional")
        choose(page, "gen-sampler", "heun")
        fill(page, "gen-eta", 0.5)
        page.click("#gen-go")
    else:
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        page.get_by_role("tab", name="Forward process").click()
        page.set_input_files("#fwd-upload input[type=file]", str(tmp_path / "broken.png"))
    assert message in error_message(page)
    page.screenshot(path=str(shots / f"invalid_{action.replace(' ', '_')}.png"))
    # ... and the page still works
    page.reload()
    wait_text(page, "about", "step")
    choose_model(page, runs / "uncond", "unconditional")
    assert generate(page, steps=2, n=1, seed=0).startswith("ddpmkit sample")


def test_cancel_stops_a_long_generation(page, runs):
    choose_model(page, runs / "uncond", "unconditional")
    choose(page, "gen-sampler", "ddpm")
    fill(page, "gen-steps", 200)
    fill(page, "gen-n", 64)
    fill(page, "gen-seed", 1)
    page.click("#gen-go")
    page.wait_for_selector("#gen-x0 img")  # the live preview has started
    page.click("#gen-cancel")
    assert "cancelled" in error_message(page)  # the sampler stopped between two steps and said so
    assert value_of(page, "gen-command") == ""  # no result arrived
    assert image_src(page, "gen-result") is None
    assert generate(page, steps=2, n=1, seed=0).startswith("ddpmkit sample")  # and the queue is free again


def test_interpolation_between_two_seeds_is_an_animation(page, runs):
    choose_model(page, runs / "uncond", "unconditional")
    page.get_by_role("tab", name="Interpolate / voyage").click()
    # an unconditional model is offered the interpolations it takes (prompts and voyages were offered, and failed)
    assert page.locator("#interp-mode label").all_inner_texts() == ["seeds", "images"]
    fill(page, "interp-seed-a", 3)
    fill(page, "interp-seed-b", 14)
    page.click("#interp-go")
    page.wait_for_selector("#interp-gif img")
    gif = Image.open(io.BytesIO(page.request.get(image_src(page, "interp-gif")).body()))
    assert gif.format == "GIF" and gif.n_frames == 8
    frames = []
    for k in (0, 7):
        gif.seek(k)
        frames.append(np.asarray(gif.convert("L"), dtype=float))
    assert np.abs(frames[0] - frames[1]).mean() > 1  # the two ends differ: seed 3 is not seed 14
    # the tab's eta reaches the request: two images run Algorithm 2 from x_t, which takes none
    page.locator("#interp-mode label", has_text="images").click()
    fill(page, "interp-eta", 0.5)
    page.click("#interp-go")
    assert "eta and churn are the sampler's of seeds, prompts and voyages" in error_message(page)
