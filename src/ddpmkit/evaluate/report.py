"""`ddpmkit eval`: likelihoods on held-out data and sample-quality metrics for a checkpoint, as a
printed table and a JSON report."""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from ..config import DataConfig
from ..data import SPLIT, Dataset, dataset_for
from ..errors import Note, UserError
from ..models import DiffusersModel, DiffusionModel, load_diffusion
from ..pipelines.generate import generate
from ..pipelines.guided import GuidanceRequest
from .cached_judge import load_judge
from .copies import COPY_RATIO, copies
from .inception import find_weights, inception_features, load_fid_inception
from .likelihood import LN2, dequantize, dequantized_bits_per_dim, ode_nll, vlb
from .metrics import FeatureStats, frechet_distance, inception_score, kernel_inception_distance

METRICS = ("bpd", "bpd_vlb", "bpd_ode", "fd", "kid", "is", "copies")


def parse_metrics(spec: str | None) -> list[str] | None:
    """The metrics a comma-separated list names (bpd: both likelihoods); None: every metric that applies."""
    if spec is None:
        return None
    names = [m.strip() for m in spec.split(",") if m.strip()]
    names = [{"fid": "fd"}.get(m, m) for m in names]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UserError(f"unknown metric(s) {bad}; choose from {list(METRICS)} (fid is an alias of fd)")
    if "bpd" in names:  # both likelihoods
        names = [m for m in names if m != "bpd"] + ["bpd_vlb", "bpd_ode"]
    return list(dict.fromkeys(names))


class FeatureNet:
    """Features and class probabilities of images: 'classifier' (the project's digit classifier,
    trained on mnist5k's training split -- numbers NOT comparable with papers' FIDs) or
    'inception' (the standard FID Inception, comparable)."""

    def __init__(self, kind: str, dataset: str, inception_path: str | None = None,
                 prepare_judge: Callable[[str], object] | None = None):
        self.kind = kind
        if kind == "classifier":
            if dataset != "mnist5k":
                raise UserError(f"classifier features exist for mnist5k only, not {dataset!r}; use `features` inception")
            if prepare_judge is not None:
                prepare_judge(dataset)  # the face's way to provide a judge (ddpmkit eval trains one on first use)
            self.net, _ = load_judge(dataset)
        elif kind == "inception":
            self.net = load_fid_inception(inception_path)
        else:
            raise UserError(f"unknown features {kind!r}; choose 'classifier' or 'inception'")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "inception":
            return inception_features(self.net, x)
        feats, probs = [], []
        for chunk in x.clamp(-1, 1).split(500):
            f = self.net.features(chunk)
            feats.append(f)
            probs.append(self.net.head(f).softmax(1))
        return torch.cat(feats), torch.cat(probs)


class DigitScorer:
    """The judge's verdict on generated digits: the share judged with confidence >= 0.9, accuracy
    against requested labels, and the judge-FD (Frechet distance in the judge's feature space to
    mnist5k's 500 held-out digits; not comparable with papers' FIDs)."""

    def __init__(self, dataset: str = "mnist5k"):
        self.features = FeatureNet("classifier", dataset)
        self.real = FeatureStats.of(self.features(dataset_for(DataConfig(name=dataset), split="test").x)[0])

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        f, probs = self.features(x)
        fake = FeatureStats.of(f)
        conf, pred = probs.max(1)
        out = {"fd": frechet_distance(fake.mu, fake.sigma, self.real.mu, self.real.sigma),
               "confident": (conf >= 0.9).float().mean().item()}
        if labels is not None:
            out["accuracy"] = (pred == labels).float().mean().item()
        return out


def applicable_metrics(m, dataset: str = "mnist5k", features: str = "classifier") -> list[str]:
    """Every metric the model's samples have: bits/dim where x_0 is the data (not latents); for images the share of
    copies, and FD/KID/IS where `features` exist for the dataset (the classifier's for mnist5k only; a Note says so)."""
    images, latent = len(m.data_shape) == 3, m.autoencoder is not None or isinstance(m, DiffusersModel)
    quality = images and (features == "inception" or dataset == "mnist5k")
    if images and not quality:
        warnings.warn(f"no fd, kid or is: the classifier features exist for mnist5k only, not {dataset!r} (`features` inception "
                      "gives them)", Note, stacklevel=2)
    return ([] if latent else ["bpd_vlb", "bpd_ode"]) + (["fd", "kid", "is"] if quality else []) + (["copies"] if images else [])


def check_feature_weights(metrics: list[str] | None, features: str, inception_path: str | None) -> None:
    """A missing Inception file is one line at once, not after the model loads and bits/dim run."""
    if metrics is not None and features == "inception" and {"fd", "kid", "is"} & set(metrics):
        find_weights(inception_path)


