"""`torchrun ... tests/train_many.py RUNS.json`: the `ddpmkit train` command lines in RUNS.json, one after another in
the same processes. The two-process tests launch their runs this way, so that they pay the start-up of the
interpreter, torch and the process group once instead of once per kind."""
import json
import os
import sys
from pathlib import Path

from conftest import reads_per_call
from ddpmkit.cli import main
from ddpmkit.config import load_config
from ddpmkit.train import train

*runs, last = json.loads(Path(sys.argv[1]).read_text())

# each run's host reads per step and per log window (tests/conftest.py), in each process, written beside the run
for config, *overrides in runs:
    cfg = load_config(config, overrides)
    with reads_per_call() as calls:
        train(cfg, progress=False)
    (Path(cfg.train.run_dir) / f"host_reads.{os.environ['RANK']}.json").write_text(json.dumps(calls))
# the last one through the command line's entry point, as `torchrun -m ddpmkit.cli train` runs it: it also shuts
# the process group down at the end
with reads_per_call() as calls:
    code = main(["train", *last, "--quiet"])
run_dir = next(o.split("=", 1)[1] for o in last if o.startswith("train.run_dir="))
(Path(run_dir) / f"host_reads.{os.environ['RANK']}.json").write_text(json.dumps(calls))
sys.exit(code)
