"""ddpmkit's OpenMP threads spin briefly, then sleep, unless the user said otherwise (bench/two_processes.py)."""
import os
import subprocess
import sys


def _settings(env: dict) -> list[str]:
    code = "import ddpmkit, os, torch; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()


def test_threads_spin_briefly_then_sleep_by_default_and_a_users_setting_stays():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert _settings(env) == ["PASSIVE", "1000"]
    assert _settings({**env, "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5"}) == ["ACTIVE", "5"]


def test_a_training_run_spins_longer_and_every_other_process_briefly():
    from ddpmkit.threads import command, settings_for

    py = "/usr/bin/python3"
    trains = [[py, "/venv/bin/ddpmkit", "train", "mnist"], [py, "-m", "ddpmkit.cli", "demo"],
              [py, "-u", "-m", "ddpmkit.cli", "train-autoencoder", "mnist_autoencoder"],  # as torchrun starts it
              ["C:\\venv\\Scripts\\ddpmkit.exe", "train-clip", "clip"]]
    others = [[py, "/venv/bin/ddpmkit", "sample", "runs/mnist"], [py, "-m", "ddpmkit.cli", "serve"], [py, "-m", "pytest", "train"],
              [py, "-c", "import ddpmkit"], [py, "my_training.py", "train"], [py, "/venv/bin/ddpmkit"]]
    assert [command(argv) for argv in trains] == ["train", "demo", "train-autoencoder", "train-clip"]
    for argv in trains:
        assert settings_for(argv) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}, argv
    for argv in others:
        assert settings_for(argv) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}, argv


def test_the_command_line_decides_the_spin_of_the_process_itself():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    # a real process whose command line holds `-m ddpmkit.cli train` (after -c's code, so that it only prints): the
    # package reads sys.orig_argv when it is imported, before torch loads
    code = "import os, ddpmkit, torch; print(os.environ['GOMP_SPINCOUNT'])"
    got = subprocess.run([sys.executable, "-c", code, "-m", "ddpmkit.cli", "train"], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["10000"]
    assert _settings(env) == ["PASSIVE", "1000"]  # (`python -c`: not a training run)
