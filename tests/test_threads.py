"""ddpmkit's OpenMP threads wait passively unless the user said otherwise (bench/two_processes.py)."""
import os
import subprocess
import sys


def _policy(env: dict) -> str:
    code = "import ddpmkit, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_threads_wait_passively_by_default_and_a_users_setting_stays():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(env) == "PASSIVE"
    assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
