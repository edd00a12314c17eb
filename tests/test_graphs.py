"""CUDA-graph replay of a network's sampling and training calls (graphs.py): what holds without a GPU, the capture
itself stood in for where a test needs one. tests/test_cuda.py checks on a GPU that captured calls give the eager
samples and the eager training."""
import json

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ddpmkit.errors import UserError
from ddpmkit.graphs import Captured, CudaGraphed, TrainingGraphs, capture_training, signature
from ddpmkit.models import compile_for_sampling


def test_cuda_graph_on_a_cpu_is_one_clear_error():
    with pytest.raises(UserError, match=r"--compile cuda-graph needs a CUDA GPU; the network is on cpu .*'reduce-overhead'"):
        compile_for_sampling(nn.Linear(2, 2), "cuda-graph")


def test_a_graph_is_specific_to_shapes_dtypes_values_and_autocast():
    x, t = torch.zeros(4, 3), torch.zeros(4)
    same = signature((x, t), {"y": None})
    assert signature((torch.ones(4, 3), t), {"y": None}) == same  # the values of tensors do not matter: they are copied in
    assert signature((torch.zeros(5, 3), torch.zeros(5)), {"y": None}) != same
    assert signature((x.double(), t), {"y": None}) != same
    assert signature((x, t), {"y": 3}) != same
    assert signature((x, t), {"y": None, "scale": [1, 2]}) != same


def test_calls_a_gpu_cannot_capture_run_as_they_are():
    """On the CPU, or when gradients are needed (posterior sampling), the network runs eagerly: the same numbers."""
    net = nn.Linear(3, 2)
    graphed = CudaGraphed(net)
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(graphed(x), net(x)) and torch.equal(graphed(x), net(x)) and torch.equal(graphed(x), net(x))
    assert graphed.graphs == {}
    out = graphed(x.requires_grad_())
    out.sum().backward()
    assert x.grad is not None


class Recomputed(Captured):
    """Captured on the CPU: recording runs the network on the captured inputs, and a replay runs it again into the
    recorded outputs, as a graph's replay writes into its own; the CUDA parts alone are stood in for."""
    made: list = []

    def record(self, net):
        self.net = net
        Recomputed.made.append(self)
        return net(*self.inputs[0], **self.inputs[1])

    def replay(self):
        fresh = tree_flatten(self.net(*self.inputs[0], **self.inputs[1]))[0]
        for out, new in zip(tree_flatten(self.outputs)[0], fresh):
            out.copy_(new)


def test_sampling_calls_are_captured_after_the_warmup_per_signature_and_replayed_with_each_calls_tensors():
    """The dispatch and the replay's inputs and outputs on the CPU (tests/test_cuda.py: the graphs on a GPU): a
    signature runs eagerly `warmup` times, is captured at the next call, and each replay sees that call's tensors,
    positional and keyword, and returns its own copy of the outputs (the next replay overwrites the graph's)."""
    torch.manual_seed(0)
    net, Recomputed.made = Net(), []
    graphed = CudaGraphed(net, capture=Recomputed, device_type="cpu")
    calls = [(torch.randn(4, 3), torch.rand(4), torch.randint(0, 4, (4,))) for _ in range(6)]
    outs = []
    with torch.no_grad():
        for k, (x, t, y) in enumerate(calls):
            outs.append(graphed(x, t, y=y, scale=2.0))
            assert len(Recomputed.made) == (k >= 2), k  # two eager calls, then one capture for the rest
        assert all(torch.equal(out, net(x, t, y=y, scale=2.0)) for out, (x, t, y) in zip(outs, calls))  # nothing overwritten
        assert [len(c.static) for c in Recomputed.made] == [3] and list(graphed.calls.values()) == [3]
        graphed(calls[0][0], calls[0][1], y=calls[0][2], scale=3.0)  # another value of a non-tensor argument: its own warm-up
        assert len(Recomputed.made) == 1 and len(graphed.calls) == 2

    class Failing(Recomputed):
        def record(self, net):
            raise RuntimeError("operation not permitted when stream is capturing")

    failing = CudaGraphed(net, capture=Failing, device_type="cpu")
    x, t, y = calls[0]
    with torch.no_grad(), pytest.warns(UserWarning, match="could not capture the network as a CUDA graph, running it eagerly"):
        assert all(torch.equal(failing(x, t, y=y), net(x, t, y=y)) for _ in range(5))
    assert list(failing.graphs.values()) == [None]


# ---- training (train.compile = "cuda-graph"): the dispatch, on the CPU with a stand-in for the capture

class Net(nn.Module):
    """x, t and a keyword label: the argument shapes a denoiser takes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.emb = nn.Embedding(4, 3)

    def forward(self, x, t, y=None, scale: float = 1.0):
        h = self.lin(x) * t[:, None] * scale
        return h if y is None else h + self.emb(y)


class Node(torch.autograd.Function):
    """The identity as one custom autograd node: a graphed callable's outputs come from one such node."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def installed(net: nn.Module, fail: bool = False) -> tuple[TrainingGraphs, list]:
    """TrainingGraphs on net's CPU calls; the stand-in 'capture' records what it was given and calls it eagerly."""
    made = []

    def capture(one, tensors):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        made.append((one, tuple(x.shape for x in tensors)))
        return lambda *xs: Node.apply(one(*xs))

    graphs = TrainingGraphs(net, capture=capture, device_type="cpu")
    net.forward = graphs
    return graphs, made


