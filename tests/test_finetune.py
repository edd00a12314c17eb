"""Fine-tuning through the one engine: a run that starts from another run (train.init_from), training all its
weights or LoRA adapters (train.lora_rank, peft) on a folder of new images."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import needs_text
from ddpmkit.checkpoint import list_checkpoints
from ddpmkit.config import ConfigError, load_config
from ddpmkit.finetune import FineTuneError
from ddpmkit.losses import training_losses
from ddpmkit.models import load_diffusion
from ddpmkit.train import DenoiserTask, train
from ddpmkit.train.batches import step_batch

pytest.importorskip("peft")

TINY = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4",
        "train.batch_size=16", "train.warmup_steps=0", "train.sample_every=0", "train.eval_every=0", "train.keep_steps=",
        "train.mixed_precision=fp32", "train.log_every=5"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny digit model: the run every test here fine-tunes."""
    root = tmp_path_factory.mktemp("base")
    return train(load_config("mnist", [*TINY, "train.steps=30", "train.checkpoint_every=0", f"train.run_dir={root / 'base'}"]), progress=False)


@pytest.fixture(scope="module")
def new_style(tmp_path_factory):
    """The images to teach it: 16 grey 8x8 crosses, a shape the digits set does not have."""
    folder = tmp_path_factory.mktemp("crosses")
    for k in range(16):
        img = np.zeros((8, 8), dtype=np.uint8)
        c = 2 + k % 4
        img[c, 1:7] = img[1:7, c] = 255
        Image.fromarray(img, "L").save(folder / f"{k}.png")
    return ["data.name=folder", f"data.path={folder}", "data.image_size=8", "data.channels=1"]


def simple_loss(m, x0: torch.Tensor) -> float:
    """L_simple of a loaded model on x0 at fixed timesteps and noise."""
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, m.schedule.T, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return training_losses(m.network, x0, t, m.schedule, noise, prediction=m.prediction)["loss"].mean().item()


def lora(base, new_style, run, *extra: str) -> list[str]:
    return [*TINY, *new_style, f"train.init_from={base}", "train.lora_rank=4", "train.lr=5e-3", "train.ema_decay=0",
            f"train.run_dir={run}", *extra]


def test_a_lora_run_trains_only_its_adapters_saves_only_them_and_learns_the_new_images(base_run, new_style, tmp_path):
    run = train(load_config("mnist", lora(base_run, new_style, tmp_path / "lora", "train.steps=100", "train.lora_rank=8", "train.lr=2e-2",
                                          "train.lr_schedule=constant", "train.checkpoint_every=0")), progress=False)
    saved = load_file(list_checkpoints(run)[-1] / "ema.safetensors")
    assert saved and all("lora_" in k for k in saved), "a LoRA checkpoint holds its adapters alone"
    base, tuned = load_diffusion(base_run), load_diffusion(run)
    full = load_file(list_checkpoints(base_run)[-1] / "ema.safetensors")
    assert sum(v.numel() for v in saved.values()) < 0.5 * sum(v.numel() for v in full.values())
    # the frozen base is the base run's, untouched: a layer without adapters, and the base layer under an adapter
    state = tuned.network.state_dict()
    first = next(k for k in full if k.endswith("input_conv.weight"))
    assert torch.equal(state[first], full[first])
    adapted = [k for k in state if k.endswith("base_layer.weight")]
    assert adapted and all(torch.equal(state[k], full[k.replace("base_layer.", "")]) for k in adapted)
    crosses = DenoiserTask(load_config("mnist", [*TINY, *new_style])).load_data().get_batch(torch.arange(16))
    before, after = simple_loss(base, crosses), simple_loss(tuned, crosses)
    assert after < 0.95 * before, (before, after)  # measured 0.625 -> 0.558 (every weight training: 0.497)


