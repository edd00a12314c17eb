"""The mutation script (tests/mutants.py) changes exactly the sites it says, and none in messages or option defaults."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mutants  # noqa: E402 -- a script beside the tests, not a package

SOURCE = '''
def f(x, steps: int = 50, *, eta: float = 0.0):
    if x < 0:
        raise ValueError(f"x must be >= {0 + 1}, got {x * 2}")
    assert x >= 0, x - 1
    return 0.5 * x + 2 if x > steps else x - 1


class Recipe:
    lr: float = 2e-4
    size = 3


GIF_SAMPLES: int = 64
OFFSET = 0x6A09E667
'''


def test_each_kind_finds_its_sites_and_none_in_messages_asserts_or_defaults() -> None:
    tree = ast.parse(SOURCE)
    assert [ast.unparse(n) for n, _, _ in mutants.sites(tree, ("arith",))] == ["0.5 * x + 2", "x - 1", "0.5 * x"]  # breadth first
    assert [(ast.unparse(n), k) for n, _, k in mutants.sites(tree, ("bounds",))] == [("x < 0", 0), ("x > steps", 0)]
    # 50, 0.0 and 2e-4 are defaults, GIF_SAMPLES and OFFSET named settings, the numbers in the message and the assert quiet;
    # `size = 3` is not an annotated field
    assert sorted(n.value for n, _, _ in mutants.sites(tree, ("consts",))) == [0, 0.5, 1, 2, 3]
    assert len(mutants.sites(tree, mutants.KINDS)) == 3 + 2 + 5  # the only call is in the raise


CALLS = '''
a = pow(x, 2, 2)
b = max(x, y) + f(*z)
c = g(x, y, k=1)
'''


def test_swaps_are_of_neighbouring_arguments_that_differ_in_a_call_that_is_not_commutative() -> None:
    found = mutants.sites(ast.parse(CALLS), ("swap",))
    assert [(ast.unparse(n), k) for n, _, k in found] == [("pow(x, 2, 2)", 0), ("g(x, y, k=1)", 0)]
    assert [mutants.mutant(CALLS, i, ("swap",))[1:] for i in range(2)] == [(2, "pow(x, 2, 2)", "pow(2, x, 2)"), (4, "g(x, y, k=1)", "g(y, x, k=1)")]


def test_a_mutant_changes_one_site_and_says_which() -> None:
    kinds = ("consts",)
    changed = {mutants.mutant(SOURCE, i, kinds)[2:] for i in range(len(mutants.sites(ast.parse(SOURCE), kinds)))}
    assert changed == {("0", "1"), ("0.5", "1.0"), ("2", "3"), ("1", "2"), ("3", "4")}
    text, line, before, after = mutants.mutant(SOURCE, 1, ("bounds",))
    assert (line, before, after) == (6, "x > steps", "x >= steps")
    assert ast.unparse(ast.parse(text)).count(">=") == ast.unparse(ast.parse(SOURCE)).count(">=") + 1
    assert mutants.mutant(SOURCE, 0, ("arith",))[2:] == ("0.5 * x + 2", "0.5 * x - 2")
    assert mutants._changed(0.0) == 1.0 and mutants._changed(-3) == -2