def evaluate_checkpoint(checkpoint: str | DiffusionModel, metrics: list[str] | None, sampler: str | None = None, steps: int | None = None,
                        n: int | None = None, n_bpd: int | None = None, seed: int = 0, features: str = "classifier",
                        sampler_options: dict | None = None, batch_size: int | None = None, inception_path: str | None = None,
                        out: str | Path | None = None, request=None, reference: str | None = None,
                        prepare_judge: Callable[[str], object] | None = None, device: str | torch.device | None = None) -> dict:
    """request: a pipeline.GuidanceRequest for conditional models (classes, prompts, guidance) used
    for the samples; bits/dim of a conditional model is that of its unconditional branch.
    reference: a folder of real images to compare with (default: the held-out split of the run's
    data; a diffusers pipeline folder has no data of its own, so it needs one).
    prepare_judge(dataset): called before the cached judge is read (classifier features), e.g. to train it.
    metrics None: every metric that applies (applicable_metrics: a 2-D toy has no FD, a latent model no bits/dim).
    checkpoint: a path, or a model already loaded (then `device` is its own); sampler None: the run's own (a distilled
    run's few-step sampler), else Algorithm 2. n: samples for fd/kid/is/copies (None: 1,000); n_bpd: examples for bits/dim (None: 100)."""
    check_feature_weights(metrics, features, inception_path)
    m = checkpoint if isinstance(checkpoint, DiffusionModel) else load_diffusion(checkpoint, device=device)  # None: the default device
    sampling_given = [f"`{name}` {value}" for name, value in (("sampler", sampler), ("steps", steps)) if value is not None]
    sampler, steps = m.sampler_or_own(sampler, steps)
    if not isinstance(m, DiffusersModel) and m.model_kind.inputs:  # its samples need more than noise (it failed deep inside)
        raise UserError(f"{m.path} is a {m.kind} run (its network takes {m.model_kind.takes}): eval measures denoisers of images or points; "
                        + m.model_kind.next_step.format(run=m.path.parent))
    data = m.config.data
    if reference:
        C, H = m.image_shape[0], m.image_shape[-1]
        data = DataConfig(name="folder", path=str(reference), image_size=H, channels=C)
    elif isinstance(m, DiffusersModel):
        raise UserError(f"{m.path} is a diffusers pipeline: give `reference`, a folder of real images to compare its samples with")
    metrics = applicable_metrics(m, data.name, features) if metrics is None else metrics
    sampled = [q for q in ("fd", "kid", "is", "copies") if q in metrics]
    quality = [q for q in sampled if q != "copies"]
    likelihoods = [q for q in metrics if q.startswith("bpd")]
    n_given, n_bpd_given = n, n_bpd
    n, n_bpd = 1000 if n is None else n, 100 if n_bpd is None else n_bpd
    # a count for metrics this evaluation does not compute would go unused unsaid (a 2-D toy: bits/dim only)
    if n_given is not None and not sampled:
        warnings.warn(f"`n` {n} counts the samples of fd/kid/is/copies, which this evaluation ({', '.join(metrics)}) does not draw; "
                      f"bits/dim are of `n_bpd` {n_bpd} examples", Note, stacklevel=2)
    if sampling_given and not sampled:
        warnings.warn(f"{' and '.join(sampling_given)} {'choose' if len(sampling_given) > 1 else 'chooses'} how fd/kid/is/copies draw their "
                      f"samples; this evaluation ({', '.join(metrics)}) draws none", Note, stacklevel=2)
    inception = features == "inception" and bool(quality)  # the only evaluation that reads the Inception network
    unread = [what for what, given in (("`features` inception", features == "inception" and not quality),
                                       (f"`inception` {inception_path}", inception_path is not None and not inception)) if given]
    if unread:
        warnings.warn(f"{' and '.join(unread)}: the Inception network is read only for fd/kid/is with `features` inception; this evaluation "
                      f"({', '.join(metrics)}; `features` {features}) reads none", Note, stacklevel=2)
    if n_bpd_given is not None and not likelihoods:
        warnings.warn(f"`n_bpd` {n_bpd} counts the held-out examples of bits/dim, which this evaluation ({', '.join(metrics)}) does not "
                      f"compute; it draws `n` {n} samples", Note, stacklevel=2)
    images = len(m.data_shape) == 3
    if sampled and not images:
        raise UserError(f"{'/'.join(sampled)} {'are' if len(sampled) > 1 else 'is'} defined for images; these samples are "
                        f"{m.data_shape[0]}-D points (`metrics` bpd: bits/dim)")
    feature_net = FeatureNet(features, data.name, inception_path, prepare_judge) if quality else None  # its errors before bits/dim
    report: dict = {"checkpoint": str(m.path), "step": m.step, "metrics": {}}
    # folders, npz files and toys have no held-out split: their "test" data is the training data
    held_out = dataset_for(data, split="test")
    x_test = held_out.get_batch(torch.arange(min(n_bpd, len(held_out)))).to(m.device)  # any Dataset: arrays or image folders
    source = reference or (f"{data.name} held-out split" if data.name in SPLIT else f"{data.name}, its training data (no held-out split)")
    g = torch.Generator().manual_seed(seed)
    null = m.null_condition(len(x_test), m.device)
    if m.autoencoder is not None and any(k.startswith("bpd") for k in metrics):
        raise UserError("bits/dim of a latent diffusion model would be of its latents, not the images; use `metrics` fd,kid,is")
    if "bpd_vlb" in metrics:
        t0 = time.time()
        res = vlb(m.denoiser, x_test, clip_x0=images,
                  decoder="discretized" if images else "gaussian", generator=g, progress=True, model_kwargs=null)
        per_t = res.terms.mean(0)
        report["metrics"]["bpd_vlb"] = {
            "value": res.bits_per_dim.mean().item(), "n": len(x_test), "seconds": time.time() - t0,
            "L_T": res.prior.mean().item() / LN2, "L_0": per_t[0].item() / LN2,
            "largest_terms": [(int(t), per_t[t].item() / LN2) for t in per_t.argsort(descending=True)[:5]],
            "unit": "bits/dim (discretised decoder)" if images else "bits/dim (continuous)", "data": f"{len(x_test)} examples of {source}"}
    if "bpd_ode" in metrics:
        t0 = time.time()
        x = dequantize(x_test, g) if images else x_test
        res = ode_nll(m.denoiser, x, generator=g, model_kwargs=null)
        value = dequantized_bits_per_dim(res.nll) if images else res.bits_per_dim
        report["metrics"]["bpd_ode"] = {"value": value.mean().item(), "n": len(x_test), "nfe": res.nfe,
                                        "seconds": time.time() - t0,
                                        "unit": "bits/dim (uniform dequantisation, Hutchinson)" if images else "bits/dim",
                                        "data": f"{len(x_test)} examples of {source}"}
    if sampled:
        t0 = time.time()
        gen = generate(m, n, request or GuidanceRequest(), sampler, steps, seed, sampler_options, batch_size)
        report["sampling"] = {"sampler": sampler, "nfe": gen.nfe, "n": n, "seconds": time.time() - t0, "features": features,
                              "reference": f"{source} ({len(held_out)} images)"}
        if feature_net is not None:
            report["metrics"].update(feature_metrics(feature_net, gen.images, held_out, quality, features))
        if "copies" in sampled:
            report["metrics"]["copies"] = copy_metric(gen.images, dataset_for(data, split="train"),
                                                      held_out if data.name in SPLIT else None,
                                                      f"images of {reference}" if reference else f"training images of {data.name}")
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2))
    return report


