"""The command line: outputs exist and look right; bad input ends in one clear line."""
import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import in_a_thread
from ddpmkit.cli import build_parser, main
from ddpmkit.config import PRESET_DIR
from ddpmkit.errors import compile_failure


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_bare_command_shows_the_commands_and_version_says_what_runs(capsys):
    """`ddpmkit` alone said "the following arguments are required: command"; `ddpmkit --version` and `python -m ddpmkit`
    did not exist."""
    import subprocess
    import sys

    import torch

    with pytest.raises(SystemExit) as bare:
        main([])
    out = capsys.readouterr().out
    assert bare.value.code == 2 and "train any model from a config file or preset" in out and "ddpmkit COMMAND --help" in out
    done = subprocess.run([sys.executable, "-m", "ddpmkit", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ddpmkit ") and f"torch {torch.__version__}, Python " in done.stdout, done


def test_overrides_may_follow_a_flag(tmp_path, capsys):
    """`ddpmkit train mnist --overwrite train.lr=1e-3`: argparse ends the overrides at the first flag, and the ones after it
    were "unrecognized arguments"; they are overrides wherever they stand, and anything else after a flag is refused."""
    code, out, err = run(capsys, "train", "toy2d", "train.steps=2", "--quiet", f"train.run_dir={tmp_path / 'r'}", "train.seed=3")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "ckpt-0000002" / "config.json").read_text())["train"]["seed"] == 3
    with pytest.raises(SystemExit):
        main(["train", "toy2d", "--quiet", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "r"), "--n", "2", "train.steps=3"])  # sample takes no overrides
    assert "unrecognized arguments: train.steps=3" in capsys.readouterr().err
    # an unknown flag is the command's error, with its usage and the flag meant (it was the top-level `ddpmkit [-h]
    # [--version] COMMAND ...`, and an override beside it was called unrecognized too)
    with pytest.raises(SystemExit):
        main(["train", "toy2d", "--quiett", "train.seed=3"])
    err = capsys.readouterr().err
    assert err.startswith("usage: ddpmkit train ")
    assert err.endswith("ddpmkit train: error: unrecognized arguments: --quiett (did you mean --quiet?)\n")
    with pytest.raises(SystemExit):
        main(["interpolate", str(tmp_path / "r"), "--seeds", "1,2", "--stepz", "2", "--frames", "3"])
    assert capsys.readouterr().err.endswith("ddpmkit interpolate: error: unrecognized arguments: --stepz (did you mean --steps?) 2 --frames 3\n")
    # a mistyped run folder names the run beside it
    code, out, err = run(capsys, "sample", str(tmp_path / "rr"), "--n", "1")
    assert code == 2 and err.strip().endswith(f"; did you mean {tmp_path / 'r'}?"), err


def test_forward_writes_strip_and_spectrum(tmp_path, capsys):
    code, out, err = run(capsys, "forward", "mnist5k:7", "--out", str(tmp_path), "--t", "0,100,999")
    assert code == 0, err
    strip = Image.open(tmp_path / "forward_strip.png")
    assert strip.width > 3 * strip.height / 2
    assert (tmp_path / "spectrum.png").stat().st_size > 1000
    # the default --t is spread over the schedule's own T: a fixed 0..999 ended in "timesteps [100, ...] outside [0, 99]"
    from ddpmkit.cli.forward import default_timesteps

    assert default_timesteps(1000) == [0, 50, 100, 200, 400, 700, 999] and default_timesteps(100) == [0, 5, 10, 20, 40, 70, 99]
    assert default_timesteps(4) == [0, 1, 2, 3] and default_timesteps(1) == [0]
    code, out, err = run(capsys, "forward", "mnist5k:7", "--out", str(tmp_path / "T100"), "--T", "100")
    assert code == 0 and (tmp_path / "T100" / "forward_strip.png").is_file(), err


def test_forward_spectrum_whitens_with_t():
    """The lectures' point: noise is flat in frequency, images are not, so x_t's spectrum flattens as t grows."""
    import torch

    from ddpmkit.data import load_dataset
    from ddpmkit.process import q_sample
    from ddpmkit.schedules import NoiseSchedule
    from ddpmkit.viz import radial_power_spectrum

    x0 = load_dataset("mnist5k").x[:16]
    s = NoiseSchedule.from_name("linear", 1000)
    slopes = []
    for t in [0, 200, 999]:
        f, p = radial_power_spectrum(q_sample(x0, torch.full((16,), t), s, torch.randn_like(x0)))
        slopes.append(np.polyfit(np.log(f), np.log(p), 1)[0])
    assert slopes[0] < -1.0 and slopes[0] < slopes[1] < slopes[2] and abs(slopes[2]) < 0.3