def test_a_lora_run_starts_as_its_base_and_resumes_exactly(base_run, new_style, tmp_path):
    cfg = load_config("mnist", lora(base_run, new_style, tmp_path / "x"))
    net = DenoiserTask(cfg).build_model()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 300.0)
    with torch.no_grad():
        assert torch.equal(net(x, t), load_diffusion(base_run).network(x, t)), "B = 0: the adapted network begins as its base"
    straight = train(load_config("mnist", lora(base_run, new_style, tmp_path / "straight", "train.steps=12", "train.checkpoint_every=0")),
                     progress=False)
    half = lora(base_run, new_style, tmp_path / "halves", "train.checkpoint_every=6")
    train(load_config("mnist", [*half, "train.steps=12", "train.keep_checkpoints=0"]), progress=False)
    for later in list_checkpoints(tmp_path / "halves")[1:]:  # as if killed right after the half-way checkpoint
        shutil.rmtree(later)
    resumed = train(load_config("mnist", [*half, "train.steps=12"]), resume=True, progress=False)
    a, b = (load_file(list_checkpoints(r)[-1] / "model.safetensors") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_errors_are_clear(base_run, new_style, tmp_path):
    with pytest.raises(ConfigError, match="give train.init_from"):
        load_config("mnist", [*TINY, "train.lora_rank=4"])
    other = load_config("mnist", [*TINY, "network.base_channels=16", f"train.init_from={base_run}", f"train.run_dir={tmp_path / 'o'}"])
    with pytest.raises(FineTuneError, match=r"network.base_channels = 16 here, 8 there: give the same keys, or start from its config "
                                            rf"\(`ddpmkit train {base_run / 'config.json'} ...`\)"):
        DenoiserTask(other).build_model()
    # a network that cannot be built at all on these images (the preset's attention at 7x7 on 8x8 ones, as a DreamBooth
    # preset over a base trained with other keys) named the attention resolutions, not the base it must match
    unbuildable = load_config("mnist", [*TINY, "network.attention_resolutions=7", f"train.init_from={base_run}", f"train.run_dir={tmp_path / 'o'}"])
    with pytest.raises(FineTuneError, match=r"network.attention_resolutions = \(7,\) here, \(4,\) there"):
        DenoiserTask(unbuildable).build_model()
    bad = load_config("mnist", lora(base_run, new_style, tmp_path / "b", "train.lora_targets=to_q"))
    with pytest.raises(FineTuneError, match=r"no layer of this network is named \['to_q'\]: train.lora_targets takes some of \["):
        DenoiserTask(bad).build_model()


def test_full_fine_tuning_starts_at_the_base_and_lora_alpha_scales_the_adapters(base_run, new_style, tmp_path):
    full = DenoiserTask(load_config("mnist", [*TINY, *new_style, f"train.init_from={base_run}"])).build_model()
    base = load_file(list_checkpoints(base_run)[-1] / "ema.safetensors")
    assert all(torch.equal(full.state_dict()[k], v) for k, v in base.items()), "every weight starts at the base's EMA"
    deltas = []
    for alpha in (4, 8):  # rank 4: the adapter adds (alpha / 4) B A x to the base layer's output
        torch.manual_seed(0)  # the same A
        net = DenoiserTask(load_config("mnist", lora(base_run, new_style, tmp_path / "a", f"train.lora_alpha={alpha}"))).build_model()
        layer = next(m for m in net.modules() if hasattr(m, "lora_B") and hasattr(m, "base_layer"))
        for p in layer.lora_B.parameters():
            torch.nn.init.constant_(p, 0.01)
        x = torch.randn(2, layer.base_layer.in_channels if hasattr(layer.base_layer, "in_channels") else layer.base_layer.in_features,
                        *([5] if isinstance(layer.base_layer, torch.nn.Conv1d) else [5, 5] if isinstance(layer.base_layer, torch.nn.Conv2d) else []))
        with torch.no_grad():
            deltas.append(layer(x) - layer.base_layer(x))
    assert deltas[0].abs().max() > 0 and torch.allclose(deltas[1], 2 * deltas[0], rtol=1e-4, atol=1e-6)


def test_a_lora_run_merges_into_its_base_at_a_scale_and_unmerges(base_run, new_style, tmp_path):
    run = train(load_config("mnist", lora(base_run, new_style, tmp_path / "lora", "train.steps=20", "train.lr=2e-2",
                                          "train.checkpoint_every=0")), progress=False)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 300.0)
    with torch.no_grad():
        direct = load_diffusion(run).network(x, t)  # the adapters as trained, unmerged
        base = load_diffusion(base_run)
        plain = {k: v.clone() for k, v in base.network.state_dict().items()}
        one = load_diffusion(base_run, loras=[f"{run}:1"])
        assert (one.network(x, t) - direct).abs().max() < 1e-5 and (direct - base.network(x, t)).abs().max() > 1e-3
        half = load_diffusion(base_run, loras=[f"{run}:0.5"])
        merged = {k.replace("base_layer.", ""): v for k, v in one.network.state_dict().items() if "lora_" not in k}
        halved = {k.replace("base_layer.", ""): v for k, v in half.network.state_dict().items() if "lora_" not in k}
        moved = [k for k in plain if not torch.equal(merged[k], plain[k])]
        assert moved and all(torch.allclose(halved[k], plain[k] + 0.5 * (merged[k] - plain[k]), atol=1e-6) for k in moved)
        half.loras.unmerge()
        back = {k.replace("base_layer.", ""): v for k, v in half.network.state_dict().items() if "lora_" not in k}
        assert all(torch.allclose(back[k], plain[k], atol=1e-6) for k in plain)
    from ddpmkit.loras import LoRAError

    with pytest.raises(LoRAError, match="without adapters"):
        load_diffusion(base_run, loras=[str(base_run)])
    other = train(load_config("mnist", [*TINY, "network.base_channels=16", "train.steps=1", f"train.run_dir={tmp_path / 'other'}"]),
                  progress=False)
    with pytest.raises(LoRAError, match="another kind of network"):
        load_diffusion(other, loras=[str(run)])
    (tmp_path / "kohya.safetensors").write_bytes(b"a LoRA file")  # a diffusers or Kohya LoRA file is for SD folders
    with pytest.raises(LoRAError, match=r"kohya.safetensors is a LoRA file \(diffusers' or Kohya's format\): it merges into a Stable"):
        load_diffusion(base_run, loras=[str(tmp_path / "kohya.safetensors")])


