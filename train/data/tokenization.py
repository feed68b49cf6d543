"""Tokenize prompted examples into ``input_ids`` / ``target_ids``, cached by ``datasets`` fingerprints.

The contract (COMMON.md), never truncated (the packer applies the over-long policy)::

    encdec:             input_ids = tok(inputs) + [eos]    target_ids = tok(targets[0]) + [eos]
    decoder, prefix_lm: input_ids = tok(inputs)            target_ids = tok(" " + targets[0]) + [eos]

The leading space on decoder targets makes ``input + target`` read as one natural text for BPE
tokenizers. Special tokens are never added by the tokenizer itself (``add_special_tokens=False``); the
eos is appended here, so T5 (which adds eos itself) and GPT-2 (which does not) behave the same.

Answer choices (for T-Few's unlikelihood and rank-classification losses) are tokenized like targets
(``tok(choice) + [eos]``, decoders ``tok(" " + choice) + [eos]``) into two flat columns, so the mixture
stream reads them from the Arrow buffers like the other token columns::

    choice_ids     = the WRONG choices' tokens, concatenated    e.g. [n1, n2, eos, m1, eos]
    choice_lengths = tokens of each wrong choice                 e.g. [3, 2]     ([] = no usable choice set)

The gold choice is the one whose text equals ``targets[0]`` (whitespace stripped); its tokens are the
target's, so it is not stored twice. Choices equal to any target are not wrong choices. An example
has a usable choice set only with >= 2 choices, the gold among them and >= 1 wrong choice left;
otherwise ``choice_lengths`` is empty and the example trains with the LM loss alone.

Caching: ``datasets.map`` reuses ``cache-<fingerprint>.arrow`` next to the input's cache files. The
fingerprint is computed here from (input fingerprint, tokenizer fingerprint, kind, format version)
rather than from datasets' pickle-hash of the function, because hashing a tokenizer object is not stable
across processes for every tokenizer class. A changed template changes the prompted dataset's
fingerprint, so exactly that task is re-tokenized; a changed tokenizer or kind re-tokenizes everything
it touches.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import datasets

from train.errors import ConfigError, DataError

MODEL_KINDS = ("encdec", "decoder", "prefix_lm")
_LIST = getattr(datasets, "List", datasets.Sequence)
_TOKEN_FEATURES = {  # the columns this module adds
    "input_ids": _LIST(datasets.Value("int32")), "target_ids": _LIST(datasets.Value("int64")),
    "choice_ids": _LIST(datasets.Value("int64")), "choice_lengths": _LIST(datasets.Value("int64")),
}
TOKENIZATION_VERSION = "2"  # bump when the output of _tokenize_batch changes for the same inputs
# settings of slow tokenizers that change encodings without changing the vocabulary
_BEHAVIOUR_KWARGS = ("legacy", "add_prefix_space", "do_lower_case", "extra_ids", "clean_up_tokenization_spaces")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hex digest of everything that decides how ``tokenizer`` encodes text.

    Uses the serialised fast tokenizer (vocab, merges, normaliser, pre-tokeniser) when there is one,
    else the class, the vocabulary, the sentencepiece model bytes and the behaviour-changing settings.
    Paths are not hashed, so the same tokenizer files in two folders share the cache.
    """
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if isinstance(vocab_file, str) and Path(vocab_file).is_file():
            h.update(Path(vocab_file).read_bytes())
        settings = {k: tokenizer.init_kwargs.get(k) for k in _BEHAVIOUR_KWARGS}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps([tokenizer.eos_token_id, str(tokenizer.eos_token)]).encode())
    return h.hexdigest()


def _tokenize_batch(batch: dict[str, list], *, tokenizer: Any, kind: str, eos_id: int) -> dict[str, list]:
    """Batched ``datasets.map`` function: prompted columns -> ``input_ids``, ``target_ids``, ``choice_ids``,
    ``choice_lengths``."""
    targets = []
    for i, target_list in enumerate(batch["targets"]):
        if not target_list:
            where = ", ".join(f"{k}={batch[k][i]!r}" for k in ("task", "template", "example_index") if k in batch)
            raise DataError(f"prompted example with no target ({where or f'row {i} of the batch'}); "
                            "the task should drop examples whose template renders an empty target.")
        targets.append(target_list[0] if kind == "encdec" else " " + target_list[0])
    inputs = tokenizer(batch["inputs"], add_special_tokens=False)["input_ids"]
    outputs = tokenizer(targets, add_special_tokens=False)["input_ids"]
    if kind == "encdec":
        inputs = [ids + [eos_id] for ids in inputs]
    out = {"input_ids": inputs, "target_ids": [ids + [eos_id] for ids in outputs]}
    out.update(_tokenize_choices(batch, tokenizer=tokenizer, kind=kind, eos_id=eos_id))
    return out