def test_every_argument_of_every_command_says_what_it_is():
    """`ddpmkit CMD --help` explains each flag and positional (65 had no text, e.g. sample's --out and --n), and none is
    taken only to be ignored: posterior draws by Algorithm 2 from x_t by definition, so it offers no --sampler."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = {name: [a.dest for a in p._actions if not a.help] for name, p in commands.items()}
    assert not {name: dests for name, dests in bare.items() if dests}
    assert "sampler" not in {a.dest for a in commands["posterior"]._actions}
    assert "(default: samples)" in commands["sample"].format_help()


@pytest.mark.parametrize("argv,message", [
    (["train", "configs/mnist.toml", "data.name=folder", "data.path=/no/such/folder"], "image folder not found: /no/such/folder"),
    # a key the config would not read: the digits trained on, the photos not (it used to start; tests/test_config.py has every key)
    (["train", "mnist", "data.path=my_photos"], "data.path is read only with data.name = folder or npz; this config has data.name = 'mnist5k' "
     "and would train without it; for your own images add data.name=folder (a folder) or data.name=npz (an .npz file)"),
    (["train", "toy2d", "data.hflip=true"], "data.hflip flips images left to right; this run diffuses vectors of shape (2,)"),  # it broadcast
    (["train", "configs/mnist.toml", "diffusion.schedule=cosinus"], "choose one of ['linear', 'cosine', 'scaled_linear', 'sigmoid']"),
    (["train", "configs/mnist.toml", "train.batchsize=3"], "did you mean 'train.batch_size'"),
    (["forward", "missing.png"], "image not found: missing.png: give an image file (or a built-in one such as mnist5k:0)"),
    (["forward", ""], "an empty path: give an image file"),  # was "image not found: ."
    (["forward", "."], ". is a folder: give an image file"),
    (["forward", "mnist5k:0", "--schedule", "cosin"], "unknown noise schedule 'cosin'"),
    (["forward", "mnist5k:0", "--t", "0,1000"], "timesteps [1000] outside [0, 999]"),  # t = 0 .. T - 1
    (["sample", "/no/run"], "no checkpoint at /no/run"),
    (["train", "toy2d", "train.batch_size=-3"], "train.batch_size = -3 must be >= 1"),
    (["train", "toy2d", "train.batch_size=10000000000"], "train.batch_size = 10000000000 must be <= 1048576"),
    (["train", "toy2d", f"train.seed={2**64}"], f"train.seed = {2**64} must be in 0 .. 2**40-1"),
    (["sample", "/no/run", "--seed", str(2**64)], f"--seed {2**64}: give a whole number in -2**63 .. 2**63-1"),
    (["forward", "mnist5k:0", "--seed", str(-2**63 - 1)], f"--seed {-2**63 - 1}: give a whole number in -2**63 .. 2**63-1"),
    (["interpolate", "/no/run", "--seeds", f"3,{2**70}"], f"--seeds {2**70}: give a whole number in -2**63 .. 2**63-1"),
    (["train", "toy2d", "train.lr=0"], "train.lr = 0.0 must be > 0"),
    (["sample", "/no/run", "--guidance", "nan"], "the guidance must be a finite number, got nan"),
    (["sample", "/no/run", "--autoguide", "/no/run/ckpt-0000002", "--autoguide-scale", "inf"],
     "the autoguidance weight must be a finite number, got inf"),
    (["sample", "/no/run", "--steps", "0"], "--steps 0: give a whole number >= 1 (leave --steps out for the run's own"),
    (["sample", "/no/run", "--n", "-3"], "--n -3: give a whole number >= 1"),
    (["demo", "--steps", "0"], "--steps 0: give a whole number >= 1"),
    # checked before the demo's minutes of training, not after them
    (["demo", "--autoguide-scale", "nan"], "the autoguidance weight must be a finite number, got nan"),
    (["demo", "--autoguide-scale", "-1"], "the autoguidance weight w must be a finite number >= 0"),
    (["demo", "--minutes", "nan"], "train.max_minutes = nan must be a finite number"),
    (["demo", "--steps", "5000"], "--steps 5000: the demo's model has T = 1000 steps"),  # it came after the training
    (["serve", "/no/run", "--port", "99999"], "--port 99999: give a port in 1..65535"),
    # every command's counts, checked before any model loads
    (["interpolate", "/no/run", "--n", "0"], "--n 0: give a whole number >= 1"),
    (["eval", "/no/run", "--n-bpd", "0"], "--n-bpd 0: give a whole number >= 1"),
    (["tune-grid", "/no/run", "--evals", "-1"], "--evals -1: give a whole number >= 1"),
    (["voyage", "keys.txt", "--model", "/no/run", "--frames", "0"], "--frames 0: give a whole number >= 1"),
    (["interpolate", "/no/run", "--seeds", "1"], "--seeds takes two seeds separated by a comma, e.g. 3,14; got '1'"),
    (["interpolate", "/no/run", "--images", "mnist5k:0"], "--images takes two images separated by a comma, e.g. mnist5k:0,mnist5k:1"),
    # --images runs Algorithm 2 from x_t (DDPM Fig. 8): another sampler was taken and ignored
    (["interpolate", "/no/run", "--images", "mnist5k:0,mnist5k:1", "--sampler", "unipc", "--seeds", "3,14"],
     "runs Algorithm 2 (ddpm) from there, as DDPM's Fig. 8, with --seed's noise: leave out --seeds and --sampler unipc"),
    (["interpolate", "/no/run", "--images", "mnist5k:0,mnist5k:1", "--eta", "0.5", "--no-clip"],
     "with --seed's noise: leave out --eta and --no-clip"),
    (["interpolate", "/no/run", "--seeds", "3,14", "--t", "300"], "--t belongs to --images; --seeds gives the seeds of x_T (the slerp runs"),
    (["interpolate", "/no/run", "--seed", "5", "--t", "300"], "--seed and --t belong to --images"),
    # counts whose memory grows past what the picture shows: one line at once, not a kill for memory minutes later
    (["forward", "mnist5k:0", "--size", "100000"], "--size 100000: at most 1024 (the strip shows each image at 192 pixels"),
    (["forward", "mnist5k:0", "--T", "1000000000"], "--T 1000000000: at most 100000"),
    (["text-diff", "/no/run", "mnist5k:3", "--from", "a", "--to", "b", "--amounts", "0,nan"], "--amounts takes numbers in [0, 1] separated"),
    (["text-diff", "/no/run", "mnist5k:3", "--from", "a", "--to", "b", "--amounts", "0.5,5"], "--amounts takes numbers in [0, 1] separated"),
    # a guide's weight without the guide was taken and ignored
    (["sample", "/no/run", "--classifier-scale", "5"], "--classifier-scale weighs --classifier guidance: give --classifier RUN too, or leave"),
    (["sample", "/no/run", "--autoguide-scale", "2"], "--autoguide-scale weighs --autoguide guidance: give --autoguide RUN too"),
    (["forward", "mnist5k:0", "--size", "1"], "the spectrum needs an image of at least 2x2 pixels; this one is 1x1"),  # an IndexError
    (["voyage", "keys.txt", "--model", "/no/run", "--upscale", "100000"], "--upscale 100000: at most 32"),
])
def test_bad_input_gives_one_clear_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_a_compile_that_fails_on_this_machine_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """torch.compile failing for a reason of the machine's (here a real one: no working C++ compiler for inductor's CPU
    kernels, as on many laptops) ends the run with one line that says how to go on, not inductor's traceback, before
    any checkpoint."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing compiled before to reuse
    code, out, err = run(capsys, "train", "toy2d", "train.steps=2", "train.compile=default", f"train.run_dir={tmp_path / 'run'}")
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ddpmkit train: error: torch.compile could not compile the network with torch ") and \
        "No working C++ compiler" in last and "train.compile=no" in last, last
    assert not list((tmp_path / "run").glob("ckpt-*"))
    assert compile_failure(RuntimeError("a bug")) is None  # any other error keeps its traceback


