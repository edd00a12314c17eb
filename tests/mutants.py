"""Do the math tests fail when a formula is wrong? Flip one arithmetic operator (+ <-> -, * <-> /) in a module, run
the tests that should catch it, put the module back; a mutant the tests pass is a formula no test pins.

    .venv/bin/python tests/mutants.py --files src/ddpmkit/sampling/ode.py --tests tests/test_samplers.py [--n 40]

Mutants are drawn at random (--seed) from every such operator outside error messages and asserts; the module is always
restored (also on Ctrl-C; after a kill, `git checkout` the file); a test run past --timeout counts as caught (hung). A
surviving mutant is either a gap in the tests or an equivalent mutant (e.g. a normalising constant that cancels in a
ratio, the sign of a Gaussian draw).
2026-12-07: 80 mutants of the sampler, schedule, loss and guidance modules left 17 survivors; tests/test_analytic.py
and the 3M and clipping tests in tests/test_samplers.py came of them (docs/samplers_and_evaluation.md). Ten more
batches the same day (309 mutants, also of the networks, conditioning, the training tasks, grids, cascades, the
training engine, generate's chunks, the data and the web page) left 70; each that is not equivalent is now caught,
mostly by a layer or a loss written out from its parts (tests/test_nets.py, tests/test_latent.py); three of the
progress-bar total's were in a line that did nothing (the bar it set is off there), now gone.
Then `--kinds bounds` (seven batches, 243 mutants: the samplers and schedules, the evaluation and editing modules, the
networks and pipelines, the training engine, the page and the data, all 56 of config.py, the distillation and unCLIP
tasks) left 142: an option's value exactly at an end of its range, taken or refused against its message, and three
samplers that failed on the shortest schedules. 36 are equivalent (noise times a zero sigma, float equalities, identities); the rest are caught,
mostly in tests/test_bounds.py and the config table in tests/test_config.py. A zero-initialised layer hides what comes before it:
perturb every weight first.
Then `--kinds consts` and `--kinds swap` (nine batches, 355 mutants: the samplers and schedules, evaluation and editing,
the networks, the pipelines, the data and the page, the training tasks) left 77: unCLIP's second copy of slerp (gone),
cross-attention never written out, an unused alias, a seed per row never given to img2img, a clip never tested at
both ends, an image preview never drawn in a test; 23 are equivalent or settings, 54 now caught (the ninth batch's
last 7 the next day: the direction of the interpolations, in tests/test_web_actions.py; the others by other files).
Then four more (2026-12-07, 110 mutants: distillation and the CLIP, classifier and unCLIP tasks, the training engine and
its optimizer schedule, viz.py with every kind, the diffusers bridge) left 35, 17 now caught: the truncated-SNR weight above its floor,
CLIP's captions under a drop probability, the spectrum's rings (a cosine of k cycles was binned below k / n: fixed),
a grey grid's PNG, t = T in the forward command, diffusers' default channel counts; the engine left none; 18 are the
pictures' settings (figure sizes, margins, fonts, a preview seed) or equivalent. A fourteenth (bounds, consts, swap of
the CLI's plumbing: cli/common.py, cli/sample.py, cli/edit.py; 30 mutants) left 13: the edit commands' argument order
to the pipelines (their strips are now the library's edits, pixel for pixel; 4), 3 caught by other files, and 6
command-line defaults (steps, the GIF's cadence, a grid file's rounding). A fifteenth (consts, swap of models.py and
checkpoint.py; 20 mutants) left 10: which models clip x_0 (pixels only; now tested), 9 caught by other files.
Three more (consts and swaps; 64 mutants): evaluation (report.py, inception.py, metrics.py: 24) left 5: a kernel size
of the FID Inception (its parameter count is now torchvision's documented one less the auxiliary head), the benches'
DigitScorer never run in a test (its arguments swapped: now run on the held-out digits), 1 caught by another file, a
tolerance and an equivalent np.clip; text.py, loras.py, finetune.py and dreambooth.py (24) left 6, 5 now caught (an
encoder from a folder, the hub turned off, an unconditional pipeline's fine-tune, DreamBooth's size message, a LoRA
checkpoint folder) and a config default; the page's limits, shelf and server (16, bounds too) left 1: a random seed
drawn from one past max_seed (now tested). devices.py (12, bounds too) left 2: cuda:N at N = the GPU count (now tested,
with torch's GPU answers stubbed) and cpuinfo's split at a second colon (equivalent).
The cascade and unCLIP commands (14) left 6: upscale.png's bicubic row clamped wrongly at either end (its rows are now
checked against the inputs and samples; 2), and 4 settings (a GIF's frame cadence, a figure's columns).
Two more (consts, swap, bounds; 2026-12-07, thirtieth session): lessons.py (14, the tests with the notebooks: run with
PYTEST_ADDOPTS=--nbmake DDPMKIT_LESSONS_FAST=1 and an absolute PYTHONPATH, as the notebooks' kernels start in lessons/)
left 8: show()'s display range off by one (0..255 is now checked: a grey level is itself / 255 on screen), a channel
test matplotlib makes equivalent (it squeezes an (H, W, 1) image), and figure sizes and a font size; the page's layout
(web/app.py, 12) left 3, all defaults (a column's width, the edit tab's digit index and posterior t).
One more (consts, swap, bounds; thirty-first session): config.py with its new rules of which keys a config reads (30, against
tests/test_config.py) left 4: the lowest train.batch_size (and log_every, num_samples, sample_steps) and a small asymmetric_k,
never taken in a test (now taken), and two equivalent (a close-match count of which only the first is used, a split's limit).
One more (consts, swap, bounds; thirty-second session): report.py again, with its new notes of flags an evaluation does not read
(16, against the eval CLI test and tests/test_evaluate.py) left 9: the null label of a conditional model's bits/dim (its argument
order; now tested against the bound at the null label, and apart from a class's), 3 caught by other files (tests/test_latent.py's
applicable metrics, tests/test_diffusers.py's Inception eval), and 5 settings or equivalent (the default n, a warning's stacklevel,
the report's JSON indent, the judge's chunk size and the clamp of samples already in [-1, 1]).
And the cascade (pipelines/cascade.py and cli/cascade.py, 12, against tests/test_superres.py) left 4: `upscale --fit` of an
image smaller than the stage's input (never run: now tested) and the reverse process's recording cadence beside the progress flag
(equal at 3 steps: now 10 steps recorded every 5), and 2 equivalent (a clamp of images already in [-1, 1], a shape comparison
that only adds a resize to the same size).
And stop.py, the Ctrl-C handler (11, all four kinds, against the three Ctrl-C tests) left 1: the initial t_requested,
overwritten by the first request (equivalent).
And likelihood.py (30, arith, consts, swap, against its tests in test_evaluate.py, test_bounds.py and test_losses.py) left 1:
the ODE likelihood's bits/dim (nats / ln 2) never checked (now against -log2 p(x) of the Gaussian mixture).
And posthoc_ema.py (30, arith, consts, swap) left 1: the profile fit's relative error (now the sine of the angle between a
profile and the one snapshot fitting it).
And uncertainty.py (20, arith, consts, swap) left 4: the head's Fourier features (c = log-SNR / 8, f c, 2 pi) never written out
(now, through a one-hot layer; 3), and the buffers' seed (saved with the weights: equivalent).
And copies.py (20, all four kinds) left 2: two training images, the fewest the ratio test takes, never given (now, with the
one-image refusal), and a top-k of 3 where 2 are kept (equivalent).
The thirty-third session: the per-sample noise, EDM's churn and the grid search (sampling/noise.py, churn.py, optimize.py; 30,
all four kinds, against tests/test_samplers.py, test_bounds.py, test_noise.py) left 2: the block drawn ahead swapped with its key,
so that every block was drawn again on the sampler's thread (the same numbers; now the test counts the draws on the spot), and
the grid search's x_T moved with .to(dtype, device), which leaves it on the CPU (equivalent there; tests/test_cuda.py's tune-grid
on a GPU catches it).
And the guidance door and the voyage (pipelines/guided.py, voyage.py; 30, all four kinds, against test_conditioning.py,
test_guidance.py, test_bounds.py, test_generate.py, test_editing.py) left 6: the default classes 0..9 (`10 -> 11`, and `> 0 ->
> 1` in slice()'s guess of a count) hid a bug: a model or classifier of other than 10 classes got 0..9 (now every class of the
model, or of the classifier guiding an unconditional one, in turn from the slice's first sample; tested with three classes),
a keyframe file's line number in its error (now tested), CLIP guidance's argument order (2, caught by tests/test_unclip.py's
command-line test, checked by hand) and the first frame's condition keys (those of every frame: equivalent).
And super-resolution and the distillation tasks (superres.py, train/superres.py, train/progressive.py; 30, all four kinds, against
test_distillation.py and test_superres.py) left 6: consistency training's first interval t_0 < t_1 never drawn (`randint(1, ..)`:
now the intervals are counted), the augmentation noise's seed k + AUG_SEED_OFFSET never written out (now, with a check that no
two of a 4-stage cascade's streams meet below 10**8 samples), and 4 equivalent (a blur draw's `<` at a probability of 0 or 1,
sigma's clamp under a zero-sigma delta kernel, `> 0` there, the preview's square side; its triples are now checked too).
And graphs.py, the CUDA graphs (30, all four kinds, against tests/test_graphs.py) left 13: no CPU test could run the sampling
path (CudaGraphed captured with CUDA alone), so its warm-up count, signature, inputs and outputs went unchecked. Captured's
record and replay are now its only CUDA parts and CudaGraphed takes a stand-in, as TrainingGraphs did; the same draw of 30
again left 3: the capture's own call (2, run on a GPU by tests/test_cuda.py) and a warning's stacklevel.
And images.py, train/batches.py and evaluate/judge.py (30, all four kinds, against test_data.py, test_editing.py,
test_host_waits.py, test_evaluate.py and the batch-index test) left 12: the noisy classifier's accuracy by t (its accuracy_tN
metrics) never written out (4: now, x_t and t as the network sees them, against a recording classifier), the mask halves'
exact rows (2: now all four), fit_image's downsampling (now against block means), a built-in image's name split at its first
colon (now `mnist5k:1:2` is a clear error, not a traceback), step_batch's default slice (now caught by the consistency
intervals' count in test_distillation.py), and 3 equivalent (an extra empty epoch, a square image's side, a stacklevel).
And the exact references (analytic.py, process.py, reverse.py; 30, all four kinds, against test_analytic.py, test_process.py,
test_reverse.py, test_sampling_exact.py, test_losses.py) left 2: the ring's angles (the 8gaussians toy's modes; now written
out, which also found its stds and gaussian()'s kept as float32, 0.1 as 0.10000000149: now float64) and a lone component's
weight (normalised: equivalent).
The thirty-fourth session: the parameterizations, EDM's preconditioning and the continuous-time samplers (parameterization.py,
preconditioning.py, sampling/continuous.py; 30, all four kinds, against test_parameterization.py, test_preconditioning.py,
test_samplers.py, test_losses.py, test_sampling_exact.py, test_bounds.py) left 1: Denoiser.with_x0's eps from (x_t, x0) with
the two swapped, which thresholding and guidance rescale go through (now with_x0 and with_eps against the sample's true eps
and x0, in every prediction).
And the denoiser's training task (train/denoiser.py, train/task.py, precision.py; 30, all four kinds, against test_losses.py,
test_kinds.py, test_host_waits.py, test_preconditioning.py, test_train.py) left 10: the held-out bits/dim during training had
been run on a 2-D toy only, and checked for finiteness (3: the image branch's discretised decoder and clip, its 64 examples and
the estimate's arguments; now an image run's logged value is recomputed from its EMA), an image run's preview never compared
with a sample (its clipped x_0; now pixel for pixel), a 2-D run's preview never drawn in a test (now its samples and data are
checked), map_dataset's labels and class names carried to an encoded dataset (2: one caught by test_latent.py, both now by
test_data.py), and 3 equivalent on a CPU (the 2 GB limit of the copy of the data kept on a GPU).
And the captions, the model kinds and the autoencoder task (captions.py, kinds.py, train/autoencoder.py, all four kinds, against
test_kinds.py, test_data.py, test_conditioning.py, test_latent.py; 25 of a draw of 30 ran: its worktree was removed under the
last 5) left 10, all in the autoencoder's preview and held-out PSNR during training, which no test had switched on (6: the
preview's 8 digits, its arguments and the reconstruction's, the clip's order and its upper end, evaluate's arguments; now the
preview and the PSNR are checked against the clipped reconstructions of a network that reaches past both ends, and a trained
run's preview pixel for pixel), and 4 equivalent (PSNR's arguments, which it treats alike, two chunk sizes, and 500 held-out
where digits has 300).
And the metrics, unCLIP's prior network and the tensor helpers (evaluate/metrics.py, nets/prior.py, utils.py; 30, all four
kinds, against test_evaluate.py, test_schedules.py, test_nets.py, test_unclip.py) left 10: the prior never written out (3:
its time MLP's order, the query token as the output, a dropout of 1 in training; now the prior is its parts, in training
mode too), KID's smallest set and its unbiased denominator (2, caught by test_bounds.py), and 5 settings or equivalent (the
query's initial scale twice, IS's row-sum tolerance and log floor, and np.clip's arguments, which it treats alike here).
And the training commands and the command line's door (cli/train.py, cli/forward.py, cli/__init__.py; 30, all four kinds,
against test_cli.py and test_devices.py) left 11: the demo's `--steps` equal to T (Algorithm 2 over all T) refused under `>=`,
a checkpoint kept at the last step taken as the weaker guide under `<=`, `--autoguide-scale 1` still loading a guide, a
warning other than a Note passed on with its file and line swapped, and posthoc-ema's `--out` with one width (now each is
tested), 2 caught by test_posthoc_ema.py, and 4 settings or multi-process only (the forward noise's default seed, the demo's
default minutes and GIF cadence, the hint printed by rank 0).
And the command line's plumbing again after the day's DefaultSteps and grid-file changes (cli/common.py, cli/edit.py; 25, all
four kinds, against test_samplers.py, test_editing.py, test_cli.py) left 3: a cascade stage's variance default and its steps
and guidance order (2, caught by test_superres.py) and the voyage GIF's last-frame hold (a setting).
And the sampling, cascade and unCLIP commands (cli/sample.py, cli/cascade.py, cli/unclip.py; 25, all four kinds, against
test_superres.py, test_unclip.py, test_samplers.py, test_cli.py) left 6: `unclip`'s arguments to text_to_image in their order
and its GIF's cadence at fewer than 100 steps (2: now its samples are the library's, bit for bit, with best-of and prior steps
that differ, and its 3 steps give 3 frames), and 4 settings (the cascade's printed time, its GIF cadence and its figure's
columns, unclip-interpolate's default frames).
And the page's actions (web/actions.py; 20, all four kinds, against test_web_actions.py) left 8: the inpainting canvas of a
grey image in RGB and the warm-up's forward request (2, now tested), and 6 settings or equivalent (three display upscales
at these sizes, a distilled run's step count where it records none, the GIF cadence, and the warm-up's upload and digit
order, whose result is thrown away).
"""
from __future__ import annotations

