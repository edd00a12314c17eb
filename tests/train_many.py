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
for k, (config, *overrides) in enumerate(runs):
    cfg = load_config(config, overrides)
    if k:
        train(cfg, progress=False)
        continue
    with reads_per_call() as calls:  # the first run's host reads per step and per log window, in each process
        train(cfg, progress=False)
    (Path(cfg.train.run_dir) / f"host_reads.{os.environ['RANK']}.json").write_text(json.dumps(calls))
# the last one through the command line's entry point, as `torchrun -m ddpmkit.cli train` runs it: it also shuts
# the process group down at the end
sys.exit(main(["train", *last, "--quiet"]))
