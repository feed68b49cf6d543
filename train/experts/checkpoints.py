"""The inputs of a merge, read tensor by tensor: full Hugging Face checkpoints and peft adapters.

Nothing is loaded whole. A :class:`Checkpoint` knows each tensor's name, shape, dtype and file from the
safetensors headers, and :meth:`Checkpoint.tensor` opens that file, reads one tensor and closes it again
(a handle kept open would keep every page it has read mapped, and the process would grow to the model's
size). An :class:`Adapter` turns a peft adapter into the expert's whole weights, one base tensor at a
time, exactly as peft's ``merge_and_unload`` would, without building a model:

* LoRA: ``W' = W + (B @ A) * s`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA; an
  ``alpha_pattern`` entry overrides ``lora_alpha`` per module), ``r`` the rows of A. ``B @ A`` is
  transposed for ``fan_in_fan_out`` (GPT-2's ``Conv1D`` stores ``(in, out)``) and for embeddings.
* (IA)^3: ``W' = W * l``: ``l`` has shape ``(out, 1)`` and scales the output rows, or ``(1, in)`` for the
  ``feedforward_modules`` and scales the input columns (transposed under ``fan_in_fan_out``); a bias of a
  non-feed-forward module is scaled by ``l`` too. The expert's task vector is then ``W * l - W``, so every
  merge method applies to (IA)^3 experts as to any other. (The linear method with weights summing to 1
  gives ``W * sum_i w_i l_i``: the average of the (IA)^3 vectors.)

Adapter keys are peft's: ``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``,
``...lora_embedding_A``, ``...ia3_l``; ``<module>.weight`` (and ``.bias``) must be tensors of the base.
Compatibility problems (a tensor missing on one side, a shape difference, another architecture in
``config.json``, another tokenizer) are collected and raised together, each naming the tensor and both files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from train.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Files that define a tokenizer's vocabulary (compared between base and experts) and the rest of its files
# (copied to the output with them).
VOCAB_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.json",
               "merges.txt", "vocab.txt", "added_tokens.json")
TOKENIZER_FILES = VOCAB_FILES + ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                                 "chat_template.json")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# peft options whose weights this reader cannot reproduce: refused by name instead of merged wrongly.
_UNSUPPORTED_LORA = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                     "layer_replication")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 4)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_tensor(file: Path, name: str) -> Any:
    """One tensor from a safetensors file; the file is closed again at once."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name)


def _header(file: Path, who: str) -> dict[str, TensorInfo]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: TensorInfo(handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()), file)
                    for name in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ConfigError(f"{who}: {file} is not a readable safetensors file ({err}); re-export or re-download it.") from None


