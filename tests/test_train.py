import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ddpmkit
import forked
from conftest import needs_text, reads_per_call
from ddpmkit.analytic import GaussianMixture, nearest_component
from ddpmkit.checkpoint import list_checkpoints, read_config
from ddpmkit.config import PRESET_DIR, ConfigError, load_config
from ddpmkit.models import load_diffusion
from ddpmkit.superres import downsample
from ddpmkit.train import DenoiserTask, TrainingError, batch_indices, run, train

ROOT = Path(__file__).resolve().parents[1]


def test_batch_indices_are_epoch_permutations():
    n, bs = 10, 4
    stream = torch.cat([batch_indices(s, bs, n, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, bs, n, 3), stream[8:12])  # a step's batch depends only on the step


@pytest.mark.slow
def test_toy_model_covers_all_8_modes(tmp_path):
    cfg = load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}"])
    train(cfg, progress=False)
    m = load_diffusion(tmp_path)
    out = ddpmkit.sample(m.network, (2000, 2), m.schedule, steps=200, generator=torch.Generator().manual_seed(0))
    gm = GaussianMixture.ring(8, radius=2.0, std=0.1)
    k = nearest_component(gm, out.x)
    dist = (out.x.double() - gm.means[k]).norm(dim=1)
    shares = torch.bincount(k[dist < 0.5], minlength=8).double() / len(k)
    assert (dist < 0.5).double().mean() > 0.9, "most samples lie near a mode"
    assert bool((shares > 0.07).all()), f"every mode gets its share (1/8 = 12.5%): {shares.tolist()}"


def _weights(run_dir: Path) -> dict:
    return load_file(list_checkpoints(run_dir)[-1] / "model.safetensors")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ddpmkit.cli", *args]


TINY = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4",
        "train.batch_size=16", "train.sample_every=0", "train.lr=1e-3", "train.warmup_steps=5", "train.log_every=5"]


# one tiny run of each kind the engine trains (digits, 8x8), fp32: bf16 autocast is slow on CPUs without bf16 units
KINDS = {
    "denoiser": ["mnist", *TINY],
    "autoencoder": ["mnist_autoencoder", "data.name=digits", "autoencoder.pad_to=8", "autoencoder.channel_mult=1,2",
                    "autoencoder.base_channels=8", "train.batch_size=16", "train.sample_every=0", "train.warmup_steps=5", "train.log_every=5"],
    "classifier": ["mnist_classifier", *TINY],
    "superres": ["imagen_sr", *TINY, "network.text_encoder=", "superres.low_res=4", "superres.blur_prob=0.5"],
    # the contrastive loss couples the examples of a batch: 2 processes gather the embeddings (with gradients)
    "clip": ["clip", *TINY, "clip.embed_dim=8", "train.eval_every=0"],
}


# the CLIP kind trains on captions: it needs the offline text encoder
KIND_PARAMS = [pytest.param(k, marks=needs_text) if k == "clip" else k for k in sorted(KINDS)]
# the runs that start from a trained one (a tiny digits denoiser, x0-predicting as the consistency student needs):
# a LoRA fine-tune (only its adapters train and are saved), and the two distillation kinds (teacher + student + EMA target)
FROM_BASE = {
    "lora": lambda base: ["mnist", *TINY, "train.lora_rank=4", "train.lr=5e-2", f"train.init_from={base}"],
    "progressive": lambda base: [str(base / "config.json"), "train.task=progressive", f"distill.teacher={base}", "distill.student_steps=4"],
    "consistency": lambda base: [str(base / "config.json"), "train.task=consistency", f"distill.teacher={base}", "distill.points=10",
                                 "train.ema_decay=0.9"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KIND_PARAMS, pytest.param("lora", marks=pytest.mark.skipif(find_spec("peft") is None, reason="peft")),
                                  "progressive", "consistency"])
