"""Checkpoints you can trust: write to a temporary directory, mark complete, rename; keep the last K.

Layout of ``<output_dir>/checkpoints/``::

    step-00000040/            a complete checkpoint
        COMPLETE              written last, after everything else; its absence means "never load me"
        trainer_state.json    step, tokens seen, the data stream's and the packer's state, the config
        accelerate/           accelerator.save_state(): model, optimizer, RNG states (per rank)
    .tmp-step-00000050/       a checkpoint being written (or one a killed process left half-written)

Resume picks the newest directory that has ``COMPLETE``; half-written ones are ignored (and removed by
the next successful save). The data position is restored from the mixture stream's and the packer's
``state_dict`` — nothing is replayed or skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from train.errors import ConfigError

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step-"


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


def find_resume_checkpoint(resume: str, output_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: ``auto`` = newest complete one (or None), ``none``, or a path.

    Raises:
        ConfigError: an explicit path that is not a complete checkpoint.
    """
    if resume == "none":
        return None
    if resume == "auto":
        done = list_complete(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(
            f"`trainer.resume` = {resume!r} is not a complete checkpoint (it needs {MARKER} and {STATE_FILE}). "
            f"Use `trainer.resume=auto` to pick the newest complete one under {checkpoint_dir(output_dir)}."
        )
    return path


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict, keep_last: int) -> tuple[Path, float]:
    """Save model/optimizer/RNG (all ranks) plus ``state`` (main process), atomically.

    Returns:
        (the checkpoint path, seconds it took).
    """
    start = time.perf_counter()
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        (tmp / MARKER).write_text(f"step {step}\n", encoding="utf-8")
        if final.exists():  # re-saving the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
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


def load_checkpoint(accelerator: Any, path: Path) -> dict:
    """Restore model/optimizer/RNG into the prepared objects; return the trainer state."""
    accelerator.load_state(str(path / "accelerate"))
    with open(path / STATE_FILE, encoding="utf-8") as fh:
        return json.load(fh)


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
