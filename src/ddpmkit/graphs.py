"""A network's calls replayed as CUDA graphs (torch.cuda.CUDAGraph): one launch per call instead of one per
kernel: for sampling (CudaGraphed) and for training (TrainingGraphs: the forward and the backward). The demo's UNet
runs about 600 ops a call; on a GPU each costs the host a few microseconds to launch while the GPU computes it in
less, so a small network's step is bound by launches, not by the GPU.

    m = ddpmkit.load("runs/mnist")          # on a GPU
    m.compile("cuda-graph")                  # ddpmkit sample RUN --compile cuda-graph

One graph is captured per call signature (the tensor arguments' shapes, dtypes and devices, the other arguments'
values, and the autocast state), after `warmup` eager calls of that signature, in seconds, where torch.compile's
"reduce-overhead" compiles for about a minute first. Each call copies its inputs into the graph's own, replays it, and
returns a copy of its outputs, which the next replay would overwrite. Calls that need gradients (posterior
sampling), or whose tensors are not all on a GPU, run as they are. A signature whose capture fails runs eagerly from
then on, with one warning.

Training (`train.compile = "cuda-graph"`, capture_training) captures the network's forward and its backward per
signature with torch.cuda.make_graphed_callables, in place: parameters, state dict and checkpoints stay the plain
module's. See TrainingGraphs for what runs eagerly.
"""
from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import UserError


def signature(args: tuple, kwargs: dict) -> tuple:
    """What a captured graph is specific to: every tensor's shape, dtype, device and whether it requires a gradient,
    every other argument's value, and the autocast state."""
    return signature_of(*tree_flatten((args, kwargs)))


def signature_of(leaves: list, spec: Any) -> tuple:
    """signature() of a call already flattened (a call is flattened once: it is on every step's path)."""
    parts = [("tensor", tuple(x.shape), x.dtype, x.device, x.requires_grad) if isinstance(x, torch.Tensor)
             else ("value", x if isinstance(x, (bool, int, float, str, type(None))) else repr(x)) for x in leaves]
    autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    return str(spec), tuple(parts), autocast


class Captured:
    """One signature's graph: its input tensors, the graph, and its output tensors. A call copies its tensors into the
    inputs, replays, and returns copies of the outputs (record and replay are the CUDA parts; the CPU tests stand in)."""

    def __init__(self, net: nn.Module, args: tuple, kwargs: dict):
        self.inputs = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
        self.static = [x for x in tree_flatten(self.inputs)[0] if isinstance(x, torch.Tensor)]  # where each call's tensors go
        self.outputs = self.record(net)

    def record(self, net: nn.Module) -> Any:
        """Capture net's call on the inputs as self.graph; the outputs it writes to on each replay."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the main stream, as PyTorch's CUDA-graph notes advise
            for _ in range(2):
                net(*self.inputs[0], **self.inputs[1])
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the noise workers, a web server's requests) may go on meanwhile; the default
        # "global" mode would count their CUDA calls against this capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return net(*self.inputs[0], **self.inputs[1])

    def replay(self) -> None:
        self.graph.replay()

    def __call__(self, tensors: list[torch.Tensor]) -> Any:
        for static, x in zip(self.static, tensors):
            static.copy_(x)
        self.replay()
        return tree_map(lambda y: y.clone() if isinstance(y, torch.Tensor) else y, self.outputs)


class CudaGraphed(nn.Module):
    """net whose no-grad calls on a GPU are captured once per signature and replayed (module docstring). `capture`
    and `device_type` are Captured and "cuda"; the CPU tests pass a stand-in and "cpu"."""

    def __init__(self, net: nn.Module, warmup: int = 2, capture: type[Captured] = Captured, device_type: str = "cuda"):
        super().__init__()
        self.net, self.warmup, self.capture, self.device_type = net, warmup, capture, device_type
        self.graphs: dict[tuple, Captured | None] = {}  # None: the capture failed, eager from then on
        self.calls: Counter = Counter()

    def forward(self, *args, **kwargs) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if torch.is_grad_enabled() or not all_on(tensors, self.device_type):
            return self.net(*args, **kwargs)
        key = signature_of(leaves, spec)
        if key not in self.graphs:
            self.calls[key] += 1
            if self.calls[key] <= self.warmup:  # eager first: lazy initialisation, cuDNN's choice of algorithms
                return self.net(*args, **kwargs)
            try:
                self.graphs[key] = self.capture(self.net, args, kwargs)
            except RuntimeError as e:  # an op that cannot be captured (a host read, a copy from the CPU)
                warnings.warn(f"ddpmkit: could not capture the network as a CUDA graph, running it eagerly: {e}", stacklevel=2)
                self.graphs[key] = None
        captured = self.graphs[key]
        return self.net(*args, **kwargs) if captured is None else captured(tensors)


def all_on(tensors: list[torch.Tensor], device_type: str = "cuda") -> bool:
    """Whether a call has tensors and all of them are on that kind of device (else it runs as it is)."""
    return bool(tensors) and all(x.device.type == device_type for x in tensors)


class _OneSignature(nn.Module):
    """A network's call with its non-tensor arguments fixed, as a module of tensor arguments only (what
    torch.cuda.make_graphed_callables takes); its parameters are the network's."""

    def __init__(self, call: Callable, owner: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.owner = owner  # registered, so that the graph's inputs include the network's parameters
        self.call = call
        leaves, self.spec = tree_flatten((args, kwargs))
        self.positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]  # no reference to this call's tensors

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self.leaves)
        for i, x in zip(self.positions, tensors):
            leaves[i] = x
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.call(*args, **kwargs)


