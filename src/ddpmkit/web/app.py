"""The page's layout in gradio: a model bar, then four tabs (Generate, Forward process, Edit,
Interpolate / voyage). Every callback hands its values to web.actions and turns user errors into
the page's one-line message (gr.Error); nothing here computes."""
from __future__ import annotations

import threading
from collections.abc import Callable

import gradio as gr

from ..devices import out_of_memory
from ..errors import USER_ERRORS, render
from ..pipelines.guided import DEFAULT_SCALE
from ..sampling import SAMPLERS
from ..sampling.grids import GRIDS
from .actions import DEFAULT_GRID, Actions, Cancelled

# the library's parameter names in its messages, as the page labels them
WORDS = {"classes": "the class box", "prompts": "a prompt", "scale": "the guidance scale"}
HEAVY = "sampling"  # the concurrency group of everything that runs a network
LIGHT = "light"  # the forward-process tab: answers while samplers run
CSS = """
.pixelated img { image-rendering: pixelated; }
#gen-command textarea, #edit-command textarea { font-family: monospace; }
"""


# the Interpolate tab's labels for a text-conditional model; the others' drop the prompts' and voyages' part
SEED_A_LABEL, FRAMES_LABEL = "seed A (prompts: the seed)", "frames (voyage: between keyframes)"