def resolve_model_dir(name: str, key: str) -> Path:
    """A local directory, or the cached snapshot of a hub model id (offline mode reads the cache only).

    Raises:
        ConfigError: neither a directory nor a hub id that resolves.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).exists() for f in ("config.json", ADAPTER_CONFIG, SINGLE_FILE, INDEX_FILE)) \
                and (path / "final").is_dir():
            raise ConfigError(f"`{key}` = {name!r} is a run directory; give its export, `{path / 'final'}`.")
        return path
    if path.exists():
        raise ConfigError(f"`{key}` = {name!r} is a file; give a model directory (config.json + *.safetensors) "
                          "or a peft adapter directory (adapter_config.json).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean "not available"
        raise ConfigError(f"`{key}` = {name!r} is not a local directory, and as a hub model id it is not available "
                          f"({str(err).splitlines()[0][:200]}). Download it first (HF_HUB_OFFLINE=0) or give a "
                          "directory.") from None


class Checkpoint:
    """A Hugging Face model directory read tensor by tensor: ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``.

    Args:
        path: the directory.
        who: how errors name it (``base_model``, ``models[1]``).
    """

    kind = "full"

    def __init__(self, path: Path, who: str):
        self.path, self.who = Path(path), who
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ConfigError(f"{who}: {index} is not a safetensors index ({err!r}); re-export the model.") from None
            headers = {file: _header(self.path / file, who) for file in sorted(set(weight_map.values()))}
            self.tensors = {}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise ConfigError(f"{who}: {index} puts `{name}` in {file}, which does not hold it; re-export the model.")
                self.tensors[name] = headers[file][name]
        elif (self.path / SINGLE_FILE).is_file():
            self.tensors = _header(self.path / SINGLE_FILE, who)
        elif list(self.path.glob("pytorch_model*.bin")):
            raise ConfigError(f"{who}: {self.path} holds pytorch_model*.bin weights only; merging streams safetensors. "
                              "Convert once: `AutoModel...from_pretrained(dir).save_pretrained(dir, "
                              "safe_serialization=True)`.")
        else:
            raise ConfigError(f"{who}: {self.path} holds no {SINGLE_FILE} or {INDEX_FILE}; give a Hugging Face model "
                              f"directory (e.g. a run's final/) or a peft adapter directory ({ADAPTER_CONFIG}).")
        self.names = sorted(self.tensors)

    @property
    def files(self) -> list[Path]:
        """The weight files (and the index), the inputs ``merge_record.json`` hashes."""
        files = sorted({info.file for info in self.tensors.values()})
        return files + ([self.path / INDEX_FILE] if (self.path / INDEX_FILE).is_file() else [])

    def where(self, name: str) -> str:
        return f"{self.who} ({self.tensors[name].file})"

    def tensor(self, name: str, base_tensor: Any = None) -> Any:
        """The tensor ``name`` as stored (``base_tensor`` is unused: a full checkpoint has its own)."""
        return read_tensor(self.tensors[name].file, name)

    def config(self) -> Optional[dict]:
        file = self.path / "config.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{self.who}: {file} is not valid JSON ({err}).") from None

    def changes(self, name: str) -> bool:
        return True


@dataclass
class _Target:
    """What an adapter does to one base tensor."""

    op: str  # lora | lora_embedding | ia3_weight | ia3_bias
    keys: tuple[str, ...]  # adapter tensors: (A, B) for LoRA, (l,) for (IA)^3
    scale: float = 1.0  # LoRA's alpha / r
    feedforward: bool = False


class Adapter:
    """A peft LoRA or (IA)^3 adapter, read as the whole weights of the expert it makes from ``base``.

    Raises:
        ConfigError: an unsupported peft type or option, an adapter key that is no module of the base, or
            adapter shapes that do not fit the base tensor (each names the key and both files).
    """

    def __init__(self, path: Path, who: str, base: Checkpoint):
        self.path, self.who, self.base = Path(path), who, base
        self.config_file = self.path / ADAPTER_CONFIG
        try:
            self.peft_config = json.loads(self.config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{who}: {self.config_file} is not valid JSON ({err}); re-export the adapter.") from None
        peft_type = str(self.peft_config.get("peft_type", "")).upper()
        if peft_type not in ("LORA", "IA3"):
            raise ConfigError(f"{who}: {self.config_file} is a {peft_type or 'unknown'} adapter; `mtf merge` reads LoRA and "
                              "IA3 adapters. Merge it into its base first (PeftModel.merge_and_unload) and list that.")
        self.kind = peft_type.lower()
        if self.kind == "lora":
            used = [k for k in _UNSUPPORTED_LORA if self.peft_config.get(k)]
            if used:
                raise ConfigError(f"{who}: {self.config_file} sets {', '.join(used)}, which `mtf merge` cannot "
                                  "reproduce; merge the adapter with PeftModel.merge_and_unload() and list the result.")
        elif self.peft_config.get("modules_to_save"):
            raise ConfigError(f"{who}: {self.config_file} sets modules_to_save, which `mtf merge` cannot reproduce; "
                              "merge the adapter with PeftModel.merge_and_unload() and list the result.")
        self.weights_file = self.path / ADAPTER_WEIGHTS
        if not self.weights_file.is_file():
            found = ", ".join(p.name for p in self.path.glob("adapter_model*")) or "nothing"
            raise ConfigError(f"{who}: {self.path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (found {found}); "
                              "save the adapter with safe_serialization=True.")
        self.header = _header(self.weights_file, who)
        self.targets: dict[str, _Target] = {}
        self.problems: list[str] = []
        self.fan_in_fan_out = bool(self.peft_config.get("fan_in_fan_out"))
        (self._read_lora if self.kind == "lora" else self._read_ia3)()

    @property
    def files(self) -> list[Path]:
        return [self.weights_file, self.config_file]

    def changes(self, name: str) -> bool:
        """Whether this adapter changes base tensor ``name`` (elsewhere the expert is the base)."""
        return name in self.targets

    # ------------------------------------------------------------------------------------ reading keys

    def _modules(self, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
        """module -> {suffix: adapter key}; a key that fits no suffix is a problem."""
        modules: dict[str, dict[str, str]] = {}
        for key in sorted(self.header):
            suffix = next((s for s in suffixes if key.endswith("." + s)), None)
            if suffix is None or not key.startswith(PEFT_PREFIX):
                self.problems.append(f"{self.who}: adapter tensor `{key}` in {self.weights_file} is not a "
                                     f"{self.kind} weight `{PEFT_PREFIX}<module>.{{{', '.join(suffixes)}}}`; re-save the "
                                     "adapter with peft, or merge it into its base and list that.")
                continue
            module = key[len(PEFT_PREFIX):-len(suffix) - 1]
            modules.setdefault(module, {})[suffix] = key
        return modules

    def _base_info(self, module: str, key: str, suffix: str = "weight") -> Optional[TensorInfo]:
        name = f"{module}.{suffix}"
        info = self.base.tensors.get(name)
        if info is None and suffix == "weight":
            self.problems.append(f"{self.who}: adapter tensor `{key}` ({self.weights_file}) adapts `{module}`, but the "
                                 f"base has no tensor `{name}` ({self.base.who}: {self.base.path}); was the adapter "
                                 "trained on another base model?")
        return info

    def _read_lora(self) -> None:
        alpha = float(self.peft_config.get("lora_alpha", 8))
        patterns = self.peft_config.get("alpha_pattern") or {}
        rslora = bool(self.peft_config.get("use_rslora"))
        suffixes = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
        for module, keys in self._modules(suffixes).items():
            embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
            a_key, b_key = (keys.get("lora_embedding_A"), keys.get("lora_embedding_B")) if embedding else \
                (keys.get("lora_A.weight"), keys.get("lora_B.weight"))
            if a_key is None or b_key is None:
                self.problems.append(f"{self.who}: {self.weights_file} has only one of LoRA's A and B for `{module}` "
                                     f"({a_key or b_key}); the adapter file is incomplete.")
                continue
            info = self._base_info(module, a_key)
            if info is None:
                continue
            a_shape, b_shape = self.header[a_key].shape, self.header[b_key].shape
            if len(a_shape) != 2 or len(b_shape) != 2:
                self.problems.append(f"{self.who}: `{a_key}` has shape {list(a_shape)}; only LoRA on linear, Conv1D and "
                                     "embedding layers can be merged here.")
                continue
            rank = a_shape[0]
            product = (b_shape[0], a_shape[1])  # B @ A
            expected = product[::-1] if (embedding or self.fan_in_fan_out) else product
            if b_shape[1] != rank or tuple(info.shape) != expected:
                self.problems.append(f"{self.who}: LoRA `{module}` makes a delta of shape {list(expected)} "
                                     f"(A {list(a_shape)}, B {list(b_shape)} in {self.weights_file}), but the base tensor `{module}.weight` "
                                     f"has shape {list(info.shape)} ({info.file}).")
                continue
            module_alpha = alpha
            for pattern, value in patterns.items():  # peft's get_pattern_key: the first pattern that matches
                if re.match(rf"(.*\.)?({pattern})$", module):
                    module_alpha = float(value)
                    break
            scale = module_alpha / (math.sqrt(rank) if rslora else rank)
            self.targets[f"{module}.weight"] = _Target("lora_embedding" if embedding else "lora", (a_key, b_key), scale)

    def _read_ia3(self) -> None:
        feedforward = self.peft_config.get("feedforward_modules") or []
        for module, keys in self._modules(("ia3_l",)).items():
            key = keys["ia3_l"]
            info = self._base_info(module, key)
            if info is None:
                continue
            # peft's rule (IA3Model._check_target_module_feedforward): a regex string, or a list of suffixes.
            is_ff = bool(re.fullmatch(feedforward, module)) if isinstance(feedforward, str) else \
                any(module.endswith(t) for t in feedforward)
            shape = self.header[key].shape
            out_features, in_features = info.shape[::-1] if self.fan_in_fan_out else info.shape[:2]
            expected = (1, in_features) if is_ff else (out_features, 1)
            if len(info.shape) != 2 or tuple(shape) != expected:
                role = "feed-forward (input-scaling)" if is_ff else "output-scaling"
                self.problems.append(f"{self.who}: (IA)^3 vector `{key}` has shape {list(shape)} in {self.weights_file}, "
                                     f"but as an {role} module of the base tensor `{module}.weight` {list(info.shape)} "
                                     f"({info.file}) it must be {list(expected)}; check feedforward_modules in "
                                     f"{self.config_file}.")
                continue
            self.targets[f"{module}.weight"] = _Target("ia3_weight", (key,), feedforward=is_ff)
            if not is_ff and f"{module}.bias" in self.base.tensors:
                self.targets[f"{module}.bias"] = _Target("ia3_bias", (key,))

    # ------------------------------------------------------------------------------------ the expert

    def tensor(self, name: str, base_tensor: Any) -> Any:
        """The expert's tensor ``name``: ``base_tensor`` (float32) changed as peft's merge changes it."""
        target = self.targets.get(name)
        if target is None:
            return base_tensor
        parts = [read_tensor(self.weights_file, key).float() for key in target.keys]
        if target.op in ("lora", "lora_embedding"):
            a, b = parts
            delta = b @ a  # (out, r) @ (r, in) -> (out, in)
            if target.op == "lora_embedding" or self.fan_in_fan_out:
                delta = delta.T  # peft: transpose(B @ A, fan_in_fan_out); embeddings store (num, dim)
            return base_tensor + delta * target.scale
        (vector,) = parts
        if target.op == "ia3_bias":
            return base_tensor * vector.reshape(base_tensor.shape)
        return base_tensor * (vector.T if self.fan_in_fan_out else vector)  # (out, 1) rows, or (1, in) columns


# ------------------------------------------------------------------------------------------ compatibility


def open_expert(path: Path, who: str, base: Optional[Checkpoint]) -> Checkpoint | Adapter:
    """A :class:`Checkpoint` or, for a directory with ``adapter_config.json``, an :class:`Adapter` of ``base``."""
    if (Path(path) / ADAPTER_CONFIG).is_file():
        if base is None:
            raise ConfigError(f"{who}: {path} is a peft adapter; an adapter applies to a base, so set `base_model` "
                              "(also for the linear method).")
        return Adapter(path, who, base)
    return Checkpoint(path, who)


def tensor_problems(layout: Checkpoint, expert: Checkpoint | Adapter) -> list[str]:
    """Every tensor name and shape difference between the base (``layout``) and one expert."""
    if isinstance(expert, Adapter):
        return list(expert.problems)
    out = []
    for name in layout.names:
        theirs = expert.tensors.get(name)
        if theirs is None:
            out.append(f"tensor `{name}` is in {layout.where(name)} but missing from {expert.who} ({expert.path}); "
                       "experts must have the base's tensors (a tied weight saved under another name?).")
        elif theirs.shape != layout.tensors[name].shape:
            out.append(f"tensor `{name}` has shape {list(layout.tensors[name].shape)} in {layout.where(name)} but "
                       f"{list(theirs.shape)} in {expert.where(name)}.")
        elif theirs.is_float != layout.tensors[name].is_float:
            out.append(f"tensor `{name}` is {layout.tensors[name].dtype} in {layout.where(name)} but {theirs.dtype} in "
                       f"{expert.where(name)}.")
    for name in expert.names:
        if name not in layout.tensors:
            out.append(f"tensor `{name}` is in {expert.where(name)} but missing from {layout.who} ({layout.path}).")
    return out


def architecture_problem(layout: Checkpoint, expert: Checkpoint) -> Optional[str]:
    """A different ``model_type`` or ``architectures`` in the two ``config.json`` files (None when equal or absent)."""
    mine, theirs = layout.config(), expert.config()
    if not mine or not theirs:
        return None
    fields = ("model_type", "architectures")
    if all(mine.get(f) == theirs.get(f) for f in fields):
        return None
    return (f"{expert.who} ({expert.path / 'config.json'}) is a {theirs.get('model_type')} model "
            f"{theirs.get('architectures')}, but {layout.who} ({layout.path / 'config.json'}) is a "
            f"{mine.get('model_type')} model {mine.get('architectures')}; experts must share the base's architecture.")


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in VOCAB_FILES)


def tokenizer_problem(mine: Path, theirs: Path, my_name: str, their_name: str) -> Optional[str]:
    """How the vocabularies of two tokenizer directories differ (None when equal, or when a side has none).

    Files both directories hold are compared by content that defines the vocabulary (``tokenizer.json``: its
    model and added tokens; other files: their bytes). Directories with different tokenizer file formats
    are compared through ``AutoTokenizer(...).get_vocab()``.
    """
    if not has_tokenizer(mine) or not has_tokenizer(theirs):
        return None
    common = [f for f in VOCAB_FILES if (mine / f).is_file() and (theirs / f).is_file()]
    for name in common:
        a, b = _vocab_view(mine / name), _vocab_view(theirs / name)
        if a != b:
            return (f"{their_name} has a different tokenizer from {my_name}: {mine / name} vs {theirs / name} "
                    f"({_vocab_difference(a, b)}). Merged weights would mean other tokens; merge experts of one base.")
    if common:
        return None
    try:
        from transformers import AutoTokenizer

        a_vocab = AutoTokenizer.from_pretrained(str(mine)).get_vocab()
        b_vocab = AutoTokenizer.from_pretrained(str(theirs)).get_vocab()
    except Exception:  # noqa: BLE001 - an unloadable tokenizer is not this check's business; eval will say
        return None
    if a_vocab != b_vocab:
        return (f"{their_name} has a different tokenizer from {my_name}: {theirs} vs {mine} "
                f"({len(b_vocab)} vs {len(a_vocab)} entries). Merge experts of one base.")
    return None


def _vocab_view(file: Path) -> Any:
    if file.name == "tokenizer.json":
        doc = json.loads(file.read_text(encoding="utf-8"))
        return {"vocab": _id_to_token(doc.get("model", {})), "merges": (doc.get("model") or {}).get("merges"),
                "added": [(t.get("id"), t.get("content")) for t in doc.get("added_tokens", [])]}
    if file.suffix == ".json":
        return {"vocab": json.loads(file.read_text(encoding="utf-8"))}
    return {"bytes": file_sha256(file)}


def _id_to_token(model: dict) -> list:
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # unigram (T5): [[piece, score], ...]
        return [entry[0] if isinstance(entry, list) else entry for entry in vocab]
    if isinstance(vocab, dict):  # BPE / WordPiece: {token: id}
        return [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return []


def _vocab_difference(a: dict, b: dict) -> str:
    if "bytes" in a:
        return "the files differ"
    left, right = a.get("vocab"), b.get("vocab")
    if isinstance(left, list) and isinstance(right, list) and left != right:
        first = next((i for i, (x, y) in enumerate(zip(left, right)) if x != y), min(len(left), len(right)))
        shown = lambda v: repr(v[first]) if first < len(v) else "none"  # noqa: E731
        return f"{len(left)} vs {len(right)} entries; first difference at id {first}: {shown(left)} vs {shown(right)}"
    if left != right:
        return "the vocabularies differ"
    return "added tokens or merges differ"


def file_sha256(file: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