def test_resume_after_kill_is_exact(tmp_path, capsys, kind):
    """N steps in one run == N/2 steps, a SIGKILL, and --resume for the rest, for every kind of model (and a LoRA run)."""
    n = 20
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    if kind in FROM_BASE:
        spec = FROM_BASE[kind](train(load_config("mnist", [*TINY, "train.steps=5", f"train.run_dir={tmp_path / 'base'}"]), progress=False))
    else:
        spec = KINDS[kind]
    base = [*spec, f"train.steps={n}", "train.max_minutes=0", "train.keep_checkpoints=0", "train.mixed_precision=no"]
    if kind == "denoiser":
        base.append("network.dropout=0.2")  # the dropout masks are seeded by the step, so they repeat on resume
    # the killed run in a process of its own (tests/forked.py) with as many threads as this one, so that every run
    # sums in the same order; the straight and the resumed runs in this process, the resumed one through the command
    # line's own entry point
    train(load_config(base[0], [*base[1:], f"train.run_dir={straight}", "train.checkpoint_every=1000"]), progress=False)
    proc = forked.start(["train", *base, f"train.run_dir={killed}", f"train.checkpoint_every={n // 2}", "--quiet"])
    half = killed / f"ckpt-{n // 2:07d}"
    deadline = time.time() + 120
    while not half.exists() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL
    proc.join()
    assert half.exists()
    for later in list_checkpoints(killed):  # as if the kill came right after the half-way checkpoint
        if later != half:
            subprocess.run(["rm", "-rf", str(later)], check=True)
    from ddpmkit.cli import main

    assert main(["train", *base, f"train.run_dir={killed}", f"train.checkpoint_every={n // 2}", "--resume", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"at step {n // 2}" in out + err and f"{kind.replace('lora', 'denoiser')} run folder" in out
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea = load_file(list_checkpoints(straight)[-1] / "ema.safetensors")
    eb = load_file(list_checkpoints(killed)[-1] / "ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not list(killed.glob(".tmp-*"))


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_of_it_that_resumes_exactly(tmp_path, capsys):
    """Ctrl-C raised KeyboardInterrupt wherever the run was (the newest periodic checkpoint was all that was kept: up to
    train.checkpoint_every steps lost). Now the first one stops the run at the end of its step with a checkpoint there,
    and --resume from it ends with the weights of a run never stopped."""
    n = 600
    base = ["toy2d", f"train.steps={n}", "train.batch_size=64", "train.log_every=10", "train.checkpoint_every=100000",
            "train.keep_checkpoints=0", "train.max_minutes=0"]
    stopped, output = tmp_path / "stopped", tmp_path / "output.txt"
    proc = forked.start(["train", *base, f"train.run_dir={stopped}", "--quiet"], output)  # the same summation order as this process
    log, deadline = stopped / "train_log.jsonl", time.time() + 120
    while not (log.exists() and log.read_text().strip()) and proc.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(timeout=120)
    if proc.is_alive():  # it did not stop: end it, or this worker would wait for it at exit (multiprocessing joins its children)
        proc.kill()
        proc.join()
    said = output.read_text()
    assert proc.exitcode == 130, said
    at = [read_config(c)[1].step for c in list_checkpoints(stopped)]
    assert len(at) == 1 and 10 <= at[0] < n, (at, said)  # the step it stopped at, not a periodic one
    assert f"stopped at step {at[0]} of {n}, with a checkpoint of it: continue with `ddpmkit train {stopped / 'config.json'} --resume`" in said
    from ddpmkit.cli import main

    assert main(["train", str(stopped / "config.json"), "--resume", "--quiet"]) == 0
    assert f"resumed from {stopped / f'ckpt-{at[0]:07d}'} at step {at[0]}" in "".join(capsys.readouterr())
    straight = train(load_config(base[0], [*base[1:], f"train.run_dir={tmp_path / 'straight'}"]), progress=False)
    a, b = _weights(straight), _weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_stops_every_process_of_a_launch_at_one_log_step_with_a_checkpoint_of_it(tmp_path):
    """Under torchrun Ctrl-C was Python's own in each process (each would notice a request at a step of its own, and a
    checkpoint is written by all together): the steps since the last checkpoint were lost. Now every process stops at
    the next log step if any was asked, with a checkpoint there. The Ctrl-C reaches each process twice (from the
    terminal and from torchrun, which passes it on): the copy is not a second Ctrl-C."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", "--log-dir", str(tmp_path / "tr")]
    args = ["toy2d", "train.steps=100000", "train.batch_size=64", "train.log_every=20", "train.checkpoint_every=100000",
            "train.keep_checkpoints=0", "train.max_minutes=0", f"train.run_dir={run_dir}", "--quiet"]
    # a session of its own: the test's Ctrl-C goes to torchrun and its processes, as a terminal's goes to its foreground group
    proc = subprocess.Popen([*torchrun, "-m", "ddpmkit.cli", "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log, deadline = run_dir / "train_log.jsonl", time.time() + 120
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    said, _ = proc.communicate(timeout=120)
    at = [read_config(c)[1].step for c in list_checkpoints(run_dir)]
    assert len(at) == 1 and at[0] % 20 == 0 and 20 <= at[0] < 100000, (at, said)  # a log step, not a periodic checkpoint
    assert said.count("Ctrl-C: stopping at the next log step (every train.log_every = 20 steps), with a checkpoint of it") == 1, said
    assert said.count(f"stopped at step {at[0]} of 100000, with a checkpoint of it") == 1 and said.count("interrupted\n") == 1, said
    assert json.loads(log.read_text().splitlines()[-1]) == {"step": at[0], "interrupted": True}
    assert load_diffusion(run_dir).step == at[0]


def test_a_second_ctrl_c_stops_at_once_but_a_launchers_copy_of_the_first_does_not(monkeypatch):
    """A real SIGINT only asks; then, on the handler's own clock, a copy within ECHO_S does nothing and a press after it
    stops at once, as Python's own handler does. One process has no copy to wait for. The suite may run with SIGINT
    ignored (a shell's background job: `make test &`), where the second press is ignored as the handler before would
    (the fresh-clone suite failed so when started in the background): Python's handler is set for the test's length."""
    from types import SimpleNamespace

    from ddpmkit.train import stop

    clock = [100.0]
    monkeypatch.setattr(stop, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop.GracefulStop(processes=2, announce=False) as asked:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: asked, nothing raised
            deadline = time.monotonic() + 30
            while not asked.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            assert asked.requested and asked.t_requested == 100.0
            clock[0] += stop.ECHO_S - 0.01
            asked.request(signal.SIGINT, None)  # the launcher's copy of it
            clock[0] += 0.02
            with pytest.raises(KeyboardInterrupt):
                asked.request(signal.SIGINT, None)  # a second press
        with stop.GracefulStop(processes=1, announce=False) as asked:  # one process: no copy to wait for
            asked.request(signal.SIGINT, None)
            with pytest.raises(KeyboardInterrupt):
                asked.request(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started in the background: the first SIGINT (`kill -INT`) still asks
        with stop.GracefulStop(processes=1, announce=False) as asked:
            asked.request(signal.SIGINT, None)
            asked.request(signal.SIGINT, None)  # the second is ignored, as it was before the run
            assert asked.requested and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


# two processes for the kinds whose batches differ in how they split: per-example losses (denoiser), extra
# per-example inputs built from each process's half (superres), and a loss that couples the whole batch (clip);
# the autoencoder and the classifier take the denoiser's path (a per-example mean over a plain image batch)
# (and consistency distillation: teacher ODE steps and the EMA target network on each process's half)
# (and a LoRA run: only the adapters' gradients are all-reduced)
TWO_PROCESS_KINDS = [*(k for k in KIND_PARAMS if getattr(k, "values", (k,))[0] in ("denoiser", "superres", "clip")), "progressive", "consistency",
                     pytest.param("lora", marks=pytest.mark.skipif(find_spec("peft") is None, reason="peft"))]


def _two_process_spec(kind: str, base: Path) -> list[str]:
    spec = FROM_BASE[kind](base) if kind in FROM_BASE else KINDS[kind]
    return [*spec, "train.steps=6", "train.log_every=3", "train.max_minutes=0", "train.checkpoint_every=1000",
            "train.mixed_precision=no"]  # fp32, so the only difference is the order of the gradient all-reduce


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Every kind's run twice: in one process, and in two (torchrun, gloo) with the same global batch. The
    two-process runs of all kinds go through one launch (tests/train_many.py): a launch costs seconds of imports."""
    root = tmp_path_factory.mktemp("two_processes")
    base = train(load_config("mnist", [*TINY, "train.steps=5", f"train.run_dir={root / 'base'}"]), progress=False)
    kinds = [getattr(k, "values", (k,))[0] for k in TWO_PROCESS_KINDS if not any(m.name == "skipif" and m.args[0] for m in getattr(k, "marks", ()))]
    # on the CPU even where there is a GPU: two processes cannot share one GPU, and CPU and GPU round differently
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    from ddpmkit.train.engine import has_accelerator

    for kind in kinds:
        common = _two_process_spec(kind, base)
        if has_accelerator():  # the one-process run on the CPU too
            subprocess.run(_cli("train", *common, f"train.run_dir={root / kind / 'one'}", "--quiet"), check=True, cwd=ROOT, env=env)
        else:  # in this process: a fresh one costs seconds of imports
            train(load_config(common[0], [*common[1:], f"train.run_dir={root / kind / 'one'}"]), progress=False)
    runs = root / "runs.json"
    runs.write_text(json.dumps([[*_two_process_spec(k, base), f"train.run_dir={root / k / 'two'}"] for k in kinds]))
    # --log-dir: torchrun's own folder inside the test's, where it would leave an empty torchelastic_* in /tmp per run
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "--log-dir", str(root / "torchrun")]
    subprocess.run([*torchrun, str(ROOT / "tests" / "train_many.py"), str(runs)], check=True, cwd=ROOT, env=env)
    return root


@pytest.mark.slow
@pytest.mark.xdist_group(name="two_processes")
@pytest.mark.parametrize("kind", TWO_PROCESS_KINDS)
def test_two_processes_train_like_one(two_process_runs, kind):
    """torchrun with 2 CPU processes (gloo): synchronized weights, each process a different half of
    every global batch, and the same result as one process with the same global batch."""
    spec = _two_process_spec(kind, two_process_runs / "base")
    one, two = two_process_runs / kind / "one", two_process_runs / kind / "two"
    log = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["world_size"] == 2 and log[-1]["params_in_sync"] is True
    for rank in (0, 1):  # counted in train_many.py: in each process no read in a step, one per log window (its steps'
        calls = json.loads((two / f"host_reads.{rank}.json").read_text())  # flags and losses, every process's stop flags beside them)
        assert [n for method, _, n in calls if method == "train_step"] == [0] * 6
        assert [(s, n) for method, s, n in calls if method == "periodic" and n] == [(3, 1), (6, 1)]
    # Adam divides by sqrt(v): in the zero-initialised layers, whose gradients are ~0 in the first steps,
    # the rounding of another all-reduce order moves single weights by ~1e-3. Compare what the networks
    # compute instead, against how far training moved it from the initial network.
    from ddpmkit.checkpoint import load_saved_state
    from ddpmkit.finetune import adapt
    from ddpmkit.nets import build_for_task

    cfg = load_config(spec[0], spec[1:])
    torch.manual_seed(cfg.train.seed)
    nets = [adapt(build_for_task(cfg, (1, 8, 8)), cfg) for _ in range(3)]  # a LoRA run's: its base with adapters (B = 0)
    load_saved_state(nets[1], _weights(one))
    load_saved_state(nets[2], _weights(two))
    g = torch.Generator().manual_seed(0)
    x, t = torch.rand((32, 1, 8, 8), generator=g) * 2 - 1, torch.randint(0, 1000, (32,), generator=g).float()
    with torch.no_grad():
        if kind == "autoencoder":
            init, a, b = (n.decode(n.encode(x)[0]) for n in nets)
        elif kind == "clip":
            init, a, b = (n.eval().encode_image(x, t) for n in nets)
        else:
            extra = {"low_res": downsample(x, 4), "aug_level": torch.full((32,), 0.1)} if kind == "superres" else {}
            init, a, b = (n.eval()(x, t, **extra) for n in nets)
    moved = (a - init).norm()
    assert moved > 0.05 * init.norm()  # six steps change what the network computes
    assert (a - b).norm() / moved < 1e-3, ((a - b).norm() / moved).item()


def started_since(threads: set[threading.Thread]) -> list[str]:
    """The threads alive now that were not in `threads`, but tqdm's monitor (tqdm's one per process, started with its
    first bar)."""
    return [t.name for t in threading.enumerate() if t not in threads and t.name != "tqdm_monitor"]


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    cfg = load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}", "train.steps=200", "train.lr=1e12",
                                                  "train.warmup_steps=1", "train.grad_clip=0", "train.checkpoint_every=1000"])
    threads = set(threading.enumerate())
    with pytest.raises(TrainingError, match=r"training stopped at step \d+: the (loss|gradient) was not finite .*lower train.lr") as e:
        train(cfg, progress=False)
    assert "\n" not in str(e.value) and "last good checkpoint: none" in str(e.value)
    assert list_checkpoints(tmp_path) == []
    assert started_since(threads) == []  # the failed run closed its TensorBoard writer (a thread each, and a file)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import ddpmkit.checkpoint as ck

    cfg = load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}", "train.steps=4", "train.checkpoint_every=2"])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    threads = set(threading.enumerate())
    with pytest.raises(OSError, match="disk full"):
        train(cfg, progress=False)
    assert list_checkpoints(tmp_path) == [] and not list(tmp_path.glob(".tmp-*"))
    assert started_since(threads) == []  # nor here, where the error came from a checkpoint