def test_corrupt_image_in_training_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "ok.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, out, err = run(capsys, "train", str(PRESET_DIR / "mnist.toml"), "data.name=folder", f"data.path={folder}",
                         f"train.run_dir={tmp_path / 'run'}")
    assert code == 2 and "bad.jpg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("ckpt-*"))


def test_the_images_preset_trains_on_a_folder_of_photos(tmp_path, capsys, monkeypatch):
    """A practitioner's own images had no preset: `train mnist data.name=folder ...` ended in the digits' attention at
    7x7 and sigma_data. The images preset: RGB 64x64 with flips, a GPU-sized UNet whose attention levels exist at 64x64
    and below; without data.path it says what to give."""
    from ddpmkit.config import load_config
    from ddpmkit.nets import build_network

    cfg = load_config("images")
    assert (cfg.data.name, cfg.data.image_size, cfg.data.channels, cfg.data.hflip, cfg.diffusion.sigma_data) == ("folder", 64, 3, True, 0.5)
    net = build_network(cfg.network, (3, 64, 64))  # the preset's comment gives its size
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 19.4
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "images")
    assert code == 2 and err.strip().endswith("needs data.path: the folder of your images (data.path=my_photos)"), err
    rng = np.random.default_rng(0)
    (tmp_path / "photos" / "trip").mkdir(parents=True)
    for i, (h, w) in enumerate([(30, 40), (48, 32), (24, 24), (40, 60)]):  # landscape, portrait, square; a subfolder
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "photos" / ("trip" if i % 2 else "") / f"{i}.jpg")
    tiny = ["data.image_size=16", "network.base_channels=8", "diffusion.T=100", "train.batch_size=4", "train.steps=2", "train.warmup_steps=1",
            "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=2", "--quiet"]
    code, out, err = run(capsys, "train", "images", "data.path=photos", *tiny)
    assert code == 0, err
    assert out.strip().endswith("(sample it: ddpmkit sample runs/images --sampler dpmpp_2m --steps 20)"), out  # not T ancestral steps
    code, out, err = run(capsys, "sample", "runs/images", "--n", "2", "--steps", "3", "--no-gif", "--out", "s")
    assert code == 0, err
    assert [Image.open(tmp_path / "s" / "samples" / f"00000{i}.png").mode for i in range(2)] == ["RGB", "RGB"]
    code, out, err = run(capsys, "eval", "runs/images", "--metrics", "bpd_vlb", "--n-bpd", "2")  # said nothing of which images
    assert code == 0 and "[bits/dim (discretised decoder)], 2 examples of folder, its training data (no held-out split)" in out, err + out