@needs_text
def test_dreambooth_draws_and_caches_its_class_images_and_weighs_the_prior(new_style, tmp_path):
    from ddpmkit import dreambooth
    from ddpmkit.pipelines.generate import generate
    from ddpmkit.pipelines.guided import GuidanceRequest

    text = [*TINY, "network.text_max_tokens=8"]
    base = train(load_config("mnist_text", [*text, "train.steps=5", "train.checkpoint_every=0", f"train.run_dir={tmp_path / 'base'}"]),
                 progress=False)
    db = [*text, *new_style, f"train.init_from={base}", "dreambooth.instance_prompt=a sks digit", "dreambooth.class_prompt=a digit",
          "dreambooth.class_images=6", "dreambooth.class_steps=3", "dreambooth.prior_loss_weight=0.5", "train.steps=4",
          "train.checkpoint_every=0", f"train.run_dir={tmp_path / 'db'}"]
    task = DenoiserTask(load_config("mnist_text", db))
    # the class images are the base model's own draws for the class prompt (seeds 0..5), after the 16 crosses
    drawn = generate(load_diffusion(base), 6, GuidanceRequest(prompts=["a digit"], scale=3.0), "dpmpp_2m", 3, seed=0, progress=False).images
    assert task.num_examples == 22 and torch.equal(task.dataset.get_batch(torch.arange(16, 22)), drawn)
    # each instance image is conditioned on the instance prompt, each class image on the class prompt
    rows = task.conditioning.caption_ids[:, 0]
    assert rows[:16].eq(0).all() and rows[16:].eq(1).all()
    # the weights make a batch's mean the DreamBooth loss: instance mean + prior_loss_weight * class mean
    losses = torch.rand(22)
    torch.testing.assert_close((task.weights * losses).mean(), losses[:16].mean() + 0.5 * losses[16:].mean())
    # ... and the task's loss weighs each example of a batch by its own
    network, weights = load_diffusion(base).network, task.weights
    weighted = task.loss(network, step_batch(0, 3, 22, 22, torch.device("cpu")))
    task.weights = None
    batch = step_batch(0, 3, 22, 22, torch.device("cpu"))
    torch.testing.assert_close(weighted, task.loss(network, batch) * weights[batch.indices])
    task.weights = weights
    cache = tmp_path / "db" / dreambooth.CACHE
    stamp = cache.stat().st_mtime_ns
    run = train(load_config("mnist_text", db), progress=False)  # trains, reusing the cached class images
    assert cache.stat().st_mtime_ns == stamp and list_checkpoints(run)
    with pytest.raises(dreambooth.DreamBoothError, match="give train.init_from"):
        DenoiserTask(load_config("mnist_text", [*text, "dreambooth.instance_prompt=a sks digit"]))
    # a base that takes no prompt: it said "giving --prompt needs a text-conditional model", a flag `train` has not
    plain = train(load_config("mnist", [*TINY, "train.steps=1", "train.checkpoint_every=0", f"train.run_dir={tmp_path / 'plain'}"]),
                  progress=False)
    with pytest.raises(dreambooth.DreamBoothError, match=rf"the base model {plain} \(train.init_from\) is conditioned on none, not text"):
        DenoiserTask(load_config("mnist_text", [*db[:-3], f"train.init_from={plain}", f"train.run_dir={tmp_path / 'db2'}"]))
    side = load_diffusion(base).image_shape[-1]  # instance images of another size: the size and channels to load them at
    with pytest.raises(dreambooth.DreamBoothError, match=rf"the instance images are \(1, 12, 12\): load them at its size with data.image_size={side} "
                                                         r"data.channels=1$"):
        DenoiserTask(load_config("mnist_text", [*db[:-1], "data.image_size=12", f"train.run_dir={tmp_path / 'db3'}"]))
    with pytest.raises(ConfigError, match="give dreambooth.class_prompt"):
        load_config("mnist_text", [*text, "dreambooth.instance_prompt=a sks digit", "dreambooth.class_images=4"])