def _wrong_choices(choices: list[str], targets: list[str]) -> list[str]:
    """The wrong answer choices of an example, or [] when it has no usable choice set (see the module docstring)."""
    if len(choices) < 2 or targets[0].strip() not in {c.strip() for c in choices}:
        return []
    gold = {t.strip() for t in targets}
    return [c for c in choices if c.strip() not in gold]


def _tokenize_choices(batch: dict[str, list], *, tokenizer: Any, kind: str, eos_id: int) -> dict[str, list]:
    """``choice_ids`` (flat) and ``choice_lengths`` of every example's wrong choices, one tokenizer call."""
    choice_lists = batch.get("answer_choices") or [[] for _ in batch["targets"]]
    wrong = [_wrong_choices([str(c) for c in (choices or [])], [str(t) for t in target_list])
             for choices, target_list in zip(choice_lists, batch["targets"])]
    texts = [c if kind == "encdec" else " " + c for choices in wrong for c in choices]
    tokens = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    choice_ids, choice_lengths = [], []
    for choices in wrong:
        ids = [list(next(tokens)) + [eos_id] for _ in choices]
        choice_ids.append([t for choice in ids for t in choice])
        choice_lengths.append([len(choice) for choice in ids])
    return {"choice_ids": choice_ids, "choice_lengths": choice_lengths}


def tokenize_prompted(
    dataset: Any,
    tokenizer: Any,
    kind: str,
    num_proc: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 1000,
) -> Any:
    """Add ``input_ids`` / ``target_ids`` / ``choice_ids`` / ``choice_lengths`` to a prompted dataset (metadata
    columns are kept).

    Args:
        dataset: a ``datasets.Dataset`` of prompted examples (``inputs: str``, ``targets: list[str]``, ...).
        tokenizer: a transformers tokenizer with an eos token.
        kind: ``encdec`` | ``decoder`` | ``prefix_lm``.
        num_proc: worker processes for ``datasets.map``.
        cache_dir: where to write the tokenized Arrow file. Default: next to the input's cache files
            (an in-memory dataset is then tokenized in memory, uncached).
        batch_size: rows per tokenizer call.

    Returns:
        The tokenized dataset; its fingerprint is a stable hash of (input fingerprint, tokenizer, kind).

    Raises:
        ConfigError: unknown ``kind`` or a tokenizer without an eos token.
        DataError: missing ``inputs``/``targets`` columns, or an example with no target.
    """
    if kind not in MODEL_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; valid kinds: {', '.join(MODEL_KINDS)}.")
    missing = [c for c in ("inputs", "targets") if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"cannot tokenize: the dataset has no {', '.join(missing)} column(s) (has: "
            f"{', '.join(dataset.column_names)}). Tokenize prompted examples from train.data.tasks."
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos token; set tokenizer.eos_token.")
    fingerprint = hashlib.sha256(
        "\0".join([dataset._fingerprint, tokenizer_fingerprint(tokenizer), kind, TOKENIZATION_VERSION]).encode()
    ).hexdigest()[:32]
    cache_file_name = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file_name = str(Path(cache_dir) / f"tokenized-{fingerprint}.arrow")
    function = functools.partial(_tokenize_batch, tokenizer=tokenizer, kind=kind, eos_id=eos_id)
    # Declared, not inferred: a batch whose examples all lack choices would infer list<null> for the
    # choice columns and fail on the next batch. input_ids/target_ids get the types datasets infers.
    features = datasets.Features({**dataset.features, **_TOKEN_FEATURES})
    return dataset.map(
        function,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name,
        features=features,
        desc=f"tokenize ({kind})",
    )
