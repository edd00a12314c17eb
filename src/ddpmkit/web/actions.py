"""What each control of the page does, as plain functions of plain values: check the input
against the limits, call the library, and return pictures, files and the CLI command that
reproduces the result. No gradio here, so the page's layout (app.py) stays a layout."""
from __future__ import annotations

import contextlib
import queue
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import viz
from ..conditioning import listed_classes
from ..errors import UserError
from ..images import fit_image, load_image, load_image_as, make_mask
from ..models import DiffusionModel
from ..pipelines.edit import edit_img2img, edit_inpaint, edit_posterior, interpolation_images, interpolation_prompts, interpolation_seeds
from ..pipelines.generate import Generated, generate, save_generated
from ..pipelines.guided import DEFAULT_SCALE, GuidanceRequest, class_numbers
from ..pipelines.voyage import render_voyage
from ..sampling.grids import GRIDS
from ..sampling.options import sampler_options
from ..schedules import NoiseSchedule
from .limits import Limits, check_sampler
from .shelf import Shelf

PREVIEW_UPSCALE = 4  # the models are small (8x8 .. 64x64): show pixels big enough to see
GIF_SIDE = 128  # an interpolation's GIF frames are upscaled by whole pixels to about this side
DEFAULT_GRID = "default"  # the sampler's own grid, as the CLI without --grid

INTERPOLATIONS = ("seeds", "images", "prompts", "voyage")  # the last two need a text-conditional model


class Cancelled(Exception):
    """Raised inside the sampler's step callback when the visitor pressed Cancel."""


@dataclass
class Settings:
    """What a generate request asks for, checked."""

    run: str
    n: int
    sampler: str
    steps: int
    grid: str | None
    seed: int
    request: GuidanceRequest
    extra_flags: list[str] = field(default_factory=list)  # the class/prompt and guidance as CLI flags
    eta: float | None = None  # None: the sampler's own
    churn: float | None = None

    def command(self) -> str:
        """The `ddpmkit sample` command that draws the same images."""
        flags = ["ddpmkit", "sample", self.run, "--n", str(self.n), "--sampler", self.sampler, "--steps", str(self.steps)]
        if self.grid:
            flags += ["--grid", self.grid]
        flags += noise_flags(self.eta, self.churn)
        flags += ["--seed", str(self.seed), *self.extra_flags, "--out", "samples"]
        return shlex.join(flags)


def noise_flags(eta: float | None, churn: float | None) -> list[str]:
    """--eta/--churn as the command under a result gives them: 0.5, not 0.5000, and every digit the sampler used."""
    return [f for name, value in (("eta", eta), ("churn", churn)) if value is not None
            for f in (f"--{name}", f"{value:g}" if float(f"{value:g}") == value else repr(value))]


