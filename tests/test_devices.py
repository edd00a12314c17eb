"""One rule for where a network runs (CUDA, then MPS, then the CPU), used by every face; and the CPU's kind."""
import pytest
import torch

import ddpmkit.devices as devices
from conftest import in_a_thread
from ddpmkit.cli import build_parser, main
from ddpmkit.errors import UserError


@pytest.mark.parametrize("cuda, mps, want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_the_default_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert devices.default_device().type == want
    assert devices.resolve_device(None).type == want and devices.resolve_device("auto").type == want
    assert devices.resolve_device("cpu").type == "cpu"  # an explicit device overrides


def test_a_device_this_machine_lacks_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, message in (("cuda", "sees no CUDA GPU"), ("mps", "MPS is not available"), ("gpu", "choose from auto, cpu, cuda, cuda:N, mps")):
        with pytest.raises(UserError, match=message):
            devices.resolve_device(name)


def test_a_gpu_index_past_the_last_is_refused_with_the_ones_there_are(monkeypatch):
    """On a machine with 2 GPUs (torch's answers stubbed: there is none here), cuda:0 and cuda:1 resolve; cuda:2 is one
    line naming the two."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1) and devices.resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(UserError, match=r"^--device cuda:2: there are 2 CUDA devices \(cuda:0 .. cuda:1\)$"):
        devices.resolve_device("cuda:2")


def test_every_command_with_a_device_option_defaults_to_the_rule():
    sub = next(a for a in build_parser()._actions if isinstance(a, type(build_parser()._subparsers._group_actions[0])))
    with_device = {name: p for name, p in sub.choices.items() if any("--device" in a.option_strings for a in p._actions)}
    assert {"sample", "eval", "tune-grid", "upscale", "img2img", "inpaint", "posterior", "interpolate", "voyage", "unclip", "variations",
            "unclip-interpolate", "text-diff", "serve", "demo"} <= set(with_device)
    for name, p in with_device.items():
        action = next(a for a in p._actions if "--device" in a.option_strings)
        assert action.default == "auto", name


@pytest.fixture
def spy(monkeypatch):
    """default_device, counted: a face that follows the rule asks it (here it answers the CPU, as this machine would)."""
    calls = []

    def counted():
        calls.append(1)
        return torch.device("cpu")

    monkeypatch.setattr(devices, "default_device", counted)
    return calls


def test_the_faces_run_their_networks_where_the_rule_says(web_runs, tmp_path, spy, capsys):
    from ddpmkit.cli.train import draw_demo
    from ddpmkit.web.shelf import Shelf

    run = str(web_runs / "uncond")
    faces = {
        "sample": lambda: main(["sample", run, "--n", "2", "--steps", "2", "--no-gif", "--out", str(tmp_path / "s")]),
        "img2img": lambda: main(["img2img", run, "digits:0", "--n", "1", "--steps", "2", "--out", str(tmp_path / "e")]),
        "interpolate": lambda: main(["interpolate", run, "--seeds", "0,1", "--n", "2", "--steps", "2", "--out", str(tmp_path / "i")]),
        "demo's grid": lambda: draw_demo(web_runs / "uncond", (), 2, "ddim_uniform", 2, 1.0),
        "web page": lambda: Shelf([run]).get(run),
    }
    for name, face in faces.items():
        before = len(spy)
        assert face() in (0, None) or face is faces["web page"], name
        assert len(spy) > before, f"{name} did not ask the device rule"
    capsys.readouterr()


def test_the_avx2_caps_make_an_avx512_machine_an_avx2_one_for_precision(monkeypatch):
    from ddpmkit.precision import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not devices.cpu_computes_bf16() and resolve_precision("auto") == "no"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert devices.cpu_kind() == "AVX2" and "kind AVX2" in devices.describe_cpu()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert devices.cpu_computes_bf16() and devices.cpu_kind() == "AVX-512-bf16" and resolve_precision("auto") == "bf16"


def test_auto_precision_is_bf16_only_on_gpus_that_compute_it(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100 (compute capability 7.x: bf16 emulated, slower than
    fp32), so "auto" trained Colab's free T4 in emulated bf16. Now bf16 from Ampere (8.0) on, or under ROCm."""
    from ddpmkit.precision import gpu_computes_bf16, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, want in (((7, 0), "no"), ((7, 5), "no"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16"), ((10, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto") == want, capability
        assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "no"  # what the user names stays
    assert gpu_computes_bf16((7, 5), rocm=True) and not gpu_computes_bf16((6, 1))


def test_a_process_under_a_cpu_capability_cap_caches_its_compiled_kernels_apart():
    """Inductor's disk cache ignores the ATEN_CPU_CAPABILITY cap: kernels built uncapped, loaded under the AVX2 caps,
    trained a compiled toy to NaN (ddpmkit/inductor_cache.py). A capped process gets a folder of its own."""
    import tempfile

    from ddpmkit.inductor_cache import cache_dir_for

    assert cache_dir_for({}) is None  # uncapped: torch's own default
    folder = cache_dir_for({"ATEN_CPU_CAPABILITY": "AVX2"})
    assert folder.startswith(tempfile.gettempdir()) and folder.endswith("_avx2") and "torchinductor_" in folder
    assert cache_dir_for({"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": "/mine"}) is None  # the user's choice stands


def test_a_device_without_memory_for_a_tensor_is_one_line_that_names_its_size_and_what_to_make_smaller():
    """The CPU allocator's real failure (a tensor larger than the machine's memory and swap: refused at once, never
    touched) and CUDA's OutOfMemoryError are told apart from other RuntimeErrors, and the CLI's line names the size
    and the flag or config key to make smaller."""
    from ddpmkit.cli.common import no_memory
    from ddpmkit.devices import out_of_memory

    with pytest.raises(RuntimeError) as raised:
        in_a_thread(lambda: torch.empty(10**14, dtype=torch.uint8))  # more than memory and swap: refused at once
    cpu = raised.value
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB")
    assert out_of_memory(cpu) and out_of_memory(cuda) and not out_of_memory(RuntimeError("shape mismatch"))
    assert no_memory(cpu, "sample").startswith("the device had no memory for a tensor of 93132.3 GiB; give a smaller --batch-size")
    assert no_memory(cuda, "train") == ("the device had no memory for a tensor of 2.00 GiB; give train.batch_size=N (a smaller batch), "
                                        "or a smaller network")
    assert no_memory(RuntimeError("MPS backend out of memory"), "demo").startswith("the device had no memory; give train.batch_size=N")


def test_an_nvidia_gpu_this_torch_cannot_use_is_named_before_training_on_the_cpu(tmp_path, monkeypatch, capsys):
    """`make demo` pins the CPU build of torch (for laptops); on a machine with an NVIDIA driver it then trained on the
    CPU without a word. The driver's file (here one the test writes, as the driver would) makes the trainer say why and
    what to install; without it, or with a torch that sees the GPU, nothing is said."""
    from ddpmkit.devices import unused_gpu

    driver = tmp_path / "version"
    assert unused_gpu(driver) is None  # no NVIDIA driver: nothing to say
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05\n")
    if torch.cuda.is_available():
        assert unused_gpu(driver) is None
    else:
        hint = unused_gpu(driver)
        assert hint.startswith("note: this machine has an NVIDIA GPU, but torch ") and "make TORCH_PIN= demo" in hint
        assert ("a CPU build" in hint) == (torch.version.cuda is None)
        monkeypatch.setattr(devices, "NVIDIA_DRIVER", driver)  # where the trainer looks, as on a machine with the driver
        assert main(["train", "toy2d", "train.steps=1", f"train.run_dir={tmp_path / 'run'}"]) == 0
        out = capsys.readouterr().out
        assert out.index("train denoiser on ") < out.index(hint)
