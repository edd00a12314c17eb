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