def test_a_checkpoint_written_again_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """The same step written twice (a rerun's output, a resumed run's last step): the old folder was deleted before
    the new one's rename, so a write that died there left neither. Now the old one goes aside and comes back."""
    import ddpmkit.checkpoint as ck

    final = tmp_path / "ckpt-0000004"
    final.mkdir()
    (final / "model.safetensors").write_text("old weights")
    real_replace = os.replace

    def dies_on_the_new_folders_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", dies_on_the_new_folders_rename)
    with pytest.raises(KeyboardInterrupt), ck.atomic_folder(final) as tmp:
        (tmp / "model.safetensors").write_text("new weights")
    assert (final / "model.safetensors").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000004"]
    monkeypatch.undo()
    with ck.atomic_folder(final) as tmp:
        (tmp / "model.safetensors").write_text("new weights")
    assert (final / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000004"]

    # a process killed between the two renames left the old folder aside: the next run's lock puts it back; one
    # killed after them left it beside its replacement: removed, as is a write never completed
    (tmp_path / ".old-ckpt-0000008-ab_1").mkdir()
    (tmp_path / ".old-ckpt-0000008-ab_1" / "model.safetensors").write_text("step 8")
    (tmp_path / ".old-ckpt-0000004-cd_2").mkdir()
    (tmp_path / ".tmp-ckpt-0000012-ef_3").mkdir()
    from ddpmkit.train.engine import RunLock

    RunLock(tmp_path).release()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["ckpt-0000004", "ckpt-0000008"]
    assert (tmp_path / "ckpt-0000008" / "model.safetensors").read_text() == "step 8"


def test_a_folder_a_run_is_training_in_refuses_a_second_run_until_the_first_ends(tmp_path, capsys):
    """Two `ddpmkit train` into one folder (two terminals, a job started twice) mixed their checkpoints and logs, and a
    second one with --overwrite deleted the first's files while it trained. A real first run in its own process; the
    second, in this one, is refused in one line and touches nothing; once the first is killed (its lock goes with it,
    nothing stale) the folder trains again."""
    from ddpmkit.cli import main

    first = forked.start(["train", "toy2d", f"train.run_dir={tmp_path}", "train.steps=1000000", "train.checkpoint_every=20", "--quiet"])
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path) and first.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    try:
        code = main(["train", "toy2d", f"train.run_dir={tmp_path}", "train.steps=2", "--overwrite", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == (f"ddpmkit train: error: {tmp_path} is being trained by another process (pid {first.pid}): let it "
                                     "finish (then continue it with --resume), or give another train.run_dir"), err
        assert first.is_alive() and list_checkpoints(tmp_path) and (tmp_path / "config.json").is_file()  # it trains on
    finally:
        first.kill()  # SIGKILL
        first.join()
    assert main(["train", "toy2d", f"train.run_dir={tmp_path}", "train.steps=2", "--overwrite", "--quiet"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000002"]


def test_a_run_that_ends_before_it_writes_anything_leaves_no_folder_behind(tmp_path, capsys):
    """A refused start (here --resume into a folder with no run) left the folders it made and RUN/.lock, an empty run
    that `ls runs` then showed. They go; a folder that was there before, or holds anything else, stays."""
    from ddpmkit.cli import main

    new = tmp_path / "new" / "toy"
    assert main(["train", "toy2d", f"train.run_dir={new}", "--resume", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"ddpmkit train: error: --resume: no checkpoint in {new}"
    assert list(tmp_path.iterdir()) == []  # both folders it made
    (tmp_path / "mine").mkdir()
    assert main(["train", "toy2d", f"train.run_dir={tmp_path / 'mine'}", "--resume", "--quiet"]) == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [".lock"]  # the user's folder stays, with the lock file
    assert main(["train", "toy2d", f"train.run_dir={new}", "train.steps=2", "--quiet"]) == 0  # a run that wrote stays whole
    assert list_checkpoints(new) and (new / ".lock").is_file()


def test_the_lock_of_a_run_folder_removed_by_hand_meanwhile_is_released_quietly(tmp_path):
    """release() runs in run()'s `finally`: an error of its own there would replace the run's (the folder removed while
    the run trained: its write's FileNotFoundError, then the tidying's)."""
    import shutil

    from ddpmkit.train.engine import RunLock

    lock = RunLock(tmp_path / "new")
    shutil.rmtree(tmp_path / "new")
    lock.release()
    assert lock.file is None and list(tmp_path.iterdir()) == []


def test_a_lock_file_unlinked_while_another_process_had_it_open_is_not_taken_as_the_lock(tmp_path, monkeypatch):
    """The lock file a refused start removes may have been opened by a second process, which locks it just after: that
    process must see the file is no longer the folder's (is_path_of) and lock the one now on the path, or two runs
    would hold two locks."""
    from ddpmkit.train import engine

    run_dir = tmp_path / "run"
    first = engine.RunLock(run_dir)
    early = open(run_dir / ".lock", "a+")  # noqa: SIM115 -- the second process's open, before the first ends
    first.release()
    assert not run_dir.exists() and not engine.is_path_of(early, run_dir / ".lock")
    opened = []

    def open_early_first(*args, **kwargs):  # the second process's RunLock, resumed after its open
        opened.append(early if not opened else open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(engine, "open", open_early_first, raising=False)
    second = engine.RunLock(run_dir)
    assert len(opened) == 2 and early.closed and second.file is opened[1]  # locked the stale file, saw it, locked the path's
    assert engine.is_path_of(second.file, run_dir / ".lock")
    second.release()
    # a file system whose inode numbers never match: a few tries, then the lock it got (as before this check), not a hang
    monkeypatch.setattr(engine, "open", open)
    monkeypatch.setattr(engine, "is_path_of", lambda f, path: False)
    third = engine.RunLock(tmp_path / "unstable")
    assert third.file is not None and not third.file.closed
    third.release()


def test_a_damaged_newest_checkpoint_says_how_to_resume_from_the_one_before(tmp_path, capsys):
    """A checkpoint damaged from outside (a disk error, a copy cut short; ddpmkit's own writes are atomic) stopped
    `--resume` and loading with the file's error alone; both now name the checkpoint before, and resuming from it works."""
    from ddpmkit.checkpoint import CheckpointError

    overrides = [f"train.run_dir={tmp_path}", "train.steps=4", "train.checkpoint_every=2"]
    train(load_config(PRESET_DIR / "toy2d.toml", overrides), progress=False)
    newest = tmp_path / "ckpt-0000004"
    weights = (newest / "ema.safetensors").read_bytes()
    (newest / "ema.safetensors").write_bytes(weights[:100])
    more = load_config(PRESET_DIR / "toy2d.toml", [*overrides[:1], "train.steps=6", "train.checkpoint_every=2"])
    with pytest.raises(CheckpointError, match=rf"ema.safetensors: .*; move it out of {tmp_path} to resume from ckpt-0000002, the one before$"):
        train(more, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=rf"; the checkpoint before it, {tmp_path / 'ckpt-0000002'}, can be given instead$"):
        load_diffusion(tmp_path)  # sample, eval, the edits and the page load it so
    newest.rename(tmp_path.parent / f"{tmp_path.name}-damaged")
    import warnings

    from ddpmkit.errors import Note

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more steps, another checkpoint cadence: the steps to come are the same, no note
        train(more, resume=True, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "ckpt-0000006"
    # a resume already at train.steps says so (it ended at once without a word)
    capsys.readouterr()
    train(load_config(PRESET_DIR / "toy2d.toml", [*overrides[:1], "train.steps=4"]), resume=True, progress=False)
    assert f"{tmp_path} is at step 6, train.steps = 4: nothing more to train (give a larger train.steps to go on)" in capsys.readouterr().out
    # a resume with another lr or seed goes on otherwise than the run would have: allowed, and said
    with pytest.warns(Note, match=r"resuming with train settings other than ckpt-0000006's: train.lr = 0.0005 here, 0.005 there; "
                                  r"train.seed = 3 here, 0 there; the run goes on with them, not as it would have gone on$"):
        train(load_config(PRESET_DIR / "toy2d.toml", [*overrides[:1], "train.steps=7", "train.lr=5e-4", "train.seed=3"]), resume=True,
              progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "ckpt-0000007"
    # a resume whose settings would change the weights or the data names each key that differs (it named five sections)
    changed = load_config(PRESET_DIR / "toy2d.toml", [*overrides[:1], "train.steps=8", "diffusion.T=50", "network.mlp_hidden=64"])
    with pytest.raises(TrainingError, match=r"differ from .*ckpt-0000007/config.json: network.mlp_hidden = 64 here, 128 there; "
                                            r"diffusion.T = 50 here, 1000 there$"):
        train(changed, resume=True, progress=False)


def test_a_report_write_that_fails_leaves_the_old_report_and_no_temporary_file(tmp_path):
    """atomic_write_text (reports, grids): a write that fails half-way (here a real one: text UTF-8 cannot encode) left
    its .tmp- file beside the old report."""
    from ddpmkit.checkpoint import atomic_write_text

    atomic_write_text(tmp_path / "report.json", '{"fd": 1.5, "sampler": "\u00e9"}')
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "report.json", "a lone surrogate \ud800")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert (tmp_path / "report.json").read_text(encoding="utf-8") == '{"fd": 1.5, "sampler": "\u00e9"}'


def test_keep_checkpoints_prunes_all_but_the_newest_and_the_kept_steps(tmp_path):
    cfg = load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}", "train.steps=10", "train.checkpoint_every=2",
                                                   "train.keep_checkpoints=2", "train.keep_steps=[3,4]", "train.sample_every=0"])
    train(cfg, progress=False)
    # step 3 is not a multiple of checkpoint_every: a kept step is written all the same
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000003", "ckpt-0000004", "ckpt-0000008", "ckpt-0000010"]


def test_lr_schedule():
    from ddpmkit.config import TrainConfig
    from ddpmkit.train import lr_at

    c = TrainConfig(lr=1.0, warmup_steps=10, steps=110, lr_schedule="cosine")
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way through the decay
    assert lr_at(110, c) == pytest.approx(0.05)
    assert lr_at(50, TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="constant")) == 1.0


def test_budget_horizon_fits_the_steps_to_the_time_left():
    from ddpmkit.config import TrainConfig
    from ddpmkit.train import Decay, budget_horizon, lr_at

    assert budget_horizon(100, 0.5, 300.0, 5000) == 100 + int(0.97 * 600)  # 600 steps left at 0.5 s each, 3% margin
    assert budget_horizon(100, 0.01, 300.0, 5000) == 5000  # never past train.steps
    assert budget_horizon(100, 0.5, -1.0, 5000) == 101  # out of time already: the next step is the last
    c = TrainConfig(lr=1.0, warmup_steps=10, steps=1000, lr_schedule="cosine")
    fitted = Decay.over(c, 110)
    assert lr_at(60, c, fitted) == pytest.approx(0.05 + 0.95 * 0.5)  # the decay follows the fitted end
    assert lr_at(110, c, fitted) == pytest.approx(0.05) and lr_at(60, c) == lr_at(60, c, Decay.over(c, 1000))
    # re-fitting at step 60 (half-way, progress 0.5) to end at 260: the rate is continuous there, and the
    # rest of the decay (progress 0.5 -> 1) is spread over the 200 steps left
    refit = fitted.refit(60, 260)
    assert refit == Decay(60, 0.5, 260) and lr_at(60, c, refit) == pytest.approx(lr_at(60, c, fitted))
    assert refit.progress_at(160) == pytest.approx(0.75) and lr_at(160, c, refit) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert lr_at(260, c, refit) == pytest.approx(0.05) and refit.refit(160, 160 + 1).progress == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="budget_calibration = 5 must be > 10"):
        load_config("toy2d", ["train.fit_to_budget=true", "train.budget_calibration=5"])


def test_a_run_fitted_to_its_budget_decays_the_learning_rate_over_the_steps_that_fit(tmp_path):
    cfg = load_config("toy2d", [f"train.run_dir={tmp_path}", "train.steps=100000", "train.max_minutes=0.1", "train.fit_to_budget=true",
                                "train.budget_calibration=30", "train.lr_schedule=cosine", "train.log_every=1",
                                "train.sample_every=0", "train.checkpoint_every=0"])
    train(cfg, progress=False)
    log = _log(tmp_path)
    fits = [e for e in log if "horizon" in e]
    assert fits[0]["step"] == 30 and 30 < fits[0]["horizon"] < 100000
    assert [e["step"] for e in fits] == list(range(30, 30 * len(fits) + 1, 30)) and len(fits) >= 2  # re-fitted every 30 steps
    from ddpmkit.checkpoint import read_config
    from ddpmkit.train import Decay, lr_at

    # replay the re-fits: every logged rate is the cosine of the decay as fitted then, and it never jumps
    decay, by_step = Decay.over(cfg.train), {e["step"]: e["horizon"] for e in fits}
    trained = [e for e in log if "lr" in e]
    for e in trained:
        s = e["step"] - 1  # the step this rate was used for
        if s in by_step and (s == 30 or by_step[s] != decay.end):
            decay = decay.refit(s, by_step[s])
        assert e["lr"] == pytest.approx(lr_at(s, cfg.train, decay))
    assert lr_at(decay.end, cfg.train, decay) == pytest.approx(0.05 * cfg.train.lr)  # decayed fully at the last fitted end
    last = list_checkpoints(tmp_path)[-1]
    info = read_config(last)[1]
    assert (info.horizon, info.decay_from) == (decay.end, (decay.start, pytest.approx(decay.progress)))
    # a resumed run keeps the fitted decay, rather than going on towards train.steps
    train(cfg, resume=True, progress=False)
    info = read_config(list_checkpoints(tmp_path)[-1])[1]
    assert info.step <= decay.end and info.horizon == decay.end


def test_ema_update_and_warmup():
    from ddpmkit.train import ema_decay_at, ema_update

    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        for p in model.parameters():
            p.fill_(3.0)
    ema_update(ema, model, decay=0.75)  # 0.75 * 1 + 0.25 * 3
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in ema.parameters())
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999
    norm_ema, norm = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)  # buffers are copied, not averaged
    norm(torch.randn(8, 3))
    ema_update(norm_ema, norm, decay=0.9)
    assert all(torch.equal(e, b) for e, b in zip(norm_ema.buffers(), norm.buffers()))
    # decay 0 (train.ema_decay = 0): the "EMA" is exactly the last weights, bit for bit
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 5)
    ema_update(ema := torch.nn.Linear(7, 5), model, decay=ema_decay_at(500, 0.0))
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))
    # the NaN guard's form, decided on the device: an applied step is the update above, a skipped one changes nothing
    a, b, before = torch.nn.Linear(7, 5), torch.nn.Linear(7, 5), None
    b.load_state_dict(a.state_dict())
    before = [p.clone() for p in a.parameters()]
    ema_update(a, model, decay=0.9)
    ema_update(b, model, decay=0.9, applied=torch.tensor(True))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    ema_update(b, model, decay=0.9, applied=torch.tensor(False))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(before[0], next(a.parameters()))


