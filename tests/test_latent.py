"""Latent diffusion: the KL autoencoder (its loss terms, latent scale, clear errors) and diffusion
trained and sampled in its latent space from the command line."""
import math
import tempfile
from pathlib import Path

import pytest
import torch

from ddpmkit.cli import main
from ddpmkit.config import PRESET_DIR, AutoencoderConfig, load_config
from ddpmkit.data import load_dataset
from ddpmkit.evaluate.metrics import psnr
from ddpmkit.models import load_autoencoder, load_diffusion
from ddpmkit.nets.autoencoder import Autoencoder
from ddpmkit.nets.layers import ResBlock
from ddpmkit.train.autoencoder import AutoencoderTask
from ddpmkit.train.batches import step_batch


def test_autoencoder_kl_is_the_closed_form_of_the_gaussian_posterior():
    torch.manual_seed(0)
    ae = Autoencoder((1, 8, 8), AutoencoderConfig(z_channels=2, base_channels=8, channel_mult=(1, 2), pad_to=8))
    for p in ae.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    _, kl = ae(x)
    mean, log_var = ae.encode(x)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl, reference, rtol=1e-5)
    assert ae.latent_shape == (2, 4, 4) and ae.decode(mean).shape == x.shape


def test_the_autoencoder_loss_is_the_squared_error_of_a_reparameterised_sample_plus_the_weighted_kl():
    """Per example: |decode(mean + sigma eps) - x|^2 + kl_weight KL(q(z | x) || N(0, I)), eps the step's first draw."""
    cfg = load_config("mnist_autoencoder", ["data.name=digits", "autoencoder.pad_to=8", "autoencoder.channel_mult=1,2",
                                            "autoencoder.base_channels=8", "autoencoder.kl_weight=0.3"])
    task = AutoencoderTask(cfg)
    ae = Autoencoder(task.shape, cfg.autoencoder)
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    loss = task.loss(ae, step_batch(0, 2, 8, task.num_examples, torch.device("cpu")))
    batch = step_batch(0, 2, 8, task.num_examples, torch.device("cpu"))
    eps = torch.randn((8, *task.latent_shape), generator=batch.generator)
    x = task.data.get_batch(batch.indices)
    mean, log_var = ae.encode(x)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    expected = ((ae.decode(mean + q.stddev * eps) - x) ** 2).flatten(1).sum(1) + 0.3 * kl
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert loss.shape == (8,) and kl.min() > 0
    # latent diffusion's decoder: LDM's num_res_blocks + 1 blocks a level going up (the encoder has num_res_blocks)
    blocks = [sum(isinstance(m, ResBlock) for m in part.modules()) for part in (ae.encoder, ae.decoder)]
    assert blocks == [2 + 2 * cfg.autoencoder.num_res_blocks, 2 + 2 * (cfg.autoencoder.num_res_blocks + 1)]
    # the preview's and the held-out PSNR's reconstructions: the posterior mean decoded and clipped to [-1, 1] (this
    # network, its output layer scaled, reaches past both ends)
    x = task.held_out
    with torch.no_grad():
        ae.decoder.net[-1].weight.mul_(10)  # the output layer's reach past [-1, 1]
        unclipped = ae.decode(ae.encode(x)[0])
        shown = task.preview(ae, Path(tempfile.mkdtemp()) / "preview.png")
    assert unclipped.max() > 1 and unclipped.min() < -1
    assert torch.equal(shown, torch.cat([x[:8], unclipped[:8].clamp(-1, 1)]))
    assert task.evaluate(ae)["psnr_db"] == pytest.approx(psnr(unclipped.clamp(-1, 1), x).mean().item(), rel=1e-6)


def test_the_encoders_log_variance_is_clamped_to_minus_30_and_20():
    """latent-diffusion's DiagonalGaussianDistribution clamps log sigma^2 to [-30, 20]: exp stays finite in fp32."""
    ae = Autoencoder((1, 8, 8), AutoencoderConfig(base_channels=8, channel_mult=(1,), z_channels=2, num_res_blocks=1))
    last = ae.encoder.net[-1]
    x = torch.zeros(1, 1, 8, 8)
    for bias, end in ((1e4, 20.0), (-1e4, -30.0)):
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(bias)
        mean, log_var = ae.encoder(x)
        assert torch.equal(mean, torch.full_like(mean, bias)) and torch.equal(log_var, torch.full_like(log_var, end))


