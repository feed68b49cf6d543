"""mtf-train: multitask prompted finetuning with exact packing and zero-shot evaluation.

One subpackage per stage of the data flow; imports only run down this list (tests/test_layout.py)::

    config, errors          the run config (strict YAML -> dataclasses) and the user-facing errors
    data/                   mixture YAML -> tasks (load -> preprocess -> render) -> tokenized (cached)
                            -> mixture stream (rates, seeded, resumable) -> packed rows (segment ids)
    modeling/               packed rows -> model tensors (enc-dec | decoder | prefix-lm masks) -> losses
    evaluation/             a model + prompted eval examples -> zero-shot scores, T0-style aggregates
    loop/                   the training loop and its hooks (log, eval, checkpoint, preempt)
    reports/                run directories -> one HTML page with figures (`mtf report`)
    experts/                finetuned experts (full or peft adapters) -> one merged model (`mtf merge`)
    cli                     the ``mtf`` command; nothing imports it

Each subpackage names its public API in ``__all__`` and loads a submodule only when one of its names is
first used, so ``mtf --help`` does not import torch or datasets.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` (PEP 562) that import ``exports[name]``'s submodule on first use.

    Args:
        package: the subpackage's ``__name__``.
        exports: public name -> submodule (relative to ``package``) that defines it.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