def shown_errors(fn: Callable) -> Callable:
    """fn with user errors shown as the page's message instead of a traceback in the log."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, RuntimeError) as e:
            raise page_error(e) from None
    return wrapped


def shown(e: Exception) -> str:
    """A user error's message in the page's words."""
    return render(e, WORDS)


def page_error(e: Exception) -> Exception:
    """The page's message for a user error, or for a device without memory for a request (generation halves its own
    chunks first: this is one sample, or an edit, that does not fit); any other error as it is (a bug: its traceback)."""
    if isinstance(e, RuntimeError) and not isinstance(e, USER_ERRORS):
        if not out_of_memory(e):
            return e
        return gr.Error("the device had no memory for this request: ask for fewer images, or serve on a device with more "
                        "memory (ddpmkit serve --device)", print_exception=False)
    return gr.Error(shown(e), print_exception=False)


def noise_boxes(tab: str) -> tuple[gr.Textbox, gr.Textbox]:
    """A tab's eta and churn boxes, empty for the sampler's default: text, not gr.Number, whose empty box is sent as 0."""
    with gr.Row():
        return (gr.Textbox(label="eta: ddim, euler_ancestral, *_sde", placeholder="default", max_lines=1, elem_id=f"{tab}-eta"),
                gr.Textbox(label="churn: edm", placeholder="default (40)", max_lines=1, elem_id=f"{tab}-churn"))


def build_app(actions: Actions, concurrency: int = 1) -> gr.Blocks:
    """The Blocks app over the actions' shelf. concurrency: sampling requests run at once (the rest queue)."""
    runs, limits = actions.shelf.runs, actions.limits
    cancels: dict[str, threading.Event] = {}  # session -> its running generation's stop flag

    keep = limits.keep_files_s  # gradio's copies of uploads and results go after as long as ours (checked every <= 10 min)
    with gr.Blocks(title="ddpmkit", analytics_enabled=False, delete_cache=(min(keep, 600), keep)) as app:
        gr.Markdown("# ddpmkit\nDenoising diffusion models: sample, watch the forward process, edit, interpolate.")
        with gr.Row():
            run = gr.Dropdown(runs, value=runs[0] if runs else None, label="model (a run folder)", allow_custom_value=True,
                              elem_id="run", scale=2)
            condition = gr.Textbox(label="class or prompt", max_lines=1, elem_id="condition", scale=2)
            guidance = gr.Slider(0, 10, value=DEFAULT_SCALE, step=0.5, label="guidance scale (conditional models)", elem_id="guidance", scale=1)
        about = gr.Markdown(elem_id="about")

        with gr.Tabs():
            with gr.Tab("Generate", id="generate"), gr.Row():
                with gr.Column(scale=1, min_width=280):
                    with gr.Row():
                        sampler = gr.Dropdown(sorted(SAMPLERS), value="dpmpp_2m_sde", label="sampler", elem_id="gen-sampler")
                        grid = gr.Dropdown([DEFAULT_GRID, *GRIDS], value=DEFAULT_GRID, label="grid", elem_id="gen-grid")
                    eta, churn = noise_boxes("gen")
                    with gr.Row():
                        steps = gr.Number(20, label=f"steps (1..{limits.max_steps})", precision=0, elem_id="gen-steps")
                        n = gr.Number(16, label=f"images (1..{limits.max_images})", precision=0, elem_id="gen-n")
                    seed = gr.Number(-1, label="seed (-1 = random)", precision=0, elem_id="gen-seed")
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                        stop = gr.Button("Cancel", variant="stop", elem_id="gen-cancel")
                    seed_used = gr.Number(label="seed used", interactive=False, elem_id="gen-seed-used")
                    command = gr.Textbox(label="reproduce with", interactive=False, elem_id="gen-command", lines=2)
                with gr.Column(scale=2):
                    with gr.Row():
                        x_t = gr.Image(label="x_t (live)", interactive=False, elem_id="gen-xt", elem_classes="pixelated", height=260)
                        x0 = gr.Image(label="predicted x_0 (live)", interactive=False, elem_id="gen-x0", elem_classes="pixelated",
                                      height=260)
                    result = gr.Image(label="result", interactive=False, format="png", elem_id="gen-result",
                                      elem_classes="pixelated", height=420)
                    files = gr.File(label="downloads: grid, reverse-process GIF, predicted-x_0 GIF", file_count="multiple",
                                    interactive=False, elem_id="gen-files")

            with gr.Tab("Forward process", id="forward"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        f_upload = gr.File(label="your image (PNG or JPEG)", file_types=["image"], type="filepath", elem_id="fwd-upload")
                        f_digit = gr.Number(7, label="or an MNIST digit: index 0..4999", precision=0, elem_id="fwd-digit")
                        f_schedule = gr.Radio(["linear", "cosine"], value="linear", label="noise schedule", elem_id="fwd-schedule")
                        f_t = gr.Slider(0, 999, value=250, step=1, label="t", elem_id="fwd-t")
                        f_caption = gr.Markdown(elem_id="fwd-caption")
                    with gr.Column(scale=2):
                        with gr.Row():
                            f_x0 = gr.Image(label="x_0", interactive=False, format="png", elem_id="fwd-x0", elem_classes="pixelated", height=240)
                            f_xt = gr.Image(label="x_t", interactive=False, format="png", elem_id="fwd-xt", elem_classes="pixelated", height=240)
                        f_spectrum = gr.Image(label="radially averaged power spectrum", interactive=False, format="png", elem_id="fwd-spectrum")

            with gr.Tab("Edit", id="edit"), gr.Row():
                with gr.Column(scale=1, min_width=280):
                    e_upload = gr.File(label="your image (PNG or JPEG)", file_types=["image"], type="filepath", elem_id="edit-upload")
                    e_digit = gr.Number(0, label="or an MNIST digit: index 0..4999", precision=0, elem_id="edit-digit")
                    e_mode = gr.Radio(["img2img", "inpaint", "posterior"], value="img2img", label="edit", elem_id="edit-mode")
                    e_strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="img2img strength (0 keeps, 1 ignores the image)",
                                           elem_id="edit-strength")
                    e_t = gr.Slider(1, 999, value=500, step=1, label="posterior: t of the shared x_t", elem_id="edit-t")
                    e_mask = gr.Radio(["right", "left", "top", "bottom", "drawn"], value="right",
                                      label="inpaint: the half to fill, or what you paint below", elem_id="edit-mask")
                    with gr.Row():
                        e_sampler = gr.Dropdown(sorted(SAMPLERS), value="ddim", label="sampler (img2img)", elem_id="edit-sampler")
                        e_steps = gr.Number(50, label="steps", precision=0, elem_id="edit-steps")
                    e_eta, e_churn = noise_boxes("edit")
                    with gr.Row():
                        e_n = gr.Number(4, label="images", precision=0, elem_id="edit-n")
                        e_seed = gr.Number(0, label="seed (-1 = random)", precision=0, elem_id="edit-seed")
                    e_go = gr.Button("Edit", variant="primary", elem_id="edit-go")
                    e_command = gr.Textbox(label="reproduce with", interactive=False, elem_id="edit-command", lines=2)
                with gr.Column(scale=2):
                    e_draw = gr.ImageEditor(label="paint over the part to fill (inpaint, mask 'drawn')", type="numpy", sources=[],
                                            brush=gr.Brush(colors=["#ff3030"], default_size=12), elem_id="edit-draw", height=300)
                    e_out = gr.Image(label="input, (masked or x_t), outputs", interactive=False, format="png", elem_id="edit-result",
                                     elem_classes="pixelated")

            with gr.Tab("Interpolate / voyage", id="interpolate"), gr.Row():
                with gr.Column(scale=1, min_width=280):
                    i_mode = gr.Radio(["seeds", "images", "prompts", "voyage"], value="seeds", label="between", elem_id="interp-mode")
                    with gr.Row():
                        i_seed_a = gr.Number(0, label=SEED_A_LABEL, precision=0, elem_id="interp-seed-a")
                        i_seed_b = gr.Number(1, label="seed B", precision=0, elem_id="interp-seed-b")
                    with gr.Row():
                        i_digit_a = gr.Number(0, label="digit A (images)", precision=0)
                        i_digit_b = gr.Number(1, label="digit B", precision=0)
                    i_t = gr.Slider(1, 999, value=500, step=1, label="images: mixed at t", elem_id="interp-t")
                    with gr.Row():
                        i_prompt_a = gr.Textbox("a handwritten one", label="prompt A", max_lines=1)
                        i_prompt_b = gr.Textbox("a handwritten seven", label="prompt B", max_lines=1)
                    i_keys = gr.Dataframe(value=[[0, "a handwritten zero"], [1, "a handwritten one"], [2, "a handwritten two"]],
                                          headers=["seed", "prompt"], datatype=["number", "str"], type="array",
                                          label=f"voyage keyframes (seed, prompt), at most {limits.max_keyframes}", elem_id="interp-keys")
                    with gr.Row():
                        i_frames = gr.Number(8, label=FRAMES_LABEL, precision=0)
                        i_sampler = gr.Dropdown(sorted(SAMPLERS), value="ddim", label="sampler")
                        i_steps = gr.Number(20, label="steps", precision=0)
                    i_eta, i_churn = noise_boxes("interp")
                    i_go = gr.Button("Render", variant="primary", elem_id="interp-go")
                with gr.Column(scale=2):
                    i_gif = gr.Image(label="animation", type="filepath", interactive=False, format="png", elem_id="interp-gif",
                                     elem_classes="pixelated", height=260)
                    i_strip = gr.Image(label="frames", interactive=False, format="png", elem_id="interp-strip", elem_classes="pixelated")

        # -- events ---------------------------------------------------------------------------
        @shown_errors
        def describe(run_: str):
            text, label, placeholder = actions.describe(run_)
            own = actions.own_sampler(run_)  # a distilled run: its own few-step sampler and steps
            modes = actions.interpolations(run_)  # prompts and voyages for a text-conditional model only
            text_modes = "prompts" in modes
            prompts = gr.update(visible=text_modes)
            T = actions.timesteps(run_)  # the t sliders span the model's own schedule (a fixed 1..999 ran past a T of 100)
            t_range = {"maximum": T - 1, "value": T // 2}  # one update each: gradio takes the value out of the one it reads
            return (gr.update(**t_range), gr.update(**t_range), text, gr.update(label=label, placeholder=placeholder),
                    gr.update(value=own[0]) if own else gr.update(),
                    gr.update(value=own[1]) if own else gr.update(), gr.update(choices=modes, value=modes[0]), prompts, prompts, prompts,
                    gr.update(label=SEED_A_LABEL if text_modes else "seed A"),
                    gr.update(label=FRAMES_LABEL if text_modes else "frames"))

        described = [e_t, i_t, about, condition, sampler, steps, i_mode, i_prompt_a, i_prompt_b, i_keys, i_seed_a, i_frames]
        run.change(describe, run, described, concurrency_id=LIGHT, concurrency_limit=None)
        app.load(describe, run, described, concurrency_id=LIGHT, concurrency_limit=None)

        def on_generate(run_, condition_, guidance_, sampler_, steps_, grid_, seed_, n_, eta_, churn_, request: gr.Request,
                        progress=gr.Progress()):  # noqa: B008 -- how gradio hands a progress bar to a callback
            try:
                _, settings = actions.settings(run_, condition_, sampler_, steps_, grid_, guidance_, seed_, n_, eta_, churn_)
            except (*USER_ERRORS, RuntimeError) as e:
                raise page_error(e) from None
            stop_flag = cancels[request.session_hash] = threading.Event()
            yield None, None, None, settings.seed, "", None
            try:
                for update in actions.generate(settings, stop_flag):
                    if "progress" in update:
                        progress(update["progress"], desc="sampling", unit="steps")
                        yield update["x_t"], update["x0"], gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    else:
                        yield gr.skip(), gr.skip(), update["result"], update["seed"], update["command"], update["files"]
            except Cancelled:
                gr.Info("cancelled")
            except (*USER_ERRORS, RuntimeError) as e:
                raise page_error(e) from None
            finally:
                stop_flag.set()  # also stops the sampler when the page cancels or the visitor leaves
                cancels.pop(request.session_hash, None)

        def on_cancel(request: gr.Request):
            flag = cancels.get(request.session_hash)
            if flag is not None:
                flag.set()

        go.click(on_generate, [run, condition, guidance, sampler, steps, grid, seed, n, eta, churn],
                             [x_t, x0, result, seed_used, command, files], api_name="generate", concurrency_id=HEAVY, concurrency_limit=concurrency)
        # not gradio's cancels=: that drops the event mid-step; the flag stops the sampler between two
        # steps, and the page then says "cancelled"
        stop.click(on_cancel, None, None, queue=False)

        forward_inputs = [f_upload, f_digit, f_schedule, f_t]
        forward_outputs = [f_x0, f_xt, f_spectrum, f_caption]
        forward = shown_errors(actions.forward)
        for trigger in (f_upload.change, f_digit.change, f_schedule.change, f_t.change):
            trigger(forward, forward_inputs, forward_outputs, api_name=False, concurrency_id=LIGHT, concurrency_limit=None,
                    trigger_mode="always_last", show_progress="hidden")
        app.load(forward, forward_inputs, forward_outputs, api_name="forward", concurrency_id=LIGHT, concurrency_limit=None)

        @shown_errors
        def editor_background(upload, digit):
            image, _ = actions.source(upload, digit)
            return {"background": actions.canvas(image), "layers": [], "composite": None}

        for trigger in (e_upload.change, e_digit.change):
            trigger(editor_background, [e_upload, e_digit], e_draw, concurrency_id=LIGHT, concurrency_limit=None)

        @shown_errors
        def on_edit(run_, upload, digit, mode, strength, t, mask, drawn, condition_, guidance_, sampler_, steps_, seed_, n_, eta_, churn_):
            layers = (drawn or {}).get("layers") or []
            return actions.edit(run_, upload, digit, mode, strength, t, mask, layers[0] if layers else None, condition_, guidance_,
                                sampler_, steps_, seed_, n_, eta_, churn_)

        e_go.click(on_edit, [run, e_upload, e_digit, e_mode, e_strength, e_t, e_mask, e_draw, condition, guidance, e_sampler, e_steps,
                             e_seed, e_n, e_eta, e_churn], [e_out, e_command], api_name="edit", concurrency_id=HEAVY, concurrency_limit=concurrency)

        i_go.click(shown_errors(actions.interpolate), [run, i_mode, i_seed_a, i_seed_b, i_digit_a, i_digit_b, i_t, i_prompt_a,
                                                       i_prompt_b, i_keys, i_frames, condition, guidance, i_sampler, i_steps, i_eta,
                                                       i_churn],
                   [i_gif, i_strip], api_name="interpolate", concurrency_id=HEAVY, concurrency_limit=concurrency)
    return app
