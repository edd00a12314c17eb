"""Checkpoints: a folder with safetensors weights, a JSON config and the optimizer state.

    ckpt-0001000/
        config.json        the full Config (train.task says which kind of model), the step, the
                           shape of one example, the learning-rate scale (NaN rollbacks) and, in
                           a run's last checkpoint, the task's final metrics
        ema.safetensors    EMA weights (what sampling uses)
        model.safetensors  raw weights
        optimizer.pt       AdamW state (training only)
        power_ema.safetensors  the post-hoc EMA's running averages (training only, with train.posthoc_ema)

Each checkpoint is written into a temporary folder and renamed into place, so a crash or kill
never leaves a half-written checkpoint where resume or sampling would read it. Every kind of model
(denoiser, autoencoder, classifier, judge) is saved the same way by the one training engine.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, ConfigError, build_config
from .errors import UserError

CKPT_RE = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(UserError):
    """A missing or unreadable checkpoint."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What config.json records beside the config."""

    step: int = 0
    data_shape: tuple[int, ...] = ()
    lr_scale: float = 1.0
    metrics: dict = field(default_factory=dict)
    horizon: int = 0  # the step count train.fit_to_budget chose (0 = train.steps)
    decay_from: tuple[int, float] = (0, 0.0)  # the step and cosine progress where the decay to `horizon` was last re-fitted
    class_names: tuple[str, ...] = ()  # the data's names of its labels (a folder's subfolders, an .npz's names): label i's is [i]