def picture(x: torch.Tensor, upscale: int = PREVIEW_UPSCALE, nrow: int | None = None) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] as one uint8 grid the page shows: (H', W') grey or (H', W', 3)."""
    grid = viz.make_grid(x, nrow=nrow, upscale=upscale)
    return grid[..., 0] if grid.shape[-1] == 1 else grid


class Actions:
    """The page's work, one method per button, on the models of a shelf."""

    def __init__(self, shelf: Shelf, limits: Limits | None = None, work_dir: str | Path | None = None):
        self.shelf, self.limits = shelf, limits or Limits()
        self._own_dir = work_dir is None  # a folder it made itself goes when the page closes; a given one stays
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="ddpmkit-web-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._light = threading.Condition()
        self._light_running = 0  # light requests (the forward-process tab) being computed now

    @contextlib.contextmanager
    def light(self) -> Iterator[None]:
        """Mark a light request: samplers pause between steps until it is done, so it answers at
        once on a machine whose cores the samplers keep busy."""
        with self._light:
            self._light_running += 1
        try:
            yield
        finally:
            with self._light:
                self._light_running -= 1
                self._light.notify_all()

    def yield_to_light(self, timeout_s: float = 2.0) -> None:
        """Called by samplers between steps: wait while a light request runs (never longer than timeout_s)."""
        with self._light:
            self._light.wait_for(lambda: self._light_running == 0, timeout=timeout_s)

    def warm_up(self) -> None:
        """Load the first model and the built-in digits before the first visitor asks."""
        if self.shelf.runs:
            self.shelf.get(self.shelf.runs[0])
        self.forward(None, 0, "linear", 0)

    def _folder(self, what: str) -> Path:
        """A fresh folder per request, so that concurrent visitors never share files; the folders of requests older
        than `limits.keep_files_s` go first, so a page that serves for weeks does not fill the disk."""
        self.prune()
        return Path(tempfile.mkdtemp(prefix=f"{what}-", dir=self.work_dir))

    def prune(self, now: float | None = None) -> list[Path]:
        """Remove the request folders last written more than `limits.keep_files_s` ago; returns them."""
        cutoff = (time.time() if now is None else now) - self.limits.keep_files_s
        old = [f for f in self.work_dir.iterdir() if f.is_dir() and f.stat().st_mtime < cutoff]
        for f in old:
            shutil.rmtree(f, ignore_errors=True)  # a visitor's download of it may race this: nothing to keep then
        return old

    def close(self) -> None:
        """Remove the work folder if this made it (`ddpmkit serve` calls this when it stops)."""
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- models -------------------------------------------------------------------------------
    def timesteps(self, run: str) -> int:
        """The run's T: the edit and interpolation sliders' range of t is 1..T-1 (T / 2 to start, 500 of 1000)."""
        return self.shelf.get(run).schedule.T

    def own_sampler(self, run: str) -> tuple[str, int] | None:
        """A distilled run's own few-step sampler and step count (what the page switches to), else None."""
        own = self.shelf.get(run).own_sampler
        return (own[0], int(own[1] or 1)) if own else None

    def describe(self, run: str) -> tuple[str, str, str]:
        """(a line about the model, the label of the class/prompt box, its placeholder)."""
        m = self.shelf.get(run)
        c, shape = m.conditioning, "x".join(map(str, m.image_shape))
        space = f"latent {'x'.join(map(str, m.data_shape))} decoded to {shape}" if m.autoencoder is not None else shape
        own = self.own_sampler(run)
        distilled = f"a {m.kind} run, sampled with its own {own[0]} in {own[1]} step(s); " if own else ""
        about = (f"**{run}**: step {m.step}, {space} images, {m.prediction} prediction, "
                 f"{m.config.diffusion.schedule} schedule, T = {m.schedule.T}; {distilled}")
        if c == "class" and m.class_names:
            return about + f"class-conditional: {listed_classes(m.class_names)}", "class", \
                f"class names or numbers, e.g. {m.class_names[0]} or 0,1 (empty: all in turn)"
        if c == "class":
            return about + f"class-conditional ({m.num_classes} classes)", "class", \
                f"class numbers 0..{m.num_classes - 1}, e.g. 7 or 0,1,2 (empty: all in turn)"
        if c == "text":
            return about + "text-conditional", "prompt", "a prompt, e.g. a handwritten seven"
        return about + "unconditional", "class or prompt (this model takes none)", "leave empty: the model is unconditional"

    def request(self, m: DiffusionModel, condition: str, guidance: float | None) -> tuple[GuidanceRequest, list[str]]:
        """The GuidanceRequest for what the visitor typed, and the CLI flags that say the same."""
        condition = self.limits.prompt(condition)
        if m.conditioning == "none":
            if condition:
                raise UserError(f"this model is unconditional: it takes no class or prompt (got {condition!r})")
            return GuidanceRequest(), []
        if guidance is None or not 0 <= guidance <= 30:
            raise UserError(f"the guidance scale must lie in 0..30, got {guidance}")
        flags = ["--guidance", f"{guidance:g}"]
        if m.conditioning == "class":
            typed = [c.strip() for c in condition.split(",")] if condition else []
            if m.class_names:  # an image folder's classes: by name or number
                classes = class_numbers(m, typed)
            else:
                try:
                    classes = [int(c) for c in typed]
                except ValueError:
                    raise UserError(f"this model takes class numbers 0..{m.num_classes - 1} (e.g. 7 or 0,1,2), not a prompt: {condition!r}") from None
            bad = [c for c in classes if not 0 <= c < m.num_classes]
            if bad:
                raise UserError(f"classes {bad} are not among this model's 0..{m.num_classes - 1}")
            return GuidanceRequest(classes=classes, scale=guidance), (["--class", ",".join(typed)] if classes else []) + flags
        if m.conditioning == "text":
            if not condition:
                raise UserError("this model is text-conditional: type a prompt")
            return GuidanceRequest(prompts=[condition], scale=guidance), ["--prompt", condition] + flags
        raise UserError(f"{m.path} is conditioned on {m.conditioning}; the page serves class, text and unconditional models")

    def settings(self, run: str, condition: str, sampler: str, steps: float, grid: str, guidance: float | None, seed: float,
                 n: float, eta: str | float | None = None, churn: str | float | None = None) -> tuple[DiffusionModel, Settings]:
        m = self.shelf.get(run)
        grid = None if grid in (None, "", DEFAULT_GRID) else grid
        if grid is not None and grid not in GRIDS:
            raise UserError(f"unknown grid {grid!r}; choose one of {[DEFAULT_GRID, *GRIDS]}")
        request, flags = self.request(m, condition, guidance)
        flags += [f for spec in self.shelf.loras for f in ("--lora", spec)]  # the served model's LoRAs, as the CLI merges them
        s = Settings(run, self.limits.images(n), check_sampler(sampler), self.limits.steps(steps), grid, self.limits.seed(seed),
                     request, flags, *self.noise(eta, churn))
        if s.steps > m.schedule.T:
            raise UserError(f"this model has T = {m.schedule.T} steps; steps must lie in 1..{m.schedule.T}")
        return m, s

    def noise(self, eta: str | float | None, churn: str | float | None, only_for: str | None = None) -> tuple[float | None, float | None]:
        """The eta and churn boxes, checked (empty: None, the sampler's default); only_for names what takes them where
        the request at hand runs Algorithm 2 instead (a value there was taken and ignored)."""
        eta, churn = self.limits.noise(eta, "eta", self.limits.max_eta), self.limits.noise(churn, "churn", self.limits.max_churn)
        if only_for and (eta, churn) != (None, None):
            raise UserError(f"eta and churn are the sampler's of {only_for}; this one runs Algorithm 2 (ddpm): leave them empty")
        return eta, churn

    # -- generate -----------------------------------------------------------------------------
    def generate(self, s: Settings, cancel: threading.Event | None = None, preview_every_s: float = 0.2) -> Iterator[dict]:
        """Sample as `ddpmkit sample` would, in a worker thread, yielding
        {"progress": (done, total), "x_t": picture, "x0": picture} while it runs and finally
        {"result": grid.png, "files": [...], "command": str, "seed": int}. Setting `cancel` stops
        it at the next step (then it raises Cancelled)."""
        m = self.shelf.get(s.run)
        cancel = cancel or threading.Event()
        abandoned = threading.Event()  # the page stopped reading (a visitor left): the worker stops too, not samples on for nobody
        events: queue.Queue = queue.Queue()
        shown = min(s.n, 16)

        def on_step(info: dict) -> None:
            if cancel.is_set() or abandoned.is_set():
                raise Cancelled()
            self.yield_to_light()
            events.put(("step", info))

        def work() -> None:
            try:
                options = sampler_options(s.sampler, s.grid, eta=s.eta, churn=s.churn)
                out = generate(m, s.n, s.request, s.sampler, s.steps, s.seed, options, record_every=max(1, s.steps // 50),
                               progress=False, callback=on_step)
                events.put(("done", out))
            except BaseException as e:  # noqa: BLE001 -- handed to the page's thread, which re-raises it
                events.put(("error", e))

        threading.Thread(target=work, daemon=True, name="ddpmkit-generate").start()
        last = -float("inf")  # the first step is always shown (monotonic time may start near 0 after a boot)
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
                done = s.steps - value["i"]
                now = time.monotonic()
                if now - last >= preview_every_s or value["i"] == 0:
                    last = now
                    x, x0 = value["x"][:shown], value["x0"][:shown]
                    yield {"progress": (done, s.steps), "x_t": picture(m.decode(x).clamp(-1, 1)), "x0": picture(m.decode(x0))}
        finally:  # also when the generator is closed half-way (GeneratorExit at a yield)
            abandoned.set()
        out: Generated = value
        folder = save_generated(out, self._folder("generate"), s.seed, gif=True)
        files = [folder / "grid.png", folder / "reverse_process.gif", folder / "predicted_x0.gif"]
        yield {"result": picture(out.images, nrow=viz.grid_columns(len(out.images))), "files": [str(f) for f in files if f.exists()],
               "command": s.command(),
               "seed": s.seed, "nfe": out.nfe}

    # -- forward process ----------------------------------------------------------------------
    def source(self, upload: str | None, digit: float | None, shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, str]:
        """An uploaded file (checked) or a digit of the built-in mnist5k, as (1, C, H, W) in [-1, 1]
        (in the model's shape when given), and how to name it on the command line."""
        if upload:
            path = str(self.limits.upload(upload))
            return (load_image_as(path, shape) if shape else load_image(path)), "image.png"
        spec = f"mnist5k:{self.limits.whole(digit, 'digit index', 0, 4999)}"
        image = load_image(spec)
        return (fit_image(image, shape) if shape else image), spec

    def forward(self, upload: str | None, digit: float | None, schedule: str, t: float,
                seed: float = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """(x_0, x_t, spectrum figure, caption) for the forward-process tab: a light request."""
        with self.light():
            x0, _ = self.source(upload, digit)
            sched = NoiseSchedule.from_name(schedule, 1000)
            t = self.limits.whole(t, "t", 0, sched.T - 1)
            x_t, fig = viz.forward_process_at(x0, sched, t, seed=int(seed or 0))
            upscale = max(1, 224 // x0.shape[-1])
            ab = float(sched.alpha_bar[t])
            caption = f"x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps at t = {t}, {schedule} schedule: alpha_bar_t = {ab:.4f}"
            return picture(x0, upscale, 1), picture(x_t, upscale, 1), viz.figure_array(fig), caption

    # -- edit ---------------------------------------------------------------------------------
    def edit(self, run: str, upload: str | None, digit: float | None, mode: str, strength: float, t: float, mask: str,
             drawn: np.ndarray | None, condition: str, guidance: float | None, sampler: str, steps: float, seed: float,
             n: float, eta: str | float | None = None, churn: str | float | None = None) -> tuple[np.ndarray, str]:
        """img2img, inpaint or posterior on one image: (a strip [input, (masked / x_t), outputs], the command). eta and
        churn: img2img's sampler's."""
        m = self.shelf.get(run)
        image, spec = self.source(upload, digit, m.image_shape)
        request, flags = self.request(m, condition, guidance)
        n, steps, seed, sampler = self.limits.images(n), self.limits.steps(steps), self.limits.seed(seed), check_sampler(sampler)
        common = ["--n", str(n), "--steps", str(steps), "--seed", str(seed), *flags]
        noise = self.noise(eta, churn, None if mode == "img2img" else "img2img")
        if mode == "img2img":  # the strength is checked by editing.img2img, with the command line's message
            options = sampler_options(sampler, eta=noise[0], churn=noise[1])
            out = edit_img2img(m, image, n, strength, request, sampler, steps, seed, options)
            rows, cmd = [image, out], ["img2img", run, spec, "--strength", f"{strength:g}", "--sampler", sampler, *noise_flags(*noise), *common]
        elif mode == "inpaint":
            keep = self.mask(mask, drawn, image.shape)
            out = edit_inpaint(m, image, keep, n, request, steps, seed=seed)
            rows, cmd = [image, image * keep, out], ["inpaint", run, spec, "--mask", mask if mask != "drawn" else "mask.png", *common]
        elif mode == "posterior":
            t = self.limits.whole(t, "t", 1, m.schedule.T - 1)
            x_t, out = edit_posterior(m, image, t, n, request, steps, seed)
            rows, cmd = [image, x_t, out], ["posterior", run, spec, "--t", str(t), *common]
        else:
            raise UserError(f"unknown edit {mode!r}; choose img2img, inpaint or posterior")
        strip = torch.cat(rows)
        return picture(strip, nrow=len(strip)), shlex.join(["ddpmkit", *cmd])

    @staticmethod
    def canvas(image: torch.Tensor, size: int = 256) -> np.ndarray:
        """An image (1, C, H, W) enlarged to about size pixels, RGB, for painting a mask on."""
        arr = picture(image, upscale=max(1, size // image.shape[-1]), nrow=1)
        return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr

    @staticmethod
    def mask(choice: str, drawn: np.ndarray | None, shape: torch.Size) -> torch.Tensor:
        """The inpainting mask (1, 1, H, W), 1 = keep: a half, or what was painted over the image in the page."""
        if choice != "drawn":
            return make_mask(choice, shape)
        if drawn is None or drawn.ndim != 3 or drawn.shape[-1] != 4 or not drawn[..., 3].any():
            raise UserError("paint over the part to fill in the mask editor (or choose a half)")
        painted = torch.from_numpy(drawn[..., 3] > 0).float()[None, None]
        painted = torch.nn.functional.interpolate(painted, size=tuple(shape[-2:]), mode="area")
        return (painted < 0.25).float()  # a pixel mostly painted over is filled in

    # -- interpolate / voyage -----------------------------------------------------------------
    def interpolations(self, run: str) -> list[str]:
        """The interpolations the run's model takes (what the page offers): prompts and voyages need a text-conditional one."""
        return [*INTERPOLATIONS[:2], *(INTERPOLATIONS[2:] if self.shelf.get(run).conditioning == "text" else ())]

    def interpolate(self, run: str, mode: str, seed_a: float, seed_b: float, digit_a: float, digit_b: float, t: float,
                    prompt_a: str, prompt_b: str, keyframes: list[list], frames: float, condition: str, guidance: float | None,
                    sampler: str, steps: float, eta: str | float | None = None, churn: str | float | None = None) -> tuple[str, np.ndarray]:
        """Frames between two seeds, two images, two prompts, or through (seed, prompt) keyframes: (GIF path, strip).
        eta and churn: the sampler's, but for images (Algorithm 2 from x_t)."""
        m = self.shelf.get(run)
        frames, steps, sampler = self.limits.frames(frames), self.limits.steps(steps), check_sampler(sampler)
        noise = self.noise(eta, churn, "seeds, prompts and voyages" if mode == "images" else None)
        options = sampler_options(sampler, eta=noise[0], churn=noise[1])
        if mode == "seeds":
            request, _ = self.request(m, condition, guidance)
            a, b = self.limits.seed(seed_a), self.limits.seed(seed_b)
            x = interpolation_seeds(m, a, b, frames, request, sampler, steps, options)
        elif mode == "images":
            request, _ = self.request(m, condition, guidance)
            a, _ = self.source(None, digit_a, m.image_shape)
            b, _ = self.source(None, digit_b, m.image_shape)
            x = interpolation_images(m, a, b, self.limits.whole(t, "t", 1, m.schedule.T - 1), frames, request, steps)
        elif mode == "prompts":
            pa, pb = self.limits.prompt(prompt_a), self.limits.prompt(prompt_b)
            x = interpolation_prompts(m, pa, pb, frames, self.limits.seed(seed_a), GuidanceRequest(scale=guidance), sampler, steps, options)
        elif mode == "voyage":
            rows = [r for r in (keyframes or []) if r and str(r[0]).strip() != "" and len(r) > 1 and str(r[1]).strip()]
            if not 2 <= len(rows) <= self.limits.max_keyframes:
                raise UserError(f"a voyage needs 2..{self.limits.max_keyframes} keyframes (seed, prompt), got {len(rows)}")
            try:
                keys = [(self.limits.seed(float(r[0])), self.limits.prompt(str(r[1]))) for r in rows]
            except (TypeError, ValueError) as e:
                raise UserError(f"each keyframe is a seed (a whole number) and a prompt: {e}") from None
            x = render_voyage(m, keys, frames_between=frames, guidance=guidance if guidance is not None else DEFAULT_SCALE, sampler=sampler,
                              steps=steps, progress=False, options=options)
        else:
            raise UserError(f"unknown interpolation {mode!r}; choose {', '.join(INTERPOLATIONS)}")
        upscale = max(1, GIF_SIDE // m.image_shape[-1])
        gif = viz.save_gif([viz.make_grid(f[None], nrow=1, pad=0, upscale=upscale) for f in x], self._folder("interpolate") / f"{mode}.gif",
                           duration_ms=120, hold_last_ms=480)
        return str(gif), picture(x, upscale=2, nrow=min(len(x), 16))