def test_timestep_sampling():
    import math

    from ddpmkit.config import DiffusionConfig
    from ddpmkit.schedules import NoiseSchedule
    from ddpmkit.train import sample_timesteps

    T, n = 1000, 200_000
    schedule = NoiseSchedule.from_name("linear", T)
    g = torch.Generator().manual_seed(0)
    # uniform: Algorithm 1's t ~ U{0..T-1}, the same draws as torch.randint (resumed runs stay exact)
    assert torch.equal(sample_timesteps(DiffusionConfig(), schedule, 64, torch.Generator().manual_seed(3)),
                       torch.randint(0, T, (64,), generator=torch.Generator().manual_seed(3)))
    # asymmetric: log-SNR >= -4.6 holds exactly for t <= 673 of the linear schedule, and those 674 steps
    # weigh k = 4 each against 1: P(t <= 673) = 4 * 674 / (4 * 674 + 326), and uniform within each part
    dc = DiffusionConfig(timestep_sampling="asymmetric", asymmetric_log_snr=-4.6, asymmetric_k=4.0)
    # the split from the closed form, independently of the schedule class: alpha_bar_t = prod_{s<=t} (1 - beta_s)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    assert int((torch.log(alpha_bar / (1 - alpha_bar)) >= -4.6).sum()) == 674
    t = sample_timesteps(dc, schedule, n, g)
    for k, p in ((674, 4 * 674 / (4 * 674 + 326)), (300, 4 * 300 / (4 * 674 + 326)), (900, 1 - 100 / (4 * 674 + 326))):
        assert abs((t < k).double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n), k
    with pytest.raises(ConfigError, match="diffusion.asymmetric_k = 0.0 must be > 0"):
        load_config(PRESET_DIR / "mnist.toml", ["diffusion.timestep_sampling=asymmetric", "diffusion.asymmetric_k=0"])
    # logit-normal: P(t < k) = P(T sigmoid(u) < k) = Phi((logit(k / T) - mean) / std)
    dc = DiffusionConfig(timestep_sampling="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8)
    t = sample_timesteps(dc, schedule, n, g)
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= T - 1
    with pytest.raises(ConfigError, match="diffusion.logit_normal_std = 0.0 must be > 0"):
        load_config(PRESET_DIR / "mnist.toml", ["diffusion.timestep_sampling=logit_normal", "diffusion.logit_normal_std=0"])
    for k in (100, 300, 500, 700, 900):
        p = 0.5 * (1 + math.erf((math.log(k / (T - k)) - 0.5) / (0.8 * math.sqrt(2))))
        assert abs((t < k).double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n), k


class PoisonedTask(DenoiserTask):
    """The real denoiser task, with non-finite losses (or gradients) injected at chosen steps:
    what a bad batch or an fp16 overflow does to a run."""

    def __init__(self, cfg, poisoned, where="loss"):
        super().__init__(cfg)
        self.poisoned, self.where = poisoned, where

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        if not self.poisoned(batch.step):
            return loss
        if self.where == "loss":
            return loss * float("nan")
        first = next(model.parameters())
        return loss + 0.0 * (first.sum() * 0.0).sqrt()  # finite value, d sqrt(u)/du at 0 = inf: a NaN gradient


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


TOY = ["train.steps=12", "train.log_every=1", "train.checkpoint_every=4", "train.sample_every=0", "train.keep_checkpoints=0"]


def test_non_finite_steps_are_skipped_and_logged(tmp_path):
    cfg = load_config("toy2d", [f"train.run_dir={tmp_path / 'a'}", *TOY])
    run(PoisonedTask(cfg, lambda s: s in (3, 7)), cfg, progress=False)
    skipped = [e for e in _log(tmp_path / "a") if "skipped" in e]
    assert [e["step"] for e in skipped] == [3, 7] and skipped[0]["skipped"] == "the loss was not finite"
    m = load_diffusion(tmp_path / "a")
    assert m.step == 12 and all(p.isfinite().all() for p in m.network.parameters())
    # a skipped step changes nothing: the run equals one whose steps 3 and 7 never updated the weights
    cfg_b = load_config("toy2d", [f"train.run_dir={tmp_path / 'b'}", *TOY])
    run(PoisonedTask(cfg_b, lambda s: s in (3, 7), where="gradient"), cfg_b, progress=False)
    assert {e["skipped"] for e in _log(tmp_path / "b") if "skipped" in e} == {"the gradient was not finite"}
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_persistent_non_finite_losses_roll_back_then_stop_with_one_line(tmp_path):
    cfg = load_config("toy2d", [f"train.run_dir={tmp_path}", *TOY, "train.nan_patience=2", "train.max_rollbacks=2"])
    with pytest.raises(TrainingError) as e:
        run(PoisonedTask(cfg, lambda s: s >= 5), cfg, progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith("training stopped at step 6: the loss was not finite for 2 steps in a row")
    assert "after 2 rollback(s)" in message and "ckpt-0000004" in message
    log = _log(tmp_path)
    rollbacks = [e for e in log if "rollback_to" in e]
    assert [(r["rollback_to"], r["lr_scale"]) for r in rollbacks] == [(4, 0.5), (4, 0.25)]
    # after a rollback step 4 is trained again, at half the learning rate
    from ddpmkit.train import lr_at

    lrs = [e["lr"] for e in log if e.get("step") == 5 and "skipped" in e]
    assert lrs == pytest.approx([lr_at(5, cfg.train), 0.5 * lr_at(5, cfg.train), 0.25 * lr_at(5, cfg.train)])


def test_auto_precision_picks_bf16_only_where_the_hardware_has_it():
    from ddpmkit.devices import onednn_isa_allows_bf16
    from ddpmkit.precision import cpu_computes_bf16, resolve_precision
    from ddpmkit.train.engine import has_accelerator

    assert [resolve_precision(p) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    if not has_accelerator():
        native = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else cpu_computes_bf16()
        # an AVX-512-bf16 machine under the AVX2 caps (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) computes as an AVX2 one
        capped = not torch.backends.cpu.get_cpu_capability().startswith("AVX512") or not onednn_isa_allows_bf16()
        native = native and not capped
        assert resolve_precision("auto") == ("bf16" if native else "no") and cpu_computes_bf16() == native
    assert load_config("mnist").train.mixed_precision == "auto"


@pytest.mark.parametrize("preset, extra", [("toy2d", ["train.batch_size=64"]),
                                           ("mnist", ["train.batch_size=8", "network.base_channels=8", "network.channel_mult=1,2",
                                                      "network.attention_resolutions=14", "train.mixed_precision=no"]),
                                           ("mnist_classifier", ["train.batch_size=8", "network.base_channels=8", "network.channel_mult=1,2",
                                                                 "network.attention_resolutions=", "train.mixed_precision=no"])])
def test_an_ordinary_training_step_reads_nothing_back_and_a_log_window_reads_once(tmp_path, preset, extra):
    cfg = load_config(preset, [f"train.run_dir={tmp_path}", "train.steps=9", "train.log_every=4", "train.max_minutes=0", "train.warmup_steps=2",
                               "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0", "train.keep_steps=", *extra])
    with reads_per_call() as calls:
        train(cfg, progress=False)
    assert [n for kind, _, n in calls if kind == "train_step"] == [0] * 9  # forward, backward, NaN guard, AdamW, EMA: no read
    # steps 4 and 8 end a log window and the last step (9) ends the run: one read each; every other step none
    assert [(s, n) for kind, s, n in calls if kind == "periodic" and n] == [(4, 1), (8, 1), (9, 1)]
    assert len([e for e in _log(tmp_path) if "examples_per_s" in e]) == 3


@pytest.mark.slow
@pytest.mark.xdist_group(name="compile")  # with the sampling compile of test_web_actions: one process warms inductor for both
def test_a_compiled_training_run_follows_the_eager_one_and_saves_plain_checkpoints(tmp_path):
    """train.compile compiles the network in place (on a GPU, "reduce-overhead" also captures CUDA graphs): the same
    losses within rounding (inductor fuses the arithmetic differently), the same checkpoint keys, and a run that loads
    as an uncompiled one. The toy MLP with one block keeps the compile to seconds: inductor compiles each block's
    fused kernels on their own (their names differ), about a second of the C++ compiler each on a cold cache."""
    runs = {}
    for mode in ("no", "default"):
        cfg = load_config("toy2d", [f"train.run_dir={tmp_path / mode}", "train.steps=6", "train.log_every=1", "train.batch_size=64",
                                    f"train.compile={mode}", "train.sample_every=0", "network.mlp_layers=1"])
        train(cfg, progress=False)
        runs[mode] = [e["loss"] for e in _log(tmp_path / mode) if "loss" in e]
    assert len(runs["default"]) == len(runs["no"]) == 6
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(runs["default"], runs["no"])), runs
    plain, compiled = (load_file(next((tmp_path / m).glob("ckpt-*/model.safetensors"))) for m in ("no", "default"))
    assert set(compiled) == set(plain) and not any("_orig_mod" in k for k in compiled)
    assert load_diffusion(tmp_path / "default").network is not None


def test_the_lessons_start_over_only_runs_they_made(tmp_path, monkeypatch):
    """A lesson retrains its run when its config changed, deleting the folder's checkpoints; with DDPMKIT_LESSONS_RUNS
    pointing at the user's runs (whose folders bear the presets' names) it deleted their run of that name. Now a
    folder the lessons did not make is refused, and one they made is started over as before."""
    from ddpmkit.errors import UserError
    from ddpmkit.lessons import small_run

    monkeypatch.setenv("DDPMKIT_LESSONS_RUNS", str(tmp_path))
    mine = train(load_config("toy2d", [f"train.run_dir={tmp_path / 'toy2d'}", "train.steps=2"]), progress=False)
    with pytest.raises(UserError, match=r"toy2d holds a run the lessons did not make \(newest checkpoint ckpt-0000002\)"):
        small_run("toy2d", 3, fast_steps=3, fast_overrides=())
    assert [p.name for p in list_checkpoints(mine)] == ["ckpt-0000002"]
    lesson = small_run("toy2d", 3, name="lesson", fast_steps=3, fast_overrides=())
    assert small_run("toy2d", 3, name="lesson", fast_steps=3, fast_overrides=()) == lesson  # the same config: reused
    small_run("toy2d", 4, name="lesson", fast_steps=4, fast_overrides=())  # another: started over
    assert [p.name for p in list_checkpoints(lesson)] == ["ckpt-0000004"]


def test_a_run_the_config_names_that_does_not_exist_is_one_line_with_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    """`ddpmkit train unclip_prior` before `ddpmkit train clip` said "no checkpoint at runs/clip": neither the key that
    names it nor how to make it. Each named run is checked before training, and a preset's (or the demo's) run says so."""
    from ddpmkit.cli import main

    monkeypatch.chdir(tmp_path)
    for preset, key, make in (("unclip_prior", "unclip.clip = runs/clip", "ddpmkit train clip"),
                              ("mnist_latent", "data.autoencoder = runs/mnist_autoencoder", "ddpmkit train mnist_autoencoder"),
                              ("mnist_consistency", "distill.teacher = runs/demo", "ddpmkit demo"),
                              ("mnist_dreambooth", "train.init_from = runs/mnist_text", "ddpmkit train mnist_text")):
        assert main(["train", preset, "train.steps=1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ddpmkit train: error: {key}: no checkpoint at ") and err.endswith(f"; make it first: {make}\n"), err
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made
    # a run that names its own folder (or a checkpoint in it) would write over the model it reads: --overwrite deleted it
    # and a LoRA run's adapters then sat on weights that no longer existed
    assert main(["train", "toy2d", "train.init_from=runs/toy2d/ckpt-0000010", "--overwrite"]) == 2
    assert capsys.readouterr().err == ("ddpmkit train: error: train.init_from = runs/toy2d/ckpt-0000010 is in this run's own folder "
                                       "(train.run_dir): the run would write over the model it reads; give another train.run_dir\n")


@pytest.mark.parametrize("hflip", [True, False])
def test_hflip_flips_about_half_of_each_batch_left_to_right(tmp_path, monkeypatch, hflip):
    """data.hflip (the images preset's default) had no test: dropped or always on, nothing failed. One image, white on
    its left: each training x0 is it (hflip off), or it or its mirror image, each about half the time (hflip on)."""
    from PIL import Image

    from ddpmkit.train import denoiser
    from ddpmkit.train.batches import step_batch

    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, :3] = 255
    (tmp_path / "photos").mkdir()
    Image.fromarray(pixels).save(tmp_path / "photos" / "left.png")
    cfg = load_config("images", [f"data.path={tmp_path / 'photos'}", "data.image_size=8", f"data.hflip={hflip}", "train.batch_size=256"])
    seen = []
    monkeypatch.setattr(denoiser, "training_losses", lambda model, x0, *a, **k: seen.append(x0) or {"loss": torch.zeros(len(x0))})
    DenoiserTask(cfg).loss(None, step_batch(cfg.train.seed, 0, 256, 1, torch.device("cpu")))
    left, right = seen[0][..., :3].mean((1, 2, 3)), seen[0][..., -3:].mean((1, 2, 3))
    mirrored = int(((left == -1) & (right == 1)).sum())
    assert int(((left == 1) & (right == -1)).sum()) + mirrored == 256  # each the image or its mirror, nothing else
    assert (96 <= mirrored <= 160) if hflip else mirrored == 0  # Binomial(256, 1/2): mean 128, sd 8


def test_a_stop_writes_its_checkpoint_whatever_the_folder_already_shows(tmp_path, monkeypatch):
    """Stopping on Ctrl-C, a process skipped the checkpoint if the folder already held one of this step: in a two-process
    run the second process could see the first's fresh checkpoint, skip the checkpoint's barrier and leave the first
    waiting in it ("Connection closed by peer", no line saying how to continue; seen in CI). Whether this step was saved
    is the processes' common record now. Here the folder holds a checkpoint of step 3 from another run, as the first
    process's would be."""
    from ddpmkit.train import engine
    from ddpmkit.train.task import TASKS

    cfg = load_config("toy2d", [f"train.run_dir={tmp_path}", "train.steps=3", "train.checkpoint_every=0", "train.sample_every=0",
                                "train.log_every=1", "train.max_minutes=0"])
    train(cfg, progress=False)  # ckpt-0000003 in the folder
    trainer = engine.Trainer(TASKS["denoiser"](cfg), cfg, progress=False)
    trainer.start()
    for _ in range(3):
        trainer.train_step(trainer.next_batch())
        trainer.periodic()
    calls = []
    monkeypatch.setattr(engine.Trainer, "checkpoint", lambda self, metrics=None: calls.append(self.state.step))
    trainer.stop_here()
    assert calls == [3]


def test_a_2d_runs_preview_is_a_scatter_of_its_samples_over_its_data(tmp_path, monkeypatch):
    """A toy run's previews (train.sample_every) plot its samples over its training points; no test had trained a 2-D
    run with previews on. The plot is viz.scatter_2d's own (tested in test_generate); here, what it is given."""
    from ddpmkit import viz
    from ddpmkit.data import load_dataset

    given, scatter = [], viz.scatter_2d
    monkeypatch.setattr(viz, "scatter_2d", lambda *args, **kw: given.append(args) or scatter(*args, **kw))
    train(load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}", "train.steps=2", "train.sample_every=2",
                                                  "train.num_samples=50", "train.sample_steps=5"]), progress=False)
    (x, path, reference), = given
    assert x.shape == (50, 2) and path == tmp_path / "samples" / "step-0000002.png" and path.is_file()
    data = load_dataset(load_config(PRESET_DIR / "toy2d.toml").data.name)
    assert torch.equal(reference, data.get_batch(torch.arange(min(len(data), 5000))))