def test_padding_and_psnr():
    ae = Autoencoder((1, 28, 28), AutoencoderConfig(channel_mult=(1, 2, 2), pad_to=32, base_channels=8))
    assert ae.latent_shape == (3, 8, 8) and ae.decode(torch.zeros(2, 3, 8, 8)).shape == (2, 1, 28, 28)
    x = torch.zeros(1, 1, 4, 4)
    assert torch.allclose(psnr(x + 0.02, x), torch.tensor([10 * math.log10(4 / 0.0004)]))
    with pytest.raises(ValueError, match="divisible by 4"):
        Autoencoder((1, 28, 28), AutoencoderConfig(channel_mult=(1, 2, 2), pad_to=30))


def test_autoencoder_then_latent_diffusion_from_the_command_line(tmp_path, capsys):
    ae_run, ldm_run = tmp_path / "ae", tmp_path / "ldm"
    code = main(["train-autoencoder", str(PRESET_DIR / "mnist_autoencoder.toml"), "data.name=digits", "autoencoder.pad_to=8",
                 "autoencoder.channel_mult=1,2", "autoencoder.base_channels=8", "train.steps=20", "train.batch_size=32",
                 "train.warmup_steps=5", "train.sample_every=20", "train.eval_every=20", f"train.run_dir={ae_run}", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "PSNR" in capsys.readouterr().out
    ae = load_autoencoder(ae_run)
    assert ae.metrics["latent_elements"] == 3 * 4 * 4 and ae.metrics["image_elements"] == 64
    held_out = load_dataset("digits", split="test").x[:500]
    recon = ae.network.from_latent(ae.network.to_latent(held_out))
    assert ae.metrics["mse"] == pytest.approx(((recon - held_out) ** 2).mean().item(), rel=1e-4)
    assert ae.metrics["psnr_db"] == pytest.approx(psnr(recon, held_out).mean().item(), rel=1e-4)
    train_latents = ae.network.to_latent(load_dataset("digits").x)
    assert abs(train_latents.std().item() - 1.0) < 1e-3  # the stored scale factor gives unit variance
    # during training: the preview is 8 held-out digits over their reconstructions (the posterior mean decoded, clipped to
    # [-1, 1]), and the logged PSNR is of the held-out set's
    import json

    import numpy as np
    from PIL import Image

    from ddpmkit.viz import make_grid

    with torch.no_grad():
        clipped = ae.network.decode(ae.network.encode(held_out)[0]).clamp(-1, 1)
    with Image.open(ae_run / "samples" / "step-0000020.png") as im:
        assert np.array_equal(np.asarray(im), make_grid(torch.cat([held_out[:8], clipped[:8]]), nrow=8, upscale=2)[..., 0])
    logged = [json.loads(line) for line in (ae_run / "train_log.jsonl").read_text().splitlines()]
    evaluated = [r["psnr_db"] for r in logged if "psnr_db" in r and not r.get("done")]  # the last line is the finished run's
    assert evaluated == [pytest.approx(psnr(clipped, held_out).mean().item(), rel=1e-5)]

    code = main(["train", str(PRESET_DIR / "mnist_latent.toml"), "data.name=digits", f"data.autoencoder={ae_run}",
                 "network.base_channels=8", "network.attention_resolutions=2", "train.steps=4", "train.batch_size=16",
                 "train.sample_every=0", f"train.run_dir={ldm_run}", "--quiet"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "samples"
    code = main(["sample", str(ldm_run), "--n", "3", "--sampler", "dpmpp_2m_sde", "--steps", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    x = torch.load(out / "samples.pt")
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1  # decoded images, not latents
    assert (out / "reverse_process.gif").is_file()
    # `ddpmkit eval` with its default metrics: those that apply (bits/dim refused a latent model, and the classifier
    # features a dataset other than mnist5k, so the default failed on this run twice over)
    from ddpmkit.errors import Note
    from ddpmkit.evaluate.report import applicable_metrics

    m = load_diffusion(ldm_run)
    assert applicable_metrics(m, "mnist5k") == applicable_metrics(m, "digits", "inception") == ["fd", "kid", "is", "copies"]
    with pytest.warns(Note, match=r"no fd, kid or is: the classifier features exist for mnist5k only, not 'digits'"):
        assert applicable_metrics(m, "digits") == ["copies"]
    assert main(["eval", str(ldm_run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "r.json")]) == 0
    assert "copies" in capsys.readouterr().out
    code = main(["train", str(PRESET_DIR / "mnist_latent.toml"), "data.name=digits", f"data.autoencoder={tmp_path / 'none'}",
                 f"train.run_dir={tmp_path / 'x'}", "--quiet"])
    assert code == 2 and f"data.autoencoder = {tmp_path / 'none'}: no checkpoint at" in capsys.readouterr().err
