"""The GPU tests, which CI (no GPU) skips, still ask for what exists. A GPU is lent to few sessions,
for minutes; a GPU test left behind by a change on the CPU side (a renamed argument, a moved
function, a recipe key gone) would spend them on a TypeError. So each GPU test is read here, not
run: the names it imports from fastrsb must exist, each call of a fastrsb function must fit the
function's signature (its positional count, its keyword names), and each fastrsb command line it
runs must parse, its --set keys and values the recipe's."""
import ast
import importlib
import inspect
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
CLI_RUNNERS = {"run_cli", "run_cli_process"}  # conftest's: fastrsb ARGS, in-process or in a process of its own


def _is_gpu(node: ast.AST) -> bool:
    return "mark.gpu" in ast.unparse(node)


def gpu_tests() -> list[tuple[Path, ast.Module, ast.FunctionDef]]:
    """Every test function marked gpu: by its module's pytestmark, a decorator, or a parameter's marks."""
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        module = ast.parse(path.read_text())
        whole = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                    and _is_gpu(n) for n in module.body)
        found += [(path, module, f) for f in module.body if isinstance(f, ast.FunctionDef)
                  and f.name.startswith("test_") and (whole or any(_is_gpu(d) for d in f.decorator_list))]
    return found


def _imported(nodes: list[ast.AST], problems: list[str], where: str) -> dict:
    """The fastrsb names (and modules) these import statements bind, by local name."""
    names = {}
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastrsb"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"{where}: {node.module} has no {alias.name}")
                else:
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastrsb") and alias.asname:
                    names[alias.asname] = importlib.import_module(alias.name)
    return names


def _callee(call: ast.Call, names: dict, problems: list[str], where: str):
    """The fastrsb object a call calls (f(...) or module.f(...)), else None."""
    func = call.func
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
        owner = names[func.value.id]
        if not hasattr(owner, func.attr):
            problems.append(f"{where}: {func.value.id} has no {func.attr}")
            return None
        return getattr(owner, func.attr)
    return None


def _check_call(call: ast.Call, callee, problems: list[str], where: str) -> None:
    if not callable(callee) or getattr(callee, "_is_pipeline_def", False):  # DALI's wrapper adds batch_size & co
        return
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return
    try:
        signature = inspect.signature(callee)
    except (TypeError, ValueError):
        return
    try:
        signature.bind_partial(*call.args, **{k.arg: None for k in call.keywords})
    except TypeError as err:
        problems.append(f"{where}: {ast.unparse(call.func)}(...): {err}")


def _check_command(call: ast.Call, problems: list[str], where: str) -> None:
    """A fastrsb command line: each argument a literal, or "X" for what the test computes."""
    from fastrsb.cli import build_parser
    from fastrsb.errors import UserError
    from fastrsb.recipe import BUILTIN, load_recipe
    argv = [a.value if isinstance(a, ast.Constant) else "X" for a in call.args]
    if any(isinstance(a, ast.Starred) for a in call.args):
        return
    try:
        args = build_parser().parse_args([str(a) for a in argv])
    except SystemExit:
        problems.append(f"{where}: fastrsb {' '.join(map(str, argv))}: does not parse")
        return
    recipe = getattr(args, "recipe", None)
    if recipe in BUILTIN:
        try:
            load_recipe(recipe, [item for item in getattr(args, "overrides", []) if item != "X"])  # literal ones
        except UserError as err:
            problems.append(f"{where}: fastrsb {' '.join(map(str, argv))}: {err}")


def check(path: Path, module: ast.Module, test: ast.FunctionDef) -> list[str]:
    problems: list[str] = []
    where = f"{path.name}::{test.name}"
    names = _imported(module.body, problems, where)
    names.update(_imported([n for n in ast.walk(test) if isinstance(n, (ast.Import, ast.ImportFrom))], problems, where))
    for call in (n for n in ast.walk(test) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Name) and call.func.id in CLI_RUNNERS:
            _check_command(call, problems, f"{where}:{call.lineno}")
            continue
        callee = _callee(call, names, problems, f"{where}:{call.lineno}")
        if callee is not None:
            _check_call(call, callee, problems, f"{where}:{call.lineno}")
    return problems


def test_the_gpu_tests_are_found():
    """The marks read as pytest reads them: all of test_gpu.py, and those elsewhere (28 functions at 4b4fef0)."""
    found = {(path.name, test.name) for path, _, test in gpu_tests()}
    assert len({name for file, name in found if file == "test_gpu.py"}) >= 20
    assert ("test_pipelines.py", "test_gpu_loaders") in found
    assert ("test_pipelines.py", "test_a_loader_that_fails_stops_its_pipelines_at_once") in found  # a parameter's mark
    assert ("test_spread_views.py", "test_gpu_views_exchanged_over_nccl") in found
    assert ("test_pipelines.py", "test_hardware_decoder_share_by_gpu") not in found  # a CPU test


@pytest.mark.parametrize("test", gpu_tests(), ids=lambda t: f"{t[0].name}::{t[2].name}")
def test_each_gpu_test_asks_for_what_exists(test):
    assert check(*test) == []


def test_a_gpu_test_left_behind_is_named():
    """The checks fail where a GPU test would: a name gone, a keyword renamed, a positional too
    many, an option or a recipe key gone."""
    source = '''
import pytest
pytestmark = [pytest.mark.gpu]
def test_old(tiny_data, tmp_path):
    from fastrsb.pipelines import train_loader, trainloader
    from fastrsb import device
    train_loader(tiny_data, 8, 32, device="cuda", augment_on_gpu=True)
    train_loader(tiny_data, 8, 32, "cuda", 0, 1, 0, None, None, 1, None, None, None, None, None, None, None, None,
                 None, None, None, None, None, None, None, None, None)
    device.gpu_memory_lines()
    run_cli_process("train", "tiny", "--data", tiny_data, "--gpus", "1")
    run_cli_process("train", "tiny", "--data", tiny_data, "--set", "graphs=true")
    run_cli_process("train", "tiny", "--data", tiny_data, "--set", "epochs=two")
'''
    module = ast.parse(source)
    problems = check(Path("test_old.py"), module, module.body[2])
    assert len(problems) == 7, problems
    for fragment in ("has no trainloader", "unexpected keyword argument 'augment_on_gpu'", "too many positional",
                     "device has no gpu_memory_lines", "--gpus 1: does not parse", "graphs", "epochs"):
        assert any(fragment in p for p in problems), (fragment, problems)
