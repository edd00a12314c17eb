"""CUDA-graph replay of a network's sampling calls (graphs.py): what holds without a GPU. tests/test_cuda.py checks
on a GPU that captured calls give the eager samples."""
import pytest
import torch
from torch import nn

from ddpmkit.errors import UserError
from ddpmkit.graphs import CudaGraphed, signature
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