import argparse
import ast
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}  # a sign or a coefficient
BOUNDS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}  # an end of a range in or out: off by one
KINDS = ("arith", "bounds", "consts", "swap")


def _defaults(tree: ast.Module) -> set[int]:
    """ids of the nodes in option defaults (a function's argument defaults, a class's annotated fields) and in a module's
    named settings (`GIF_SAMPLES = 64`, a seed offset): a changed default is another recipe, not a wrong formula."""
    roots: list[ast.AST] = [s.value for s in tree.body if isinstance(s, (ast.Assign, ast.AnnAssign)) and s.value is not None
                            and all(isinstance(t, ast.Name) and t.id.isupper() for t in (s.targets if isinstance(s, ast.Assign) else [s.target]))]
    for n in ast.walk(tree):
        if isinstance(n, ast.arguments):
            roots += [d for d in (*n.defaults, *n.kw_defaults) if d is not None]
        if isinstance(n, ast.ClassDef):
            roots += [s.value for s in n.body if isinstance(s, ast.AnnAssign) and s.value is not None]
    return {id(m) for r in roots for m in ast.walk(r)}


def _number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _changed(value: int | float) -> int | float:
    """A number one off (ints: a count, an index, an exponent) or twice as large (floats; 0.0 becomes 1.0)."""
    if isinstance(value, int):
        return value + 1
    return 2 * value if value else 1.0