INFO_KEYS = tuple(f.name for f in fields(CheckpointInfo))  # what config.json holds beside the config sections


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temporary folder next to `final`; on success it takes `final`'s place by renames, on any error it is
    removed, so readers never see a half-written folder.

    An existing `final` (the same step written again) is renamed aside first and removed only once the new folder is
    in place: deleting it first would leave it half-deleted, or gone with the new one, if the process died meanwhile."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    aside: Path | None = None
    try:
        yield tmp
        if final.exists():
            aside = tmp.with_name(f".old-{tmp.name[len('.tmp-'):]}")
            os.replace(final, aside)
        os.replace(tmp, final)
    except BaseException:
        if aside is not None and aside.exists() and not final.exists():
            os.replace(aside, final)  # the new folder never took its place: the old one goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def tidy_interrupted_writes(parent: Path, prefix: str = "ckpt-") -> None:
    """Tidy what a process killed inside atomic_folder left in parent for folders named prefix*: a .tmp- folder (never
    complete, never read) is removed; a .old- folder (one that a rewrite of the same step put aside) is removed where
    its replacement took its place, else it goes back."""
    for stale in parent.glob(f".tmp-{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in parent.glob(f".old-{prefix}*"):
        final = parent / aside.name[len(".old-"):].rsplit("-", 1)[0]  # mkdtemp's suffix holds no "-"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (a report, a grid) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # a full disk, an interrupt: no half-written file left beside the old one
        tmp.unlink(missing_ok=True)
        raise
    return path


ADAPTER_KEY = "lora_"  # the substring peft gives every adapter tensor's name (finetune.py)


def has_adapters(module: nn.Module) -> bool:
    return any(ADAPTER_KEY in name for name, _ in module.named_parameters())


def saved_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a network: its LoRA adapters alone when it has them (its frozen base is its
    train.init_from's), else everything."""
    state = module.state_dict()
    if has_adapters(module):
        state = {k: v for k, v in state.items() if ADAPTER_KEY in k}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_saved_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of saved_state: a network with adapters takes exactly its adapter tensors. Weights that do not fit
    raise a RuntimeError that counts what differs with a few names (torch's lists every one of hundreds)."""
    own, adapters = module.state_dict(), has_adapters(module)
    missing = [k for k in own if k not in state and (ADAPTER_KEY in k or not adapters)]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k}: saved {tuple(v.shape)}, network {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or reshaped:
        kind = "adapter tensors" if adapters else "tensors"
        said = [f"{len(found)} {kind} {what} (e.g. {', '.join(found[:3])})" for found, what in
                ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if found]
        raise RuntimeError("; ".join(said))
    module.load_state_dict(state, strict=not adapters)


def save_checkpoint(run_dir: str | Path, config: Config, info: CheckpointInfo, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, keep: int = 0,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None, keep_steps: tuple[int, ...] = (),
                    export: Callable[[Path], None] | None = None) -> Path:
    """Write run_dir/ckpt-{step:07d} atomically and keep only the newest `keep` (0 = all) besides those
    at keep_steps; extra: more training state, {name: tensors} written as name.safetensors; export(folder):
    more files in the checkpoint (another library's format of the weights), written before it appears."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{info.step:07d}"
    with atomic_folder(final) as tmp:
        meta = {**config.to_dict(), "step": info.step, "data_shape": list(info.data_shape), "lr_scale": info.lr_scale}
        if info.horizon:
            meta["horizon"], meta["decay_from"] = info.horizon, list(info.decay_from)
        if info.metrics:
            meta["metrics"] = info.metrics
        if info.class_names:
            meta["class_names"] = list(info.class_names)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(saved_state(model), tmp / "model.safetensors")
        save_file(saved_state(ema), tmp / "ema.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for name, tensors in (extra or {}).items():
            save_file(tensors, tmp / f"{name}.safetensors")
        if export is not None:
            export(tmp)
    if keep > 0:
        prunable = [c for c in list_checkpoints(run_dir) if int(CKPT_RE.match(c.name).group(1)) not in keep_steps]
        for old in prunable[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and (p / "config.json").is_file()]
    return [p for _, p in sorted(found)]


def claim_run_folder(run_dir: Path, maker: str, remedy: str) -> None:
    """A run folder that `maker` (the demo, the lessons) starts over, its checkpoints deleted: one without checkpoints, or
    one `maker` made before (it leaves a mark); a folder that holds another run (`ddpmkit demo --run-dir runs/mnist`, a
    day's training) is refused, not deleted. The folder is made and marked."""
    mark = run_dir / f".made-by-{maker.replace(' ', '-')}"
    found = list_checkpoints(run_dir)
    if found and not mark.is_file():
        raise UserError(f"{run_dir} holds a run {maker} did not make (newest checkpoint {found[-1].name}), and {maker} starts its "
                        f"folder over: {remedy}")
    run_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text(f"this run folder was made by {maker}, which starts it over when it trains again\n")


def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder (ckpt-XXXXXXX or posthoc-ema's output): its config and EMA weights."""
    return (folder / "config.json").is_file() and (folder / "ema.safetensors").is_file()


def inside_a_run(path: Path) -> str:
    """Why writing `path` (a file or folder a command makes) would damage a run, or "": a path in a checkpoint folder,
    or a run folder's own config.json (`eval --out runs/x/config.json` replaced it with the report)."""
    path = Path(path)
    for folder in (path, *path.parents):
        if is_checkpoint(folder):
            return f"is inside the checkpoint {folder}, whose files are the run's: give a path outside it"
    if path.name == "config.json" and list_checkpoints(path.parent):
        return f"is the config of the run {path.parent}: give the file another name"
    return ""


def single_file(path: Path) -> str:
    """What to give instead of a weights file: its checkpoint folder (a file inside one), or a folder converted from it."""
    if is_checkpoint(path.parent):
        return f"{path} is a file of the checkpoint {path.parent}: give that folder (or its run folder)"
    return (f"{path} is a single weights file; ddpmkit loads run folders and diffusers pipeline folders. A single-file Stable "
            "Diffusion checkpoint (AUTOMATIC1111's) becomes a folder with diffusers, where its config is at hand: "
            "`StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)`; a LoRA file is given with --lora")


def one_before(ckpt: Path) -> Path | None:
    """The checkpoint before ckpt in its run folder, if any: where to go on from when ckpt is damaged."""
    earlier = [c for c in list_checkpoints(Path(ckpt).parent) if c.name < Path(ckpt).name]
    return earlier[-1] if earlier else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from its run folder (then the newest)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if path.is_file():
        raise CheckpointError(single_file(path))
    raise CheckpointError(f"no checkpoint at {path} (expected a ckpt-XXXXXXX folder, a run folder containing one, or a diffusers "
                          f"pipeline folder with model_index.json){nearby_run(path)}")


def nearby_run(path: Path) -> str:
    """"; did you mean runs/mnist?" for a mistyped run folder whose neighbour is a run, else ""."""
    parent = path.parent if path.parent != Path("") else Path(".")
    if path.exists() or not parent.is_dir():
        return ""
    runs = [p.name for p in parent.iterdir() if p.is_dir() and list_checkpoints(p)]
    close = difflib.get_close_matches(path.name, runs, n=1)
    return f"; did you mean {parent / close[0]}?" if close else ""


def read_config(ckpt: Path) -> tuple[Config, CheckpointInfo]:
    """The config and the bookkeeping of a checkpoint folder."""
    try:
        meta = json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {Path(ckpt) / 'config.json'}: {e}") from None
    extra = {key: meta.pop(key) for key in INFO_KEYS if key in meta}
    try:
        config = build_config(meta)
    except ConfigError as e:
        raise CheckpointError(f"{Path(ckpt) / 'config.json'}: {e}") from None
    decay_start, decay_progress = extra.get("decay_from", (0, 0.0))
    info = CheckpointInfo(int(extra.get("step", 0)), tuple(extra.get("data_shape", ())), float(extra.get("lr_scale", 1.0)),
                          dict(extra.get("metrics", {})), int(extra.get("horizon", 0)), (int(decay_start), float(decay_progress)),
                          tuple(str(name) for name in extra.get("class_names", ())))
    return config, info


def read_weights(ckpt: Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The 'ema' or 'model' weights of a checkpoint folder."""
    file = Path(ckpt) / f"{weights}.safetensors"
    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not file.is_file():
        raise CheckpointError(f"missing weights file {file}")
    try:
        return load_file(file)
    except Exception as e:  # noqa: BLE001 -- safetensors raises several types for a damaged file
        raise CheckpointError(f"cannot read {file}: {e}") from None


def load_training_state(ckpt: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore everything a resumed run needs from a checkpoint folder, in place."""
    load_saved_state(model, read_weights(ckpt, "model"))
    load_saved_state(ema, read_weights(ckpt, "ema"))
    optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", weights_only=True))
