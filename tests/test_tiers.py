"""The fast tier (`python -m pytest -q -m "not slow" tests`) stays fast by rule, not by luck: every test that
starts a process (`cprec`, `torchrun`, `sbatch`, `pip`, any subprocess) or takes a fixture that does carries the
`slow` mark. This reads the test files and names any test that breaks the rule."""

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# what starts a process: tests/helpers' runners, a test file's own, and the subprocess module
STARTERS = {"run_cli", "train_tiny", "torchrun", "Popen", "submit", "sbatch", "check_output"}
# conftest's session fixtures that start processes (a finished run, a trained parent, the Slurm cluster)
SLOW_FIXTURES = {"tiny", "sweep_parent", "slurm_cluster"}


def _called(node) -> set[str]:
    """Names of what `node` calls: f(...) -> f; x.f(...) -> f; subprocess.anything(...) -> Popen."""
    names = set()
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Name):
            names.add(call.func.id)
        elif isinstance(call.func, ast.Attribute):
            owner = call.func.value
            names.add("Popen" if isinstance(owner, ast.Name) and owner.id in ("subprocess", "_subprocess")
                      else call.func.attr)
    return names


def _is_fixture(node) -> bool:
    return any("fixture" in ast.unparse(d) for d in node.decorator_list)


def _marks(node) -> set[str]:
    return {m for d in node.decorator_list for m in re.findall(r"mark\.(\w+)", ast.unparse(d))}


def unmarked_slow_tests(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    if any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
           and "slow" in ast.unparse(n) for n in tree.body):
        return []
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    local = {n.name for n in functions if _is_fixture(n)}
    starters, slow = set(STARTERS), set(SLOW_FIXTURES) - local  # a local fixture of that name is judged below
    changed = True
    while changed:  # helpers and fixtures that start processes, or take fixtures that do
        changed = False
        for n in functions:
            if n.name.startswith("test_") or n.name in starters | slow:
                continue
            if _called(n) & starters or (_is_fixture(n) and {a.arg for a in n.args.args} & slow):
                (slow if _is_fixture(n) else starters).add(n.name)
                changed = True
    return [n.name for n in functions if n.name.startswith("test_") and "slow" not in _marks(n)
            and (_called(n) & starters or {a.arg for a in n.args.args} & slow)]


def test_every_test_that_starts_a_process_is_marked_slow():
    found = {p.name: names for p in sorted(TESTS.glob("test_*.py")) if (names := unmarked_slow_tests(p))}
    assert found == {}, f"mark these @pytest.mark.slow (they start processes): {found}"


def test_the_rule_sees_a_process_a_helper_and_a_slow_fixture(tmp_path):
    case = tmp_path / "test_case.py"
    case.write_text("import pytest, subprocess\n\n@pytest.fixture\ndef run(tiny):\n    return tiny\n\n"
                    "def helper():\n    subprocess.run(['x'])\n\n"
                    "def test_a(run):\n    pass\n\ndef test_b():\n    run_cli('train')\n\n"
                    "@pytest.mark.slow\ndef test_c():\n    run_cli('x')\n\ndef test_d():\n    assert 'run_cli(' \n\n"
                    "def test_e():\n    helper()\n")
    assert unmarked_slow_tests(case) == ["test_a", "test_b", "test_e"]