def feature_metrics(feature_net: FeatureNet, x: torch.Tensor, held_out: Dataset, quality: list[str], features: str) -> dict:
    """FD, KID and IS of images x (those of `quality`) in feature_net's features, against the held-out images."""
    fake_f, fake_p = feature_net(x)  # latent diffusion: decoded images
    real_f, _ = feature_net(held_out.get_batch(torch.arange(len(held_out))))
    label = "" if features == "inception" else " (classifier features; not comparable with papers)"
    out: dict = {}
    if "fd" in quality:
        a, b = FeatureStats.of(fake_f), FeatureStats.of(real_f)
        out["fd"] = {"value": frechet_distance(a.mu, a.sigma, b.mu, b.sigma), "unit": "FID" + label}
    if "kid" in quality:
        mean, std = kernel_inception_distance(fake_f, real_f, subset_size=min(1000, len(x), len(held_out)))
        out["kid"] = {"value": mean, "std": std, "unit": "KID" + label}
    if "is" in quality:
        mean, std = inception_score(fake_p)
        out["is"] = {"value": mean, "std": std, "unit": "IS" + label}
    return out


def copy_metric(x: torch.Tensor, train: Dataset, held_out: Dataset | None, what: str) -> dict:
    """The share of images x that copy a training image (copies.py), with the share of held-out real images that pass
    for copies by the same test where the data has a held-out split: the level of a model that copies nothing."""
    c = copies(x, train)  # read a chunk at a time: a folder's images are not all held at once
    out = {"value": c.fraction, "median_ratio": c.ratio.median().item(),  # the ratio's drift toward 0 before copies show
           "unit": f"share of samples that copy one of the {len(train)} {what} "
                   f"(nearest / second-nearest distance < {COPY_RATIO:.3g})"}
    if held_out is not None:
        real = copies(held_out.get_batch(torch.arange(len(held_out))), train)
        out["real"], out["real_median_ratio"] = real.fraction, real.ratio.median().item()
    return out


def format_report(report: dict) -> str:
    lines = [f"checkpoint {report['checkpoint']} (step {report['step']})"]
    if "sampling" in report:
        s = report["sampling"]
        lines.append(f"samples: {s['n']} with {s['sampler']} at {s['nfe']} NFE in {s['seconds']:.0f}s; reference: {s['reference']}")
    width = max(len(k) for k in report["metrics"]) if report["metrics"] else 0
    for name, m in report["metrics"].items():
        extra = f" +- {m['std']:.4g}" if "std" in m else ""
        extra += f" (held-out real images: {m['real']:.4g})" if "real" in m else ""
        lines.append(f"  {name:<{width}}  {m['value']:.4g}{extra}  [{m['unit']}]" + (f", {m['data']}" if "data" in m else ""))
    return "\n".join(lines)
