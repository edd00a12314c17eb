"""A network's sampling calls replayed as CUDA graphs (torch.cuda.CUDAGraph): one launch per call instead of one per
kernel. The demo's UNet runs about 600 ops a call; on a GPU each costs the host a few microseconds to launch while the
GPU computes it in less, so a small network's sampling step is bound by launches, not by the GPU.

    m = ddpmkit.load("runs/mnist")          # on a GPU
    m.compile("cuda-graph")                  # ddpmkit sample RUN --compile cuda-graph

One graph is captured per call signature (the tensor arguments' shapes, dtypes and devices, the other arguments'
values, and the autocast state), after `warmup` eager calls of that signature, in seconds, where torch.compile's
"reduce-overhead" compiles for about a minute first. Each call copies its inputs into the graph's own, replays it, and
returns a copy of its outputs, which the next replay would overwrite. Calls that need gradients (posterior
sampling), or whose tensors are not all on a GPU, run as they are. A signature whose capture fails runs eagerly from
then on, with one warning.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map


def signature(args: tuple, kwargs: dict) -> tuple:
    """What a captured graph is specific to: every tensor's shape, dtype and device, every other argument's value."""
    leaves, spec = tree_flatten((args, kwargs))
    parts = [("tensor", tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor)
             else ("value", x if isinstance(x, (bool, int, float, str, type(None))) else repr(x)) for x in leaves]
    autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    return str(spec), tuple(parts), autocast


class Captured:
    """One signature's graph: its input tensors, the graph, and its output tensors."""

    def __init__(self, net: nn.Module, args: tuple, kwargs: dict):
        self.inputs = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
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
            self.outputs = net(*self.inputs[0], **self.inputs[1])

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        for static, x in zip(tree_flatten(self.inputs)[0], tree_flatten((args, kwargs))[0]):
            if isinstance(static, torch.Tensor):
                static.copy_(x)
        self.graph.replay()
        return tree_map(lambda y: y.clone() if isinstance(y, torch.Tensor) else y, self.outputs)


class CudaGraphed(nn.Module):
    """net whose no-grad calls on a GPU are captured once per signature and replayed (module docstring)."""

    def __init__(self, net: nn.Module, warmup: int = 2):
        super().__init__()
        self.net, self.warmup = net, warmup
        self.graphs: dict[tuple, Captured | None] = {}  # None: the capture failed, eager from then on
        self.calls: Counter = Counter()

    def forward(self, *args, **kwargs) -> Any:
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if torch.is_grad_enabled() or not tensors or any(x.device.type != "cuda" for x in tensors):
            return self.net(*args, **kwargs)
        key = signature(args, kwargs)
        if key not in self.graphs:
            self.calls[key] += 1
            if self.calls[key] <= self.warmup:  # eager first: lazy initialisation, cuDNN's choice of algorithms
                return self.net(*args, **kwargs)
            try:
                self.graphs[key] = Captured(self.net, args, kwargs)
            except RuntimeError as e:  # an op that cannot be captured (a host read, a copy from the CPU)
                warnings.warn(f"ddpmkit: could not capture the network as a CUDA graph, running it eagerly: {e}", stacklevel=2)
                self.graphs[key] = None
        captured = self.graphs[key]
        return self.net(*args, **kwargs) if captured is None else captured(args, kwargs)
