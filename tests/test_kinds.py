"""A kind of model is declared once: registering a new one in this module (its ModelKind and its Task) is
all the trainer, the loader, sampling and the command line need."""
import pytest
import torch
from PIL import Image
from torch import nn

import ddpmkit
from ddpmkit import viz
from ddpmkit.config import load_config
from ddpmkit.kinds import KINDS, ModelKind, kind_of, register
from ddpmkit.train import TASKS, DenoiserTask


class ResidualMLP(nn.Module):
    """A denoiser of 2-D points that no built-in kind builds: x + MLP(x, t)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        return x + self.net(torch.cat([x, t[:, None] / 1000], dim=1))


# the whole declaration of the new kind: its network, that it samples, what to do with a finished run
TOY = register(ModelKind("residual_mlp", lambda cfg, shape: ResidualMLP(shape[0], cfg.network.mlp_hidden), samples=True,
                         next_step="sample the residual MLP: ddpmkit sample {run}"))


class ResidualMLPTask(DenoiserTask):  # Algorithm 1 as for any denoiser; only the network differs
    name = "residual_mlp"


def test_a_kind_registered_in_one_module_trains_loads_and_samples(tmp_path, capsys):
    from ddpmkit.cli import main

    assert KINDS["residual_mlp"] is TOY and TASKS["residual_mlp"] is ResidualMLPTask
    run = tmp_path / "run"
    code = main(["train", "toy2d", "train.task=residual_mlp", "network.mlp_hidden=16", "train.steps=20", "train.batch_size=64",
                 "train.checkpoint_every=0", "train.log_every=10", f"train.run_dir={run}", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and f"sample the residual MLP: ddpmkit sample {run}" in out
    m = ddpmkit.load(run)
    assert isinstance(m, ddpmkit.DiffusionModel) and isinstance(m.network, ResidualMLP) and m.model_kind is TOY
    x = ddpmkit.sample(m.denoiser, (5, 2), sampler="ddim", steps=10, generator=0).x
    assert x.shape == (5, 2) and torch.isfinite(x).all()


def test_an_unknown_kind_is_one_clear_error_with_the_valid_names():
    from ddpmkit.config import load_config
    from ddpmkit.errors import UserError
    from ddpmkit.train import train

    with pytest.raises(UserError, match=r"unknown train.task 'nope'; choose one of \[.*'autoencoder'.*'denoiser'"):
        kind_of("nope")
    with pytest.raises(UserError, match="unknown train.task 'nope'"):
        train(load_config("toy2d", ["train.task=nope", "train.steps=1"]), progress=False)


def test_every_built_in_kind_has_its_task_and_the_loader_knows_which_sample():
    built_in = {"denoiser", "superres", "autoencoder", "classifier", "judge", "clip", "prior", "decoder"}
    assert built_in <= set(KINDS) and built_in <= set(TASKS)
    assert {name for name in built_in if KINDS[name].samples} == {"denoiser", "superres", "prior", "decoder"}
    assert KINDS["superres"].needs_low_res and KINDS["decoder"].uses_clip and KINDS["prior"].uses_clip


def test_an_image_models_preview_is_a_grid_of_its_samples(tmp_path):
    """What the engine saves every train.sample_every steps: train.num_samples samples of fixed seeds, as a grid."""
    task = DenoiserTask(load_config("mnist", ["network.base_channels=8", "network.channel_mult=[1]", "network.attention_resolutions=[]",
                                              "train.num_samples=4", "train.sample_steps=2"]))
    torch.manual_seed(0)
    network = task.build_model().eval()
    x = task.preview(network, tmp_path / "step.png")
    assert x.shape == (4, 1, 28, 28) and torch.equal(x, task.preview(network, tmp_path / "again.png"))  # fixed seeds
    viz.save_grid(x, tmp_path / "those.png")
    with Image.open(tmp_path / "step.png") as grid, Image.open(tmp_path / "those.png") as those:
        assert grid.size[0] > 2 * 28 and grid.size[1] > 28  # more than one sample across, and a full one down
        assert grid.tobytes() == those.tobytes()  # the picture is of the samples returned
