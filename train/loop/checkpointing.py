"""Checkpoints you can trust: write to a temporary directory, mark complete, rename; keep the last K.

Layout of ``<output_dir>/checkpoints/``::

    step-00000040/            a complete checkpoint
        COMPLETE              written last, after everything else; its absence means "never load me"
        trainer_state.json    step, tokens seen, every data lane's stream and packer state, the config
        accelerate/           accelerator.save_state(): model, optimizer, RNG states (per rank)
    .tmp-step-00000050/       a checkpoint being written (or one a killed process left half-written)

Resume picks the newest directory that has ``COMPLETE``; half-written ones are ignored (and removed by
the next successful save). The data position is restored from the mixture stream's and the packer's
``state_dict`` — nothing is replayed or skipped.

Before anything is loaded, :func:`verify_checkpoint` checks every file: ``trainer_state.json`` parses and
has its entries, every safetensors file is whole, and every torch pickle (optimizer, RNG, DeepSpeed
states) is scanned, without unpickling, for the globals it would import: tensors, plain containers and
a short allowlist of data classes only, so resuming never runs code planted in a checkpoint. A file that needs arbitrary unpickling is refused by name; a user who
trusts the checkpoint sets ``trainer.trust_checkpoint=true``. A newest checkpoint that fails is
reported by name and left in place; ``trainer.resume_fallback=true`` resumes from the newest one that
passes instead, after moving the bad ones to ``checkpoints/rejected-step-N/`` (never deleted).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from train.errors import CheckpointError, ConfigError

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step-"
REJECTED_PREFIX = "rejected-"
STATE_KEYS = {"step": int, "tokens_seen": int, "examples_seen": int, "data": dict}  # data: every lane's stream + packer
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE_FILE).is_file()


def list_complete(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_resume_checkpoint(resume: str, output_dir: str | Path, *, fallback: bool = False,
                           trust: bool = False) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The checkpoint to resume from, verified: ``auto`` = newest complete one (or None), ``none``, or a path.

    Args:
        resume: ``trainer.resume``.
        fallback: with ``auto``, skip newer checkpoints that fail verification (``trainer.resume_fallback``).
        trust: accept files that need arbitrary unpickling (``trainer.trust_checkpoint``).

    Returns:
        (the checkpoint or None, [(skipped bad checkpoint, why)]). Moving the skipped ones aside is the
        caller's job (:func:`reject`), once every rank has chosen.

    Raises:
        ConfigError: an explicit path that is not a complete checkpoint.
        CheckpointError: the chosen checkpoint fails verification (and ``fallback`` is off or none passes).
    """
    if resume == "none":
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise ConfigError(
                f"`trainer.resume` = {resume!r} is not a complete checkpoint (it needs {MARKER} and {STATE_FILE}). "
                f"Use `trainer.resume=auto` to pick the newest complete one under {checkpoint_dir(output_dir)}."
            )
        verify_checkpoint(path, trust=trust)
        return path, []
    skipped: list[tuple[Path, str]] = []
    candidates = list(reversed(list_complete(output_dir)))
    for path in candidates:
        try:
            verify_checkpoint(path, trust=trust)
            return path, skipped
        except CheckpointError as err:
            if not fallback:
                older = next((str(c) for c in candidates if c != path), None)
                hint = (f" To resume from the previous complete checkpoint ({older}) instead, set "
                        "`trainer.resume_fallback=true` (the bad one is moved to checkpoints/rejected-*, not deleted), "
                        f"or pass `trainer.resume=<path>`." if older else
                        " There is no older complete checkpoint; start over with `trainer.resume=none` "
                        "(or another run.output_dir).")
                raise CheckpointError(f"{err} It was left in place.{hint}") from None
            skipped.append((path, str(err)))
    if skipped:
        raise CheckpointError(f"no complete checkpoint under {checkpoint_dir(output_dir)} passes verification: "
                              + "; ".join(why for _, why in skipped) + " Start over with `trainer.resume=none`.")
    return None, []


