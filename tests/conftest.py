"""Shared test fixtures.

Tests that read ``../shared`` (real PromptSource templates, real task data, real tokenizers) are marked
``shared`` and skip with a clear reason on a user's fresh clone, where that folder does not exist. CI has it.
"""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

# Hub lookups retry for ~46 s before failing; offline mode fails at once (FIELD_NOTES.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MTF_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
SHARED_DATA = SHARED / "data"

# A small, fast version of the demo: no eval, short rows, constant LR (so a shorter run's schedule
# equals a longer one's), every step logged.
FAST = [  # dotted overrides for `mtf train configs/demo.yaml`
    "eval.mixture=null",
    "data.max_input_tokens=128",
    "data.max_target_tokens=32",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "schedule.name=constant",
    "schedule.warmup_steps=0",
    "logging.every_steps=1",
    "logging.progress_bar=false",
    "checkpoint.export_final=false",
]

requires_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"needs the shared data folder {SHARED_DATA} (present in CI, absent on a user's fresh clone)",
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data folder {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def quiet_libraries():
    """transformers and datasets logging at error level for a module's tests: transformers binds its log handler
    to the sys.stderr of the moment, which pytest swaps per test, so a later warning on a closed capture prints
    "--- Logging error --- Traceback" into the next test's output (which CLI tests read)."""
    import datasets
    import transformers

    before = transformers.logging.get_verbosity(), datasets.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(before[0])
    datasets.logging.set_verbosity(before[1])


@pytest.fixture
def xp3_root(tmp_path, monkeypatch) -> Path:
    """``MTF_DATA_ROOT`` holding a one-row xP3 in xP3's layout (``bigscience/xP3/<language>/<file>.jsonl``), which
    ``data_mixtures/xp3_train.yaml`` reads; languages en, zh and xP3's ``code`` folder."""
    for code in ("en", "zh", "code"):
        folder = tmp_path / "bigscience" / "xP3" / code
        folder.mkdir(parents=True)
        (folder / f"xp3_sample_{code}.jsonl").write_text('{"inputs": "1 + 1 =", "targets": "2"}\n', encoding="utf-8")
    monkeypatch.setenv("MTF_DATA_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package), for tests of their functions."""
    import importlib.util
    import sys

    if str(REPO_ROOT / "scripts") not in sys.path:  # as when it runs: its own folder first (bench_env, ...)
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: dataclasses resolve their string annotations there
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state: every in-process ``mtf train`` / ``mtf eval`` builds an Accelerator."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@contextmanager
def fresh_accelerate():
    """Run the body with a fresh accelerate state, and leave a fresh one behind, even when it raises."""
    reset_accelerate()
    try:
        yield
    finally:
        reset_accelerate()


def run_cli(argv: list, capsys=None) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``mtf ARGV`` run in this process."""
    from train.cli import main

    try:
        code = main([str(a) for a in argv])
    finally:
        if argv and argv[0] in ("train", "eval"):
            reset_accelerate()
    out = capsys.readouterr() if capsys is not None else None
    return code, (out.out + out.err) if out else ""


def user_error(argv: list, capsys, *phrases: str) -> str:
    """Assert ``mtf ARGV`` exits 2 with every phrase in its message and no traceback; return the output."""
    code, out = run_cli(argv, capsys)
    assert code == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for phrase in phrases:
        assert phrase in out, (phrase, out[-3000:])
    return out