def test_an_image_runs_preview_is_algorithm_2_respaced_to_sample_steps_with_clipped_x0(tmp_path):
    """The previews (samples/step-N.png) are the EMA's samples by respaced ancestral sampling in train.sample_steps with
    x_0 clipped to [-1, 1] (pixels only), seeds from 0: the library's own sample, pixel for pixel."""
    from PIL import Image

    from conftest import TINY_DIGITS_RUN
    from ddpmkit import sample
    from ddpmkit.viz import make_grid

    train(load_config(PRESET_DIR / "mnist.toml", [*TINY_DIGITS_RUN, "train.steps=2", "train.sample_every=2", "train.num_samples=4",
                                                  "train.sample_steps=5", f"train.run_dir={tmp_path}"]), progress=False)
    m = load_diffusion(tmp_path)
    x = sample(m.denoiser, (4, *m.data_shape), sampler="ddpm", steps=5, clip_x0=True, generator=0).x
    with Image.open(tmp_path / "samples" / "step-0000002.png") as im:
        assert np.array_equal(np.asarray(im), make_grid(x, upscale=2)[..., 0])
    unclipped = sample(m.denoiser, (4, *m.data_shape), sampler="ddpm", steps=5, clip_x0=False, generator=0).x
    assert not torch.equal(unclipped, x)  # the clip matters here: the test would see it gone