def test_a_run_finds_the_runs_it_names_from_another_working_folder(tmp_path, monkeypatch):
    """A LoRA run names its base as training was given it (train.init_from=runs/base, from the project's folder), so
    `cd runs && ddpmkit sample lora` (or a page served from elsewhere) said "no checkpoint at runs/base". The base is now
    also looked for from the folder the run trained from (so is a latent run's autoencoder, an unCLIP run's CLIP); a base
    that is gone says which run it was."""
    from ddpmkit.checkpoint import CheckpointError

    monkeypatch.chdir(tmp_path)
    one = [*TINY, "train.steps=1", "train.checkpoint_every=0"]
    train(load_config("mnist", [*one, "train.run_dir=runs/base"]), progress=False)
    train(load_config("mnist", [*one, "train.init_from=runs/base", "train.lora_rank=2", "train.run_dir=runs/lora"]), progress=False)
    here = load_diffusion("runs/lora").network.state_dict()
    monkeypatch.chdir(tmp_path / "runs")
    there = load_diffusion("lora").network.state_dict()
    assert all(torch.equal(here[k], there[k]) for k in here)
    # likewise a latent run's autoencoder (data.autoencoder=runs/ae)
    monkeypatch.chdir(tmp_path)
    train(load_config("mnist_autoencoder", ["data.name=digits", "autoencoder.pad_to=8", "autoencoder.channel_mult=1,2",
                                            "autoencoder.base_channels=8", "train.steps=1", "train.run_dir=runs/ae"]), progress=False)
    train(load_config("mnist_latent", ["data.name=digits", "data.autoencoder=runs/ae", "network.base_channels=8",
                                       "network.attention_resolutions=2", "train.steps=1", "train.run_dir=runs/ldm"]), progress=False)
    (tmp_path / "imgs").mkdir()  # and the image folder a run trained on (eval's held-out data)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    train(load_config("mnist", [*one, "data.name=folder", "data.path=imgs", "data.image_size=8", "data.channels=1",
                                "train.run_dir=runs/folder"]), progress=False)
    monkeypatch.chdir(tmp_path / "runs")
    assert load_diffusion("ldm").autoencoder is not None
    assert load_diffusion("folder").config.data.path == str(tmp_path / "imgs")
    (tmp_path / "runs" / "base").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=r"lora/ckpt-0000001 is a LoRA run: its adapters sit on the weights of runs/base \(its "
                                              r"train.init_from\), which cannot be loaded from here \(no checkpoint at runs/base"):
        load_diffusion("lora")
