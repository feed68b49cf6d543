"""The package layout keeps the data flow: imports run down the stages, never back, and nothing imports the CLI.

Stages, in order (``train/__init__.py``): the base (config, errors, the package itself), then data,
modeling, evaluation, loop, reports, experts, and the CLI last. A module may import from its own stage or an earlier one;
inside a stage, only modules listed before it. Imports are read with ``ast`` (module level and inside
functions alike), so a lazy import cannot hide a backwards edge.
"""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "train"
SCRIPTS = PACKAGE.parent / "scripts"

BASE = ("config", "errors", "yamlfile")
# Stage -> its modules in data-flow order. A new module must be placed here on purpose.
STAGES = {
    "data": ("templates", "preprocessors", "few_shot", "tasks", "tokenization", "mixtures", "packing", "lanes", "pipeline", "prefetch",
             "mixture_report"),
    "modeling": ("models", "adapters", "features", "losses"),
    "evaluation": ("metrics", "items", "distributed", "batching", "scoring", "generation", "results", "evaluator",
                   "runner"),
    "loop": ("loggers", "checkpointing", "rundir", "hooks", "trainer", "validation"),
    "reports": ("rundata", "plots", "page"),
    "experts": ("merge_config", "checkpoints", "methods", "merging"),
}
STAGE_ORDER = list(STAGES)
MAX_TRAIN_LINES = 150


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exports(package: str) -> dict[str, str]:
    """The lazy ``_EXPORTS`` table of a subpackage's ``__init__``: public name -> submodule."""
    init = PACKAGE / package.split(".", 1)[1] / "__init__.py"
    if not init.is_file():
        return {}
    tree = ast.parse(init.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _imported_modules(source: str, here: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, fully resolved ``train.*`` module) for every import in module ``here``, lazy ones included."""
    package = here if is_package else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "train"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "train":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if _is_module(sub):
                    found.append((node.lineno, sub))
                elif base.count(".") == 1 and alias.name in _exports(base):  # a lazily exported name
                    found.append((node.lineno, f"{base}.{_exports(base)[alias.name]}"))
                else:
                    found.append((node.lineno, base))
    return found


def _rank(module: str) -> tuple[int, int]:
    """(stage index, position inside the stage); the base is (-1, 0) and the CLI comes after every stage."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return (-1, 0)
    if parts[1] == "cli":
        return (len(STAGE_ORDER), 0)
    stage = STAGE_ORDER.index(parts[1])
    if len(parts) == 2:  # the subpackage itself (its __init__)
        return (stage, -1)
    return (stage, STAGES[parts[1]].index(parts[2]))


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_place_in_the_stage_order():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == set(BASE) | {"cli"}, "top-level modules are the base (config, errors, yamlfile) and cli; put the rest in a stage"
    for stage, modules in STAGES.items():
        on_disk = {p.stem for p in (PACKAGE / stage).glob("*.py")} - {"__init__"}
        assert on_disk == set(modules), f"train/{stage}/: add new modules to STAGES in data-flow order"
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(STAGES)


def _violations(here: str, imports: list[tuple[int, str]]) -> list[str]:
    """What is wrong with module ``here`` importing ``imports`` (see the module docstring)."""
    if here == "train.cli":
        return []
    problems, mine = [], _rank(here)
    for line, target in imports:
        where = f"{here}:{line} imports {target}"
        theirs = _rank(target)
        if target == "train.cli":
            problems.append(f"{where}: nothing may import the CLI")
        elif mine[0] == -1 and theirs[0] != -1:
            problems.append(f"{where}: config and errors must not depend on any stage")
        elif theirs[0] > mine[0]:
            problems.append(f"{where}: {STAGE_ORDER[theirs[0]]} comes after {STAGE_ORDER[mine[0]]}")
        elif theirs[0] == mine[0] and theirs[1] > mine[1] and mine[1] != -1:
            problems.append(f"{where}: a later module of the same stage (see STAGES)")
    return problems


def test_imports_run_down_the_data_flow_and_nothing_imports_the_cli():
    problems = []
    for path in _package_files():
        here = _module_name(path)
        problems += _violations(here, _imported_modules(path.read_text(), here, path.name == "__init__.py"))
    assert not problems, "\n".join(problems)


def test_the_checker_catches_backwards_lazy_and_relative_imports():
    # The test above must not pass vacuously.
    source = """
from train.errors import DataError
from train.data import pipeline
from .mixtures import MixtureStream

def later():
    from train.loop.trainer import train
    from train.modeling import collate
    import train.cli
"""
    imports = _imported_modules(source, "train.data.packing")
    assert [t for _, t in imports] == ["train.errors", "train.data.pipeline", "train.data.mixtures",
                                       "train.loop.trainer", "train.modeling.features", "train.cli"]
    problems = _violations("train.data.packing", imports)
    assert len(problems) == 4, problems  # pipeline (later in data), loop, modeling and the CLI
    assert _violations("train.config", [(1, "train.data.tasks")])
    assert not _violations("train.loop.hooks", [(1, "train.evaluation.evaluator"), (2, "train.loop.checkpointing")])


def test_subpackages_say_what_they_take_and_give_and_export_real_names():
    for stage in STAGES:
        package = importlib.import_module(f"train.{stage}")
        doc = package.__doc__ or ""
        assert "Takes" in doc and "Gives" in doc, f"train/{stage}/__init__.py: say what the stage takes and gives"
        assert package.__all__ == sorted(_exports(f"train.{stage}"))
        for name in package.__all__:
            assert not _is_module(f"train.{stage}.{name}"), f"train.{stage}.{name} shadows a submodule"
            value = getattr(package, name)
            module = importlib.import_module(f"train.{stage}.{_exports(f'train.{stage}')[name]}")
            assert value is getattr(module, name)
        with pytest.raises(AttributeError, match="no attribute"):
            getattr(package, "no_such_name")


def test_scripts_use_only_public_names():
    problems = []
    for path in sorted(SCRIPTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "train":
                for alias in node.names:
                    if alias.name.startswith("_"):
                        problems.append(f"{path.name}:{node.lineno} imports private {node.module}.{alias.name}")
                    if _is_module(f"{node.module}.{alias.name}"):
                        aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname or a.name for a in node.names if a.name.split(".")[0] == "train")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_")):
                problems.append(f"{path.name}:{node.lineno} uses private {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_the_training_loop_reads_in_under_150_lines():
    tree = ast.parse((PACKAGE / "loop" / "trainer.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno - fn.lineno + 1 < MAX_TRAIN_LINES
