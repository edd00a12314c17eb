"""`torchrun ... tests/train_many.py RUNS.json`: the `ddpmkit train` command lines in RUNS.json, one after another in
the same processes. The two-process tests launch their runs this way, so that they pay the start-up of the
interpreter, torch and the process group once instead of once per kind."""
import json
import sys
from pathlib import Path

from ddpmkit.cli import main
from ddpmkit.config import load_config
from ddpmkit.train import train

*runs, last = json.loads(Path(sys.argv[1]).read_text())
for config, *overrides in runs:
    train(load_config(config, overrides), progress=False)
# the last one through the command line's entry point, as `torchrun -m ddpmkit.cli train` runs it: it also shuts
# the process group down at the end
sys.exit(main(["train", *last, "--quiet"]))
