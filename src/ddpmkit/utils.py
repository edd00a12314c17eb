"""Small helpers shared by every module: broadcasting and table lookup."""
from __future__ import annotations

import weakref

import torch

from .errors import UserError

# device copies of the schedules' tables, made once: a copy per lookup from the host would make a GPU's host wait.
# Keyed by the table's id (a tensor cannot be a dict key by value: == compares elementwise); an entry goes when its
# table does, so a respaced schedule per sampling call leaves nothing behind.
_ON_DEVICE: dict[tuple[int, torch.device], tuple[weakref.ref, torch.Tensor]] = {}


class cached_table:
    """functools.cached_property without its lock, as Python 3.12 has it: on 3.11 torch.compile cannot enter the lock
    and broke a compiled network's graph in three at its first call (the schedule's tables read in its forward). Two
    threads that race compute the same table twice; both keep equal values."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner: type | None = None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


def on_device(table: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A (read-only, by convention) table on `device`, copied there once per table and device."""
    device = torch.device(device)
    if table.device == device:
        return table
    key = (id(table), device)
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0]() is not table:
        hit = _ON_DEVICE[key] = (weakref.ref(table, lambda _, key=key: _ON_DEVICE.pop(key, None)), table.to(device))
    return hit[1]


def queued_copy(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """x on `device`, copied without making the host wait: a CPU tensor goes to a CUDA GPU from pinned memory, queued on
    the stream (from ordinary memory the copy may wait until the GPU has caught up; torch's pinned-memory cache keeps the
    buffer until the copy is done). Other devices (MPS) copy as usual: nothing there keeps the host buffer alive."""
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-example tensor (B,) broadcasts against x (B, ...)."""
    missing = ndim - a.ndim
    if missing < 0:
        raise UserError(f"tensor has {a.ndim} dims, more than the target {ndim}")
    return a.reshape(*a.shape, *([1] * missing))


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Look up a float64 schedule table at integer timesteps t: (B,) and broadcast like x.

    The table stays float64; the result is cast to x's dtype and device at this edge only.
    """
    values = on_device(table, t.device)[t.long()]
    return append_dims(values, like.ndim).to(like.dtype)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def cycle(values: list, n: int) -> list:
    """values repeated in turn to length n: cycle([a, b], 3) = [a, b, a]."""
    return [values[i % len(values)] for i in range(n)]


def side(shape) -> str:
    """'HxW' of an image shape (..., H, W), for messages and file names."""
    return "x".join(str(d) for d in tuple(shape)[-2:])
