"""The library docs' code blocks run as written: every ```python block of README.md's library
section and of docs/library.md, in order, one namespace per page. The run folders they name
("runs/mnist_class", ...) are tiny runs of the same presets, trained here for a few steps."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import needs_text

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
TINY = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=",
        "network.text_max_tokens=8", "train.batch_size=8", "train.sample_every=0", "train.eval_every=0", "train.steps=3",
        "train.checkpoint_every=0", "train.mixed_precision=no", "train.log_every=1"]


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny run of every preset the docs load, under the name the docs give it."""
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    root = tmp_path_factory.mktemp("docs")
    presets = {"mnist_class": ["data.resize=4"], "imagen_base": ["data.resize=4"],
               "imagen_sr": ["superres.low_res=4"], "clip": ["clip.embed_dim=8"]}
    runs = {name: train(load_config(name, [*TINY, *extra, f"train.run_dir={root / name}"]), progress=False) for name, extra in presets.items()}
    unclip = [f"unclip.clip={runs['clip']}", "unclip.embed_dim=8"]
    runs["unclip_prior"] = train(load_config("unclip_prior", [*TINY[:1], *TINY[4:], *unclip, "unclip.prior_width=16", "unclip.prior_layers=1",
                                                              f"train.run_dir={root / 'unclip_prior'}"]), progress=False)
    runs["unclip_decoder"] = train(load_config("unclip_decoder", [*TINY, *unclip, f"train.run_dir={root / 'unclip_decoder'}"]), progress=False)
    return runs


def run_page(blocks: list[str], runs: dict[str, Path]) -> None:
    namespace: dict = {}
    for i, code in enumerate(blocks):
        for name, path in runs.items():
            code = code.replace(f'"runs/{name}"', repr(str(path)))
        assert "runs/" not in code, f"block {i} names a run the test does not train:\n{code}"
        exec(compile(code, f"block {i}", "exec"), namespace)  # noqa: S102 -- the docs' own examples


@needs_text
@pytest.mark.slow
def test_the_library_page_runs(doc_runs):
    blocks = python_blocks(ROOT / "docs" / "library.md")
    assert len(blocks) >= 4
    run_page(blocks, doc_runs)


@needs_text
def test_the_readme_library_section_runs(doc_runs):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Library"):]
    section = section[:section.index("\n## ", 1)]
    blocks = BLOCK.findall(section)
    assert blocks, "the README's library section has no python block"
    run_page(blocks, doc_runs)


def test_the_readme_names_every_preset_and_every_kind_of_run():
    """The README's list of presets and of train.task kinds (it lacked six presets and two kinds)."""
    from ddpmkit.config import PRESET_DIR
    from ddpmkit.kinds import KINDS
    from ddpmkit.train import train  # noqa: F401 -- registers every kind

    readme = (ROOT / "README.md").read_text()
    built_in = [name for name, kind in KINDS.items() if kind.build.__module__.startswith("ddpmkit.")]  # not a test's own kind
    missing = [name for name in [p.stem for p in PRESET_DIR.glob("*.toml")] + built_in if f"`{name}`" not in readme]
    assert not missing, missing


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)


def shown_commands(page: Path) -> list[str]:
    """The `ddpmkit ...` command lines of a page's shell blocks (also `torchrun ... -m ddpmkit.cli ...` and after `&&`),
    without comments and line continuations."""
    found = []
    for block in FENCE.findall(page.read_text()):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split(" # ")[0].split("&&"):
                if m := re.match(r"\s*(?:ddpmkit|\S.* -m ddpmkit(?:\.cli)?)\s+(?!\S*:\s)(.*)$", part):  # not an error line
                    found.append(m.group(1).strip())
    return found


def test_every_command_the_docs_show_is_one_the_command_line_takes():
    """The pages' shell lines (94 when this test came) parse as written, their flags and choices those of today's
    command line, and a preset's overrides are keys of that preset; a command named inline (`ddpmkit sample
    --precision auto`) names flags its command has. Nothing checked that a renamed flag or key left the docs behind."""
    import shlex

    from ddpmkit.cli import build_parser, parse
    from ddpmkit.config import PRESET_DIR, load_config

    commands = {page.name: shown_commands(page) for page in DOC_PAGES}
    assert sum(map(len, commands.values())) >= 90 and len(commands["README.md"]) >= 50
    for page, lines in commands.items():
        for line in lines:
            try:
                args = parse(shlex.split(line))
            except SystemExit:
                pytest.fail(f"{page}: `ddpmkit {line}` is not a command the command line takes")
            if args.command == "train" and (PRESET_DIR / f"{args.config}.toml").is_file():
                needs = ["train.init_from=models/sd"] if args.config == "sd_lora" and not any("init_from" in o for o in args.overrides) else []
                load_config(args.config, [*args.overrides, *needs])  # a misspelt key is a ConfigError
    parsers = build_parser().get_default("commands")
    for page in DOC_PAGES:
        for inline in re.findall(r"`ddpmkit ([a-z][-a-z0-9]*)((?: [^`]*)?)`", page.read_text()):
            name, rest = inline
            assert name in parsers or name == "COMMAND", f"{page.name}: `ddpmkit {name}...` names no command"
            if name in parsers:
                flags = {o for action in parsers[name]._actions for o in action.option_strings}
                unknown = [f for f in re.findall(r"(?<!\S)(--[a-z][-a-z0-9]*)", rest) if f not in flags]
                assert not unknown, f"{page.name}: `ddpmkit {name}{rest}`: {name} has no {unknown}"


OLD_PYTHON = next((p for p in ("/root/.pyenv/versions/3.10.13/bin/python", "/usr/bin/python3.10") if Path(p).is_file()), None)


@pytest.mark.skipif(OLD_PYTHON is None or shutil.which("make") is None, reason="needs make and a Python 3.10 to refuse")
def test_make_refuses_a_python_older_than_3_11_before_installing_anything(tmp_path):
    """`make demo` with Ubuntu 22.04's python3 (3.10) installed torch for minutes, then pip said "requires a different
    Python"; the Makefile now says so first, and makes no .venv."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    done = subprocess.run(["make", f"PYTHON={OLD_PYTHON}", "install"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ddpmkit needs Python 3.11 or newer" in done.stderr and "3.10" in done.stderr, done.stderr
    assert not (tmp_path / ".venv").exists()