def make_graphed(one: _OneSignature, tensors: tuple[torch.Tensor, ...]) -> Callable:
    """The forward and backward of one signature captured as CUDA graphs, under the caller's autocast state without
    autocast's weight cache (a cached cast would be captured once and then go stale). The CUDA generator is put back
    afterwards: the warm-up and capture draw no dropout mask a step would otherwise draw."""
    rng = torch.cuda.get_rng_state()
    sample = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in tensors)
    try:
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
            return torch.cuda.make_graphed_callables(one, sample, num_warmup_iters=2, allow_unused_input=True)
    finally:
        torch.cuda.set_rng_state(rng)


class _Replay:
    """A replay of a training graph whose backward may still come: until it has run (or its autograd graph is gone),
    the graph's activations must stay as that replay left them. make_graphed_callables' outputs come from one custom
    autograd node, which can be weakly referenced and hooked."""

    def __init__(self, node: Any):
        self.node, self.done = weakref.ref(node), False
        node.register_hook(self.finished)

    def finished(self, *_: Any) -> None:
        self.done = True

    @property
    def live(self) -> bool:
        return not self.done and self.node() is not None


BUSY_WARNING = 10  # calls that found the graph busy before TrainingGraphs says so, once


class TrainingGraphs:
    """A network's training calls (gradients on, module in training mode, every tensor on a GPU) captured per signature
    after `warmup` eager calls of it, forward and backward, and replayed: one launch each instead of one per kernel.

    Runs eagerly: calls without gradients, in evaluation mode or off the GPU; a signature whose capture failed (with
    one warning); and a second call of a signature before the backward of the previous one ran (two calls in one step:
    replaying would overwrite the activations the first call's backward needs). `capture` makes the
    graphed callable and `device_type` is where its calls run (make_graphed, "cuda"; the CPU tests pass others)."""

    def __init__(self, net: nn.Module, warmup: int = 2, capture: Callable[[_OneSignature, tuple], Callable] | None = None,
                 device_type: str = "cuda"):
        self.net, self.eager, self.warmup, self.capture, self.device_type = net, net.forward, warmup, capture, device_type
        self.graphs: dict[tuple, Callable | None] = {}  # None: the capture failed
        self.calls: Counter = Counter()
        self.pending: dict[tuple, _Replay] = {}  # each signature's last replay
        self.counts: Counter = Counter()  # "eager" (of which "busy": the graph's last replay awaited its backward), "captured", "replayed"

    def __call__(self, *args, **kwargs) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if not (torch.is_grad_enabled() and self.net.training and all_on(tensors, self.device_type)):
            return self.run_eagerly(args, kwargs)
        key = signature_of(leaves, spec)
        if key not in self.graphs:
            self.calls[key] += 1
            if self.calls[key] <= self.warmup:  # eager first: lazy initialisation, cuDNN's choice of algorithms
                return self.run_eagerly(args, kwargs)
            self.graphs[key] = self.captured(args, kwargs, tuple(tensors))
        graphed, last = self.graphs[key], self.pending.get(key)
        if graphed is not None and last is not None and last.live:
            self.counts["busy"] += 1
            if self.counts["busy"] == BUSY_WARNING:
                warnings.warn(f"ddpmkit: {BUSY_WARNING} training calls of the network came before the backward of the call "
                              "before them and ran eagerly (train.compile = \"cuda-graph\" replays one call per backward)", stacklevel=2)
            return self.run_eagerly(args, kwargs)
        if graphed is None:
            return self.run_eagerly(args, kwargs)
        out = graphed(*tensors)
        self.counts["replayed"] += 1
        first = next((y for y in tree_flatten(out)[0] if isinstance(y, torch.Tensor) and y.grad_fn is not None), None)
        if first is not None:
            self.pending[key] = _Replay(first.grad_fn)
        return out

    def run_eagerly(self, args: tuple, kwargs: dict) -> Any:
        self.counts["eager"] += 1
        return self.eager(*args, **kwargs)

    def captured(self, args: tuple, kwargs: dict, tensors: tuple[torch.Tensor, ...]) -> Callable | None:
        try:
            graphed = (self.capture or make_graphed)(_OneSignature(self.eager, self.net, args, kwargs), tensors)
        except (RuntimeError, AssertionError) as e:  # an op that cannot be captured (a host read, a copy from the CPU)
            warnings.warn(f"ddpmkit: could not capture the training step as CUDA graphs, running it eagerly: {e}", stacklevel=3)
            return None
        self.counts["captured"] += 1
        return graphed


def capture_training(net: nn.Module, device: torch.device, processes: int = 1) -> TrainingGraphs:
    """Install TrainingGraphs as net's forward, in place (train.compile = "cuda-graph"). One process on a CUDA GPU."""
    if device.type != "cuda":
        raise UserError(f'train.compile = "cuda-graph" needs a CUDA GPU; this run trains on {device.type} '
                        '(use "no", or one of torch.compile\'s: "default", "reduce-overhead", "max-autotune")')
    if processes > 1:
        raise UserError(f'train.compile = "cuda-graph" trains in one process; this run has {processes} (leave train.compile = "no")')
    graphs = TrainingGraphs(net)
    net.forward = graphs  # an instance attribute: nn.Module's __call__ finds it; the class and its state dict are unchanged
    return graphs
