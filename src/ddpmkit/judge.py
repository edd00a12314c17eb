"""Judge generated digits with a classifier trained on real digits and tested on held-out ones.

A sample counts as a recognisable digit when the classifier gives some class probability >= 0.9.
Mode coverage is the share of samples given to each class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import load_dataset
from .nets.classifier import DigitClassifier, random_shift


@dataclass
class Judgement:
    confident_fraction: float  # share of samples with max class probability >= threshold
    class_shares: list[float]  # share of samples assigned to each class
    mean_confidence: float
    n: int

    def table(self) -> str:
        shares = " ".join(f"{d}:{s:.1%}" for d, s in enumerate(self.class_shares))
        return (f"samples judged: {self.n}\nconfident (p >= 0.9): {self.confident_fraction:.1%}\n"
                f"mean confidence: {self.mean_confidence:.3f}\nclass shares: {shares}")


def train_classifier(dataset: str = "mnist5k", epochs: int = 15, seed: int = 0, batch_size: int = 64, progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train the judge on the dataset's train split; returns (model, accuracy on the test split)."""
    from tqdm.auto import tqdm

    train, test = load_dataset(dataset, split="train"), load_dataset(dataset, split="test")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(train.shape[0])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(epochs), desc="judge", disable=not progress, leave=False):
        perm = torch.randperm(len(train), generator=g)
        for b in range(len(train) // batch_size):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = random_shift(train.x[idx], 2, g)
            loss = F.cross_entropy(model(x), train.labels[idx])  # no label smoothing: it caps confidence below 0.9-ish
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, accuracy(model, test.x, test.labels)


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(500)])
    return (pred == labels).float().mean().item()


def load_or_train_classifier(path: str | Path = "runs/judge/mnist5k.safetensors", dataset: str = "mnist5k") -> tuple[DigitClassifier, float]:
    """The judge, cached at `path` (trained on first use, ~1 minute on 2 cores)."""
    path = Path(path)
    test = load_dataset(dataset, split="test")
    if path.is_file():
        model = DigitClassifier(test.shape[0])
        model.load_state_dict(load_file(path))
        model.eval()
        return model, accuracy(model, test.x, test.labels)
    model, acc = train_classifier(dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(model.state_dict(), tmp)
    tmp.replace(path)
    return model, acc


@torch.no_grad()
def judge(model: DigitClassifier, x: torch.Tensor, threshold: float = 0.9, num_classes: int = 10) -> Judgement:
    """Classify samples x: (B, 1, H, W) in [-1, 1]."""
    model.eval()
    probs = torch.cat([model(chunk.clamp(-1, 1)).softmax(1) for chunk in x.split(500)])
    conf, cls = probs.max(1)
    shares = torch.bincount(cls, minlength=num_classes).float() / len(cls)
    return Judgement((conf >= threshold).float().mean().item(), shares.tolist(), conf.mean().item(), len(cls))