def verify_checkpoint(path: Path, *, trust: bool = False) -> dict:
    """Check every file of a checkpoint without running any code from it; return its trainer state.

    Raises:
        CheckpointError: naming the file: unreadable or incomplete trainer state, a truncated or damaged
            tensor file, or (unless ``trust``) a pickle holding more than tensors and plain containers.
    """
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is damaged ({err}).") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is damaged (not a mapping).")
    if "data" not in state and "stream" in state:
        raise CheckpointError(f"checkpoint {path} was written before data lanes (one global stream and packer); this "
                              "version cannot continue its data position. Resume it with the version that wrote it, "
                              "or start a new run (`trainer.resume=none` or another `run.output_dir`).")
    problems = [f"`{k}` missing" if k not in state else f"`{k}` is not {t.__name__}"
                for k, t in STATE_KEYS.items() if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if problems:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is damaged ({'; '.join(problems)}).")
    weights = path / "accelerate"
    if not weights.is_dir():
        raise CheckpointError(f"checkpoint {path}: the accelerate/ folder with the model and optimizer state is missing.")
    for file in sorted(p for p in weights.rglob("*") if p.is_file()):
        if file.suffix == ".safetensors":
            _verify_safetensors(file)
        elif file.suffix in PICKLE_SUFFIXES and not trust:
            _verify_pickle(file)
    return state


def _verify_safetensors(file: Path) -> None:
    from train.modeling.models import safetensors_damage

    damage = safetensors_damage(file)
    if damage:
        raise CheckpointError(f"checkpoint file {file} is damaged ({damage}); was the save interrupted or the disk full?")


# Globals a checkpoint's pickles may name besides torch's own tensor-rebuilding ones (which
# ``weights_only`` always allows): the numpy RNG state accelerate saves, and the plain data classes
# DeepSpeed puts in its optimizer states. Anything else (``os.system``, ``builtins.open``, ...) is refused.
ALLOWED_PICKLE_GLOBALS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
})


def _verify_pickle(file: Path) -> None:
    """List the globals the file's pickle would import, without unpickling it; refuse any not allowed.

    DeepSpeed later loads its own files with ``weights_only=False``; this scan is what makes that safe.
    """
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception as err:  # noqa: BLE001 - a damaged zip or pickle raises several error types
        raise CheckpointError(f"checkpoint file {file} is damaged ({str(err).splitlines()[0]}); "
                              "was the save interrupted or the disk full?") from None
    refused = sorted(set(names) - ALLOWED_PICKLE_GLOBALS)
    if refused:
        raise CheckpointError(
            f"checkpoint file {file} holds Python objects beyond tensors and plain data ({', '.join(refused)}), and "
            "loading it would run arbitrary code. Refused: nothing from it was executed. If you made this checkpoint "
            "yourself and trust it, resume with `trainer.trust_checkpoint=true`.")