Site = tuple[ast.AST, str, int]  # the node, its kind, which of its parts (a comparison's, an argument's index)
COMMUTATIVE = {"max", "min", "maximum", "minimum", "hypot", "logaddexp", "equal", "transpose", "swapaxes", "swapdims"}  # order is moot


def _swappable(node: ast.Call) -> list[int]:
    """k for each pair of neighbouring positional arguments k, k + 1 that differ (not in a commutative call)."""
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    if name in COMMUTATIVE or any(isinstance(a, ast.Starred) for a in node.args):
        return []
    return [k for k in range(len(node.args) - 1) if ast.dump(node.args[k]) != ast.dump(node.args[k + 1])]


def sites(tree: ast.Module, kinds: tuple[str, ...] = ("arith",)) -> list[Site]:
    """The sites a mutant may change, in a fixed order: a BinOp for "arith", the k-th comparison of a Compare for
    "bounds", a number for "consts" (not in option defaults), the k-th and (k+1)-th positional arguments of a call for
    "swap"; none inside f-strings, raise or assert."""
    quiet = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert)) for n in ast.walk(node)}
    if "consts" in kinds:
        quiet |= _defaults(tree)
    found: list[Site] = []
    for n in ast.walk(tree):
        if id(n) in quiet:
            continue
        if "arith" in kinds and isinstance(n, ast.BinOp) and type(n.op) in ARITH:
            found.append((n, "arith", 0))
        if "bounds" in kinds and isinstance(n, ast.Compare):
            found += [(n, "bounds", k) for k, op in enumerate(n.ops) if type(op) in BOUNDS]
        if "consts" in kinds and _number(n):
            found.append((n, "consts", 0))
        if "swap" in kinds and isinstance(n, ast.Call):
            found += [(n, "swap", k) for k in _swappable(n)]
    return found