def test_a_folder_with_a_subfolder_per_class_trains_a_class_conditional_model(tmp_path, capsys, monkeypatch):
    """A folder's images had no labels, so `network.num_classes` on one ended in "has no labels (use mnist5k, ...)":
    a practitioner's photos sorted into one subfolder per class (torchvision's ImageFolder layout) could not train a
    class-conditional model. Each first-level subfolder is now a class, numbered in sorted order, and the run says
    which number is which."""
    from ddpmkit.data import ImageFolder

    monkeypatch.chdir(tmp_path)
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green/dark": (0, 90, 0)}  # a deeper folder belongs to its first level
    for name, rgb in colours.items():
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12, 3), rgb, np.uint8)).save(tmp_path / "pets" / name / f"{i}.png")
    folder = ImageFolder(tmp_path / "pets", 8)
    assert folder.classes == ("blue", "green", "red") and folder.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert (folder.get_batch(folder.labels.eq(2).nonzero()[:, 0])[:, 0] == 1).all()  # the red ones are red
    tiny = ["data.path=pets", "data.image_size=16", "network.base_channels=8", "train.batch_size=6", "train.steps=2",
            "train.warmup_steps=1", "train.sample_every=0", "train.eval_every=0"]
    code, _, err = run(capsys, "train", "images", *tiny, "network.num_classes=2")
    assert code == 2 and err.strip().endswith("pets has 3 class subfolders (blue, green, red): set network.num_classes = 3"), err
    code, out, err = run(capsys, "train", "images", *tiny, "network.num_classes=3")
    assert code == 0, err
    assert "classes of pets: 0 blue, 1 green, 2 red (sample one: --class NAME or NUMBER)" in out, out
    code, out, err = run(capsys, "sample", "runs/images", "--class", "2", "--n", "2", "--steps", "2", "--no-gif", "--out", "s")
    assert code == 0 and (tmp_path / "s" / "grid.png").is_file(), err
    # the checkpoint records the names: a class by its name draws what its number draws
    code, out, err = run(capsys, "sample", "runs/images", "--class", "red", "--n", "2", "--steps", "2", "--no-gif", "--out", "named")
    assert code == 0, err
    assert all(Image.open(tmp_path / d / "samples" / "000000.png").tobytes() == Image.open(tmp_path / "s" / "samples" / "000000.png").tobytes()
               for d in ("named",))
    code, _, err = run(capsys, "sample", "runs/images", "--class", "purple", "--n", "2", "--steps", "2")
    assert code == 2 and err.strip().endswith("no class 'purple' in runs/images/ckpt-0000002: its classes are 0 blue, 1 green, 2 red"), err
    from ddpmkit.web.actions import Actions
    from ddpmkit.web.limits import Limits
    from ddpmkit.web.shelf import Shelf

    page = Actions(Shelf(["runs/images"]), Limits(), tmp_path / "work")
    assert page.describe("runs/images")[0].endswith("class-conditional: 0 blue, 1 green, 2 red")
    request, flags = page.request(page.shelf.get("runs/images"), "red, 0", 3.0)
    assert request.classes == [2, 0] and flags[:2] == ["--class", "red,0"]
    # a noisy classifier of the same folder guides an unconditional model toward a class by its name
    code, _, err = run(capsys, "train", "mnist_classifier", "data.name=folder", *tiny, "network.attention_resolutions=", "network.num_classes=3",
                       "diffusion.schedule=cosine", "train.run_dir=runs/clf", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "train", "images", *tiny, "train.run_dir=runs/plain", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "sample", "runs/plain", "--classifier", "runs/clf", "--class", "green,0", "--n", "2", "--steps", "2",
                       "--no-gif", "--out", "guided")
    assert code == 0 and (tmp_path / "guided" / "grid.png").is_file(), err
    code, _, err = run(capsys, "sample", "runs/plain", "--classifier", "runs/clf", "--class", "cyan", "--n", "2", "--steps", "2")
    assert code == 2 and "no class 'cyan' in runs/clf/ckpt-0000002: its classes are 0 blue, 1 green, 2 red" in err, err
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "pets" / "loose.png")  # one image outside the subfolders
    code, _, err = run(capsys, "train", "images", *tiny, "network.num_classes=3", "train.run_dir=runs/other")
    assert code == 2 and "pets has images outside subfolders: for classes, put each class's images in a subfolder of its own" in err, err