def test_training_calls_are_captured_after_the_warmup_per_signature_and_rebound_to_each_call():
    torch.manual_seed(0)
    net, reference = Net(), Net()
    reference.load_state_dict(net.state_dict())
    keys = list(net.state_dict())
    graphs, made = installed(net)
    for _ in range(5):
        x, t, y = torch.randn(4, 3), torch.rand(4), torch.randint(0, 4, (4,))
        out = net(x, t, y=y, scale=2.0)  # the captured call puts each call's tensors back where they were
        out.square().sum().backward()
        reference(x, t, y=y, scale=2.0).square().sum().backward()
        for p, q in zip(net.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad)
    assert len(made) == 1 and made[0][1] == ((4, 3), (4,), (4,))
    assert graphs.counts == {"eager": 2, "captured": 1, "replayed": 3}  # (no "busy": each backward ran before the next call)
    assert list(net.state_dict()) == keys  # in place: the state dict (checkpoints) is the plain module's
    net(torch.randn(2, 3), torch.rand(2)).sum().backward()  # another signature: eager until its own warm-up is over
    net(torch.randn(4, 3), torch.rand(4), y=torch.zeros(4, dtype=torch.long), scale=3.0).sum().backward()
    assert len(made) == 1 and graphs.counts["eager"] == 4


def test_a_second_call_before_the_first_ones_backward_runs_eagerly():
    """Replaying again would overwrite the activations the first call's backward needs."""
    net = Net()
    graphs, _ = installed(net)
    x, t = torch.randn(4, 3), torch.rand(4)
    for _ in range(3):
        net(x, t).sum().backward()
    assert graphs.counts["replayed"] == 1
    first = net(x, t)
    second = net(x, t)  # the first one's graph is alive: eager
    assert graphs.counts["replayed"] == 2 and graphs.counts["eager"] == 3
    (first + second).sum().backward()
    net(x, t).sum().backward()  # the first one's backward has run: replayed again
    assert graphs.counts["replayed"] == 3
    dropped = net(x, t)
    assert net(x, t) is not None and graphs.counts["eager"] == 4
    del dropped  # a replay whose graph was dropped without a backward: its activations are free again
    net(x, t).sum().backward()
    assert graphs.counts["replayed"] == 5 and graphs.counts["busy"] == 2
    kept = net(x, t)
    with pytest.warns(UserWarning, match="came before the backward of the call before them and ran eagerly"):
        for _ in range(8):  # a task that always calls twice per backward is told once
            net(x, t)
    del kept


def test_calls_without_gradients_in_eval_mode_or_after_a_failed_capture_run_eagerly():
    net = Net()
    graphs, made = installed(net)
    x, t = torch.randn(4, 3), torch.rand(4)
    with torch.no_grad():
        for _ in range(4):
            net(x, t)
    net.eval()
    for _ in range(4):
        net(x, t)
    assert not made and graphs.counts == {"eager": 8}
    net.train()
    failing = Net()
    graphs, _ = installed(failing, fail=True)
    with pytest.warns(UserWarning, match="could not capture the training step as CUDA graphs, running it eagerly"):
        for _ in range(6):
            failing(x, t).sum().backward()
    assert graphs.counts == {"eager": 6} and list(graphs.graphs.values()) == [None]


def test_training_through_cuda_graphs_on_a_cpu_is_one_clear_error():
    with pytest.raises(UserError, match=r'train.compile = "cuda-graph" needs a CUDA GPU; this run trains on cpu .*"reduce-overhead"'):
        capture_training(Net(), torch.device("cpu"))
    with pytest.raises(UserError, match=r'trains in one process; this run has 2'):
        capture_training(Net(), torch.device("cuda"), processes=2)


def test_a_run_asking_for_cuda_graphs_on_a_cpu_stops_before_its_first_step(tmp_path):
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    cfg = load_config("toy2d", [f"train.run_dir={tmp_path}", "train.steps=2", "train.compile=cuda-graph"])
    with pytest.raises(UserError, match='needs a CUDA GPU; this run trains on cpu'):
        train(cfg, progress=False)
    assert not list(tmp_path.glob("ckpt-*"))


def test_the_engine_trains_through_training_graphs_and_logs_their_calls(tmp_path, monkeypatch):
    """train.compile = "cuda-graph" wired into the real engine, the capture itself stood in for (it needs CUDA): the
    network's forward becomes TrainingGraphs, its calls replay from the third step, the losses and checkpoints are the
    eager run's, and the run's last log line counts the calls."""
    from safetensors.torch import load_file

    from ddpmkit.config import load_config
    from ddpmkit.train import engine, train

    def install(net, device, processes=1):
        graphs = TrainingGraphs(net, capture=lambda one, tensors: (lambda *xs: Node.apply(one(*xs))), device_type="cpu")
        net.forward = graphs
        return graphs

    monkeypatch.setattr(engine, "capture_training", install)
    losses, logs = {}, {}
    for mode in ("no", "cuda-graph"):
        cfg = load_config("toy2d", [f"train.run_dir={tmp_path / mode}", "train.steps=8", "train.log_every=1", "train.sample_every=0",
                                    f"train.compile={mode}"])
        train(cfg, progress=False)
        logs[mode] = [json.loads(line) for line in (tmp_path / mode / "train_log.jsonl").read_text().splitlines()]
        losses[mode] = [e["loss"] for e in logs[mode] if "loss" in e]
    assert len(losses["no"]) == 8 and losses["cuda-graph"] == losses["no"]
    assert logs["cuda-graph"][-1]["cuda_graph"] == {"eager": 2, "captured": 1, "replayed": 6} and "cuda_graph" not in logs["no"][-1]
    plain, graphed = (load_file(next((tmp_path / m).glob("ckpt-*/model.safetensors"))) for m in ("no", "cuda-graph"))
    assert set(plain) == set(graphed) and all(torch.equal(plain[k], graphed[k]) for k in plain)