def mutant(source: str, index: int, kinds: tuple[str, ...] = ("arith",)) -> tuple[str, int, str, str]:
    """The module with its index-th site changed (comments are lost: the text is regenerated), the line, and the
    expression before and after."""
    tree = ast.parse(source)
    node, kind, k = sites(tree, kinds)[index]
    before = ast.unparse(node)
    if kind == "arith":
        node.op = ARITH[type(node.op)]()
    elif kind == "bounds":
        node.ops[k] = BOUNDS[type(node.ops[k])]()
    elif kind == "consts":
        node.value = _changed(node.value)
    else:
        node.args[k], node.args[k + 1] = node.args[k + 1], node.args[k]
    return ast.unparse(tree), node.lineno, before, ast.unparse(node)


def verdict(tests: list[str], timeout: float) -> str:
    """'killed' when the tests fail, 'hung' when they outlast `timeout` (e.g. a counter that never reaches its limit;
    the whole process group is stopped), 'SURVIVED' when they pass."""
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-n", "2", "-p", "no:cacheprovider", *tests],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return "killed" if run.wait(timeout) != 0 else "SURVIVED"
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        return "hung"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="+", required=True, help="modules to mutate")
    p.add_argument("--tests", nargs="+", required=True, help="pytest paths that should catch every mutant")
    p.add_argument("--n", type=int, default=40, help="mutants to try (at random among all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds before a test run counts as hung (caught)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=["arith"],
                   help="arith: + <-> -, * <-> /; bounds: < <-> <=, > <-> >=; consts: an int n -> n + 1, a float x -> 2x (not in defaults); "
                        "swap: two neighbouring positional arguments of a call")
    args = p.parse_args()
    kinds = tuple(args.kinds)
    pool = [(Path(f), i) for f in args.files for i in range(len(sites(ast.parse(Path(f).read_text()), kinds)))]
    chosen = random.Random(args.seed).sample(pool, min(args.n, len(pool)))
    print(f"{len(pool)} possible mutants; trying {len(chosen)}", flush=True)
    survivors = 0
    for path, index in chosen:
        original = path.read_text()
        text, line, before, after = mutant(original, index, kinds)
        t0 = time.time()
        try:
            path.write_text(text)
            outcome = verdict(args.tests, args.timeout)
        finally:
            path.write_text(original)
        survivors += outcome == "SURVIVED"
        print(f"{outcome:8} {path}:{line}  {before[:80]}  ->  {after[:80]}  ({time.time() - t0:.0f} s)", flush=True)
    print(f"{survivors} of {len(chosen)} survived")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