def test_train_then_sample_writes_grid_pngs_and_gif(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", str(PRESET_DIR / "mnist.toml"), "data.name=digits", "network.base_channels=8",
                       "network.channel_mult=1,2", "network.attention_resolutions=4", "train.steps=3", "train.batch_size=8", "diffusion.T=100",
                       "train.sample_every=0", f"train.run_dir={run_dir}", "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "4", "--steps", "20", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert "20 network evaluations" in out
    assert Image.open(tmp_path / "s" / "grid.png").size[0] > 16
    assert sorted(p.name for p in (tmp_path / "s" / "samples").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    gif = Image.open(tmp_path / "s" / "reverse_process.gif")
    assert gif.n_frames >= 10

    # a few-step ODE sampler, a grid tuned for this checkpoint, and the evaluation report
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--sampler", "unipc", "--steps", "5", "--grid", "karras",
                         "--no-gif", "--out", str(tmp_path / "u"))
    assert code == 0 and "5 network evaluations" in out, err
    # EDM's stochastic Heun with its --churn, Euler ancestral with its --eta, reaching the samplers: without noise they
    # are heun and euler; churn for another sampler is one line
    drawn = {}
    for name, argv in (("edm0", ["edm", "--churn", "0"]), ("edm10", ["edm", "--churn", "10"]), ("heun", ["heun"]),
                       ("ea0", ["euler_ancestral", "--eta", "0"]), ("ea1", ["euler_ancestral", "--eta", "1"]), ("euler", ["euler"])):
        code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--steps", "3", "--no-gif", "--out", str(tmp_path / name),
                             "--sampler", *argv)
        assert code == 0 and f"with {argv[0]}" in out and f"{5 if argv[0] in ('edm', 'heun') else 3} network evaluations" in out, err
        drawn[name] = torch.load(tmp_path / name / "samples.pt")
    assert torch.equal(drawn["edm0"], drawn["heun"]) and not torch.allclose(drawn["edm10"], drawn["heun"], atol=1e-3)
    assert torch.equal(drawn["ea0"], drawn["euler"]) and not torch.allclose(drawn["ea1"], drawn["euler"], atol=1e-3)
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--sampler", "heun", "--churn", "10", "--out", str(tmp_path / "e"))
    assert code == 2 and "sampler 'heun' takes no option(s) ['churn']; churn is for edm" in err, err
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--sampler", "edm", "--churn", "-1", "--out", str(tmp_path / "e"))
    assert code == 2 and "--churn must be a finite number >= 0, got -1.0" in err, err
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--sampler", "ddim", "--steps", "3", "--autoguide", str(run_dir),
                         "--autoguide-scale", "2", "--no-gif", "--out", str(tmp_path / "ag"))
    assert code == 0 and (tmp_path / "ag" / "grid.png").is_file(), err
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--autoguide", "/no/weaker/run")
    assert code == 2 and "no checkpoint at /no/weaker/run" in err, err
    grid = tmp_path / "grid.json"
    code, out, err = run(capsys, "tune-grid", str(run_dir), "--steps", "4", "--n", "2", "--evals", "8", "--out", str(grid))
    assert code == 0 and grid.is_file(), err
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--sampler", "unipc", "--grid", str(grid), "--out", str(tmp_path / "g"))
    assert code == 0 and "4 network evaluations" in out, err
    with Image.open(tmp_path / "g" / "reverse_process.gif") as gif:  # each of the grid's 4 steps, not every T // 50 = 2nd
        assert gif.n_frames == 4, gif.n_frames
    # --dtype is a diffusers folder's weights' type: for a ddpmkit run it was ignored; --precision is what computes in bf16
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--steps", "2", "--dtype", "bf16", "--out", str(tmp_path / "d"))
    assert code == 2 and "is a ddpmkit run, whose float32 weights compute in bf16 or fp16 with --precision" in err
    report = tmp_path / "eval.json"
    code, out, err = run(capsys, "eval", str(run_dir), "--metrics", "bpd", "--n", "50", "--n-bpd", "2", "--sampler", "ddim", "--steps", "5",
                         "--inception", "pt_inception.pth", "--out", str(report))
    assert code == 0, err
    # --n, --sampler, --steps and --inception are for sampled metrics, which bits/dim draw none of: said, not silently unused
    assert "note: --n 50 counts the samples of fd/kid/is/copies, which this evaluation (bpd_vlb, bpd_ode) does not draw; " \
           "bits/dim are of --n-bpd 2 examples" in err, err
    assert "note: --sampler ddim and --steps 5 choose how fd/kid/is/copies draw their samples; this evaluation (bpd_vlb, bpd_ode) draws none" in err
    assert "note: --inception pt_inception.pth: the Inception network is read only for fd/kid/is with --features inception; this " \
           "evaluation (bpd_vlb, bpd_ode; --features classifier) reads none" in err, err
    import json

    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["bpd_vlb"]["value"] > 0 and metrics["bpd_ode"]["value"] > 0 and "bpd_vlb" in out
    assert "[bits/dim (discretised decoder)], 2 examples of digits held-out split" in out, out  # which images the bits are of
    code, out, err = run(capsys, "eval", str(run_dir), "--metrics", "fd", "--out", str(report))
    assert code == 2 and "use --features inception" in err
    code, out, err = run(capsys, "eval", str(run_dir), "--metrics", "copies", "--n", "4", "--n-bpd", "7", "--sampler", "ddim", "--steps", "2",
                         "--features", "inception", "--out", str(report))
    copied = json.loads(report.read_text())["metrics"]["copies"]
    assert code == 0 and 0 <= copied["value"] <= 1 and copied["real"] == 0.0, err  # digits' 300 held-out: none passes for a copy
    # and --n-bpd without bits/dim: said too
    assert "note: --n-bpd 7 counts the held-out examples of bits/dim, which this evaluation (copies) does not compute; it draws --n 4" in err
    assert "note: --features inception: the Inception network is read only for fd/kid/is with --features inception; this evaluation " \
           "(copies; --features inception) reads none" in err, err
    assert "--sampler ddim" not in err  # copies are of samples: it drew them
    assert 0 < copied["median_ratio"] <= 1 and 0.6 < copied["real_median_ratio"] <= 1
    assert "copies" in out and "of the 1497 training images of digits" in out and "held-out real images: 0" in out, out
    code, out, err = run(capsys, "eval", str(run_dir), "--metrics", "fid,psnr")
    assert code == 2 and "unknown metric(s) ['psnr']" in err