# Keys (or whole sections) that may differ between a checkpoint's config and the resuming run's: they do
# not change what is trained on, nor how (rank count and micro-batching are exact by construction).
RESUME_MAY_CHANGE = (
    "run", "eval", "logging", "checkpoint", "trainer.max_steps", "trainer.max_time", "trainer.resume",
    "trainer.resume_fallback", "trainer.resume_allow_changes", "trainer.trust_checkpoint", "trainer.micro_batch_size",
    "trainer.grad_accum", "trainer.cpu", "trainer.nan_guard", "model.gradient_checkpointing", "data.num_proc",
    "data.cache_dir", "data.data_root", "data.pad_to",  # pad_to changes tensor widths, not the rows or the losses
    "trainer.loss_chunk_tokens",  # how the loss is computed in memory, not what it is
    "trainer.compile",  # how the forward runs, not what it computes (within float rounding)
    "data.prefetch_steps",  # when the rows are built, not which (a checkpoint holds the last trained step's data state)
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: dict, now: dict, allowed: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``key: checkpoint value -> this run's value`` for every key that changed and may not.

    Args:
        saved: the ``config`` entry of the checkpoint's trainer state; now: this run's resolved config.
        allowed: keys or sections the user accepts to change (``trainer.resume_allow_changes``); ``*`` is all.
    """
    if "*" in allowed:
        return []
    from train.config import Config, to_dict

    free = tuple(RESUME_MAY_CHANGE) + tuple(allowed)
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    # A key the checkpoint's version did not have yet (e.g. `peft`, `trainer.loss_weights`) had its default.
    defaults = _flatten(to_dict(Config()))
    out = []
    for key in sorted(set(flat_saved) | set(flat_now)):
        if any(key == k or key.startswith(f"{k}.") for k in free):
            continue
        before = flat_saved.get(key, defaults.get(key, "<absent>"))
        if before != flat_now.get(key, "<absent>"):
            out.append(f"{key}: {before!r} -> {flat_now.get(key, '<absent>')!r}")
    return out


def reject(path: Path) -> Path:
    """Move a checkpoint that failed verification out of the resume order, keeping it for inspection."""
    target = path.parent / f"{REJECTED_PREFIX}{path.name}"
    if target.exists():
        target = path.parent / f"{REJECTED_PREFIX}{path.name}-{int(time.time())}"
    os.replace(path, target)
    return target


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict, keep_last: int) -> tuple[Path, float]:
    """Save model/optimizer/RNG (all ranks) plus ``state`` (main process), atomically.

    Returns:
        (the checkpoint path, seconds it took).
    """
    try:
        return _save_checkpoint(accelerator, output_dir, step, state, keep_last)
    except OSError as err:  # disk full, quota, permissions: the previous checkpoint is untouched
        tmp = checkpoint_dir(output_dir) / f".tmp-{PREFIX}{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        done = list_complete(output_dir)
        kept = f"The last complete checkpoint, {done[-1]}, is intact" if done else "No earlier checkpoint exists"
        raise CheckpointError(f"could not write the checkpoint of step {step} under {checkpoint_dir(output_dir)}: "
                              f"{err.strerror or err}. {kept}; free space (or fix permissions) and rerun to resume.") from None


def _save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict, keep_last: int) -> tuple[Path, float]:
    start = time.perf_counter()
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"), **_deepspeed_kwargs(accelerator, save=True))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        (tmp / MARKER).write_text(f"step {step}\n", encoding="utf-8")
        if final.exists():  # re-saving the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)  # never a rejected one: those were renamed to rejected-step-N
        os.replace(tmp, final)
        _prune(root, keep_last, protect=state.get("best_checkpoint"))
    accelerator.wait_for_everyone()
    return final, time.perf_counter() - start


def _prune(root: Path, keep_last: int, protect: Optional[str]) -> None:
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and is_complete(p)),
                  key=lambda p: int(p.name[len(PREFIX):]))
    for old in done[:-keep_last]:
        if protect and Path(protect).resolve() == old.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator: Any, path: Path, *, trust: bool = False) -> None:
    """Restore model/optimizer/RNG into the prepared objects (the trainer state is the caller's to read).

    Call :func:`verify_checkpoint` first; ``trust`` lets accelerate unpickle the optimizer state freely.
    """
    kwargs = {"load_kwargs": {"weights_only": False}} if trust else {}
    accelerator.load_state(str(path / "accelerate"), **kwargs, **_deepspeed_kwargs(accelerator, save=False))


def _deepspeed_kwargs(accelerator: Any, *, save: bool) -> dict:
    """DeepSpeed engines of an adapter run (frozen base) save and load the trainable parameters only.

    Without DeepSpeed the trainer's accelerate hooks do the same (trainer.adapter_checkpoint_hooks).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {}
    frozen = any(not p.requires_grad for m in accelerator._models for p in m.parameters())
    if not frozen:
        return {}
    return {"exclude_frozen_parameters": True} if save else {"load_module_strict": False}


def export_model(accelerator: Any, model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the model in Hugging Face format (safetensors + config + tokenizer), loadable by from_pretrained.

    Under DeepSpeed ZeRO-3 the parameters are sharded: ``accelerator.get_state_dict`` gathers them
    (needs ``stage3_gather_16bit_weights_on_model_save: true`` in the DeepSpeed JSON).
    """
    out = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every rank must call it
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
    return out