def test_forward_on_an_image_file(tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    code, out, err = run(capsys, "forward", str(tmp_path / "photo.png"), "--size", "32", "--t", "10,500", "--out", str(tmp_path / "f"))
    assert code == 0, err
    assert (tmp_path / "f" / "forward_strip.png").is_file() and (tmp_path / "f" / "spectrum.png").is_file()
    (tmp_path / "broken.png").write_bytes(b"nope")
    code, out, err = run(capsys, "forward", str(tmp_path / "broken.png"))
    assert code == 2 and "cannot read image" in err and len(err.strip().splitlines()) == 1


def test_demo_trains_and_draws_its_grid_autoguided_by_its_kept_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    code, out, err = run(capsys, "demo", "--n", "2", "--steps", "3", "--run-dir", str(run_dir), "train.steps=6", "train.checkpoint_every=2",
                         "train.keep_steps=[2]", "train.sample_every=0", "train.eval_every=0", "train.warmup_steps=1")
    assert code == 0, err
    assert (run_dir / "demo_samples" / "grid.png").is_file()
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000004", "ckpt-0000006"]  # keep 2 + step 2
    # the grid is guided by the kept early checkpoint: the same digits as `ddpmkit sample` with that autoguidance
    assert f"with ddim_uniform, 3 steps, autoguided by {run_dir / 'ckpt-0000002'} (w = 1.5)" in out and "for 6 steps" in out
    assert "note: no early checkpoint" not in out
    code, _, err = run(capsys, "sample", str(run_dir), "--n", "2", "--sampler", "ddim_uniform", "--steps", "3", "--autoguide",
                       str(run_dir / "ckpt-0000002"), "--autoguide-scale", "1.5", "--no-gif", "--out", str(tmp_path / "same"))
    assert code == 0, err
    same = [np.asarray(Image.open(d / "grid.png")) for d in (run_dir / "demo_samples", tmp_path / "same")]
    assert np.array_equal(*same)
    # --autoguide-scale 1 is unguided: no guide loaded, one evaluation a step, and no hint to turn it off
    from ddpmkit.cli.train import draw_demo

    draw_demo(run_dir, (2,), 2, "ddim_uniform", 3, 1.0)
    out = capsys.readouterr().out
    assert "sampling 2 digits with ddim_uniform, 3 steps\n" in out and "autoguided" not in out and "--autoguide-scale 1" not in out, out
    # the demo starts its own folder over (here with 2 steps: the 6 steps' checkpoints are gone), but not another run's
    # with nothing kept before the last step to guide by (the last step's own is no weaker model), the grid is unguided, and
    # the demo says so (w would be taken and unused); and its own --steps (16) fit a diffusion.T below them: "--steps 16:
    # the demo's model has T = 8 steps" named a flag not given
    code, out, err = run(capsys, "demo", "--n", "2", "--run-dir", str(run_dir), "train.steps=2", "train.checkpoint_every=2",
                         "train.keep_steps=[2]", "train.sample_every=0", "train.eval_every=0", "train.warmup_steps=1", "diffusion.T=8")
    assert code == 0 and "sampling 2 digits with ddim_uniform, 8 steps" in out, err
    assert (f"note: no early checkpoint of {run_dir} before step 2 to guide by (train.keep_steps = [2]): the grid is unguided, "
            "--autoguide-scale 1.5 unused") in out and "autoguided by" not in out
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-0000002"]
    other = tmp_path / "other"
    code, _, err = run(capsys, "train", "toy2d", "train.steps=2", f"train.run_dir={other}", "--quiet")
    assert code == 0, err
    for steps in ([], ["--steps", "1000"]):  # --steps = T (Algorithm 2 over all T, as its help says) passes the demo's check
        code, _, err = run(capsys, "demo", *steps, "--run-dir", str(other), "train.steps=2")
        assert code == 2 and err.strip().splitlines()[-1].startswith(f"ddpmkit demo: error: {other} holds a run the demo did not make "), err
    assert [p.name for p in other.glob("ckpt-*")] == ["ckpt-0000002"] and not (other / ".made-by-the-demo").exists()


def test_user_errors_are_one_line_in_the_faces_words_and_bugs_keep_their_traceback(monkeypatch, capsys):
    """A UserError names library parameters; the CLI shows it as one line with its flags. Any other
    exception, even a ValueError from deep inside torch, is a bug: it propagates with its traceback."""
    from ddpmkit.cli import forward
    from ddpmkit.errors import UserError, render

    err = UserError("`classes` must lie in 0..9, and `unknown` stays as written")
    assert render(err, {"classes": "--class"}) == "--class must lie in 0..9, and `unknown` stays as written"
    assert isinstance(err, ValueError)  # library callers that catch ValueError keep working

    def raising(exc):
        def command(args):
            raise exc
        return command

    monkeypatch.setattr(forward, "cmd_forward", raising(UserError("`classes` must lie in 0..9")))
    code, out, text = run(capsys, "forward", "mnist5k:7")
    assert code == 2 and text.strip() == "ddpmkit forward: error: --class must lie in 0..9"
    monkeypatch.setattr(forward, "cmd_forward", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        run(capsys, "forward", "mnist5k:7")


def test_train_says_where_and_in_what_precision_it_trains(tmp_path, capsys):
    """One line before the progress bar: the device (a GPU user sees it is used), the precision, how the network runs."""
    from ddpmkit.devices import describe_cpu
    from ddpmkit.precision import resolve_precision

    assert main(["train", "toy2d", "train.steps=2", f"train.run_dir={tmp_path / 'a'}"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"train denoiser on {describe_cpu()}; fp32"
    assert main(["train", "toy2d", "train.steps=2", "train.mixed_precision=auto", f"train.run_dir={tmp_path / 'b'}"]) == 0
    picked = {"no": "fp32", "bf16": "bf16"}[resolve_precision("auto")]  # bf16 on a CPU with AVX-512-bf16, else fp32
    assert capsys.readouterr().out.splitlines()[0] == f"train denoiser on {describe_cpu()}; {picked} (auto)"
    assert main(["train", "toy2d", "train.steps=2", f"train.run_dir={tmp_path / 'c'}", "--quiet"]) == 0
    assert "train denoiser on" not in capsys.readouterr().out  # --quiet: no bar, no line
    # a run shorter than its warm-up: the learning rate it reaches (lr * 4 / 8 at the last step), said before the bar
    assert main(["train", "toy2d", "train.steps=4", "train.warmup_steps=8", f"train.run_dir={tmp_path / 'd'}"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == ("note: train.warmup_steps = 8 > train.steps = 4: the learning rate climbs to 50% of "
                                                       "train.lr and no further; give train.warmup_steps=N below 4")
    assert main(["train", "toy2d", "train.steps=4", "train.warmup_steps=4", f"train.run_dir={tmp_path / 'e'}"]) == 0
    assert "warmup" not in capsys.readouterr().out  # its last step trains at train.lr


def test_serve_on_a_busy_port_is_one_clear_line_and_leaves_no_folder(web_runs, capsys):
    """gradio tries only the port it is given: a busy one ends `ddpmkit serve` with one line naming it, and the folder the
    page had made for its requests is gone."""
    pytest.importorskip("gradio")
    import signal
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sigterm = signal.getsignal(signal.SIGTERM)  # `ddpmkit serve` sets its own; this process is pytest's
        try:
            code, out, err = run(capsys, "serve", str(web_runs / "uncond"), "--port", str(port))
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    assert code == 2 and err.strip() == (f"ddpmkit serve: error: cannot serve on 127.0.0.1:{port}: the port is in use or the address is not "
                                         "this machine's; choose another with --port (or --host)"), err
    folder = re.search(r"files under (\S+),", out)
    assert folder and not Path(folder[1]).exists()


def test_training_into_a_folder_that_holds_a_run_is_refused_unless_it_resumes_or_overwrites(tmp_path, capsys):
    """`sample RUN` reads the newest checkpoint: a shorter new run over an older one would be shadowed by the older's,
    and their logs would mix. Refused with one line; --overwrite removes the earlier run's files (only those) first:
    `ddpmkit sample`'s default --out is ./samples, the run's preview folder when the run folder is the working one, and
    --overwrite deleted the samples drawn there with it."""
    from ddpmkit.checkpoint import list_checkpoints
    from ddpmkit.models import load_diffusion

    folder = tmp_path / "run"
    args = ["train", "toy2d", "train.sample_every=0", "train.eval_every=0", f"train.run_dir={folder}"]
    assert main([*args, "train.steps=4", "train.checkpoint_every=2", "train.sample_every=2", "--quiet"]) == 0
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    (folder / "notes.txt").write_text("mine")
    (folder / "samples" / "samples").mkdir()  # what `ddpmkit sample RUN --out RUN/samples` (or `sample .` in it) writes
    for drawn in ("grid.png", "samples/000000.png"):
        (folder / "samples" / drawn).write_bytes(b"drawn")
    code, out, err = run(capsys, *args, "train.steps=3", "--quiet")
    assert code == 2 and err.strip() == (f"ddpmkit train: error: {folder} already holds a run (newest checkpoint ckpt-0000004): continue it "
                                         "with --resume, start it over with --overwrite, or give another train.run_dir")
    assert [p.name for p in list_checkpoints(folder)] == ["ckpt-0000002", "ckpt-0000004"]  # untouched
    assert main([*args, "train.steps=3", "--quiet", "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(folder)] == ["ckpt-0000003"] and load_diffusion(folder).step == 3
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in log) == 3 and sum("done" in e for e in log) == 1  # the new run's lines alone
    assert (folder / "notes.txt").read_text() == "mine"  # what the run did not write stays
    assert sorted(str(p.relative_to(folder)) for p in (folder / "samples").rglob("*.png")) == ["samples/grid.png", "samples/samples/000000.png"]
    assert main([*args, "train.steps=5", "--quiet", "--resume"]) == 0 and load_diffusion(folder).step == 5


def test_weights_that_do_not_fit_their_config_are_one_line_that_counts_what_differs(web_runs, tmp_path, capsys):
    """ema.safetensors of another run (or edited by hand): before, torch's error listed every one of hundreds of names."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ddpmkit.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    shutil.copytree(web_runs / "uncond", run_dir)
    ckpt = list_checkpoints(run_dir)[-1]
    other = list_checkpoints(web_runs / "class")[-1]
    shutil.copy(other / "ema.safetensors", ckpt / "ema.safetensors")  # the class-conditional run's weights
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--steps", "2", "--sampler", "ddim", "--out", str(tmp_path / "s"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 600, err
    assert f"the weights in {ckpt} do not fit the network its config.json describes: " in err and "unexpected (e.g. " in err
    state = load_file(list_checkpoints(web_runs / "uncond")[-1] / "ema.safetensors")
    name = sorted(k for k in state if k.endswith("out_conv.bias"))[0]
    save_file({**state, name: state[name][:0]}, ckpt / "ema.safetensors")  # one tensor cut short
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "2", "--steps", "2", "--sampler", "ddim", "--out", str(tmp_path / "s"))
    assert code == 2 and err.strip().endswith(f"1 tensors of another shape (e.g. {name}: saved (0,), network {tuple(state[name].shape)})"), err


def test_a_network_or_batch_the_device_has_no_memory_for_is_one_line_before_any_checkpoint(tmp_path, capsys):
    """A real allocation failure: an MLP 10^10 wide asks the CPU allocator for a 2,384 GiB weight (its first layer), which it refuses at
    once under Linux's default overcommit (never touched), and the command ends in one line naming the size and what to make smaller, not torch's
    traceback; nothing is written but the run's config."""
    code, out, err = in_a_thread(lambda: run(capsys, "train", "toy2d", "network.mlp_hidden=10000000000", f"train.run_dir={tmp_path / 'r'}",
                                             "train.steps=1", "--quiet"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert re.fullmatch(r"ddpmkit train: error: the device had no memory for a tensor of [0-9.]+ GiB; give train\.batch_size=N "
                        r"\(a smaller batch\), or a smaller network", lines[0]), lines[0]
    assert not list((tmp_path / "r").glob("ckpt-*"))


def test_an_out_path_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, web_runs):
    """`sample --out FILE` sampled, then ended in a FileExistsError traceback (the samples lost); a run folder where a
    file is ended likewise. Now --out is checked before any model loads, and a path the machine refuses is one line."""
    (tmp_path / "afile").touch()
    (tmp_path / "adir").mkdir()
    run_dir = str(web_runs / "uncond")
    for argv, message in (
            (["sample", run_dir, "--out", str(tmp_path / "afile")], f"--out {tmp_path / 'afile'} is a file; give a folder path"),
            (["forward", "mnist5k:0", "--out", str(tmp_path / "afile" / "sub")], f"cannot write under {tmp_path / 'afile'} (a file)"),
            (["tune-grid", run_dir, "--out", str(tmp_path / "adir")], "is a folder; give a file path (e.g. grid.json)"),
            (["eval", run_dir, "--out", str(tmp_path / "adir")], "is a folder; give a file path (e.g. eval_report.json)"),
            (["train", "toy2d", f"train.run_dir={tmp_path / 'afile'}", "--quiet"], f"{tmp_path / 'afile'}: a file is in the way of a folder")):
        code, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert set(tmp_path.iterdir()) == {tmp_path / "adir", tmp_path / "afile"} and not any((tmp_path / "adir").iterdir())  # nothing made


def test_a_weights_file_given_for_a_model_says_which_folder_to_give(tmp_path, capsys, web_runs):
    """A file was "no checkpoint at FILE" though it exists: a file inside a checkpoint names its folder, and a single
    weights file (AUTOMATIC1111's Stable Diffusion .safetensors) says how it becomes a folder."""
    ckpt = next((web_runs / "uncond").glob("ckpt-*"))
    code, out, err = run(capsys, "sample", str(ckpt / "ema.safetensors"), "--n", "1")
    want = f"ddpmkit sample: error: {ckpt / 'ema.safetensors'} is a file of the checkpoint {ckpt}: give that folder (or its run folder)"
    assert code == 2 and err.strip() == want
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    code, out, err = run(capsys, "sample", str(tmp_path / "model.safetensors"), "--n", "1")
    assert code == 2 and "is a single weights file; ddpmkit loads run folders and diffusers pipeline folders" in err
    assert "from_single_file" in err and len(err.strip().splitlines()) == 1


def test_an_out_path_among_a_runs_own_files_is_refused_and_the_run_kept(web_runs, tmp_path, capsys):
    """`eval RUN --out RUN/config.json` replaced the run's config with the report (the run no longer loaded), and
    `tune-grid --out RUN/ckpt-.../config.json` a checkpoint's; any --out inside a checkpoint is refused before work."""
    import shutil

    from ddpmkit.checkpoint import list_checkpoints

    folder = tmp_path / "run"
    shutil.copytree(web_runs / "uncond", folder)
    ckpt = list_checkpoints(folder)[-1]
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for argv, why in ((["eval", str(folder), "--metrics", "bpd_vlb", "--n-bpd", "2", "--out", str(folder / "config.json")],
                       f"is the config of the run {folder}: give the file another name"),
                      (["tune-grid", str(folder), "--steps", "3", "--out", str(ckpt / "config.json")],
                       f"is inside the checkpoint {ckpt}, whose files are the run's: give a path outside it"),
                      (["sample", str(folder), "--n", "2", "--steps", "2", "--out", str(ckpt / "s")], f"is inside the checkpoint {ckpt}")):
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.startswith(f"ddpmkit {argv[0]}: error: --out {argv[-1]} {why}"), err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    code, out, err = run(capsys, "sample", str(folder), "--n", "2", "--steps", "2", "--no-gif", "--out", str(folder / "mine"))
    assert code == 0, err  # beside the run's files is fine


def test_the_command_line_shows_a_note_as_one_line_and_passes_any_other_warning_on(capsys):
    """notes_as_lines: ddpmkit's Notes become one "note: ..." line with the flags' names; any other warning goes to the
    showwarning it wraps with its own file and line."""

    from ddpmkit.cli import notes_as_lines
    from ddpmkit.errors import Note

    shown = []
    show = notes_as_lines(lambda *args: shown.append(args))
    show(Note("a note"), Note, "f.py", 3)
    show(UserWarning("other"), UserWarning, "g.py", 7)
    assert capsys.readouterr().err == "note: a note\n"
    (message, category, filename, lineno, file, line), = shown
    assert (str(message), category, filename, lineno, file, line) == ("other", UserWarning, "g.py", 7, None, None)
