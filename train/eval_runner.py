"""``mtf eval``: zero-shot evaluation of any checkpoint, standalone or under ``accelerate launch``.

What it evaluates (``MODEL``):

* a Hugging Face model directory (``config.json`` + weights), e.g. ``runs/demo/final`` or a hub name;
* a run directory: its ``final/`` export;
* a run's checkpoint (``runs/demo/checkpoints/step-00000040``): the model is rebuilt from the run's
  ``config.yaml`` and loaded from the checkpoint's weights (DDP/single-process checkpoints; for a
  DeepSpeed checkpoint use the run's ``final/`` export).

Sharding for Slurm job arrays (BLOOMZ evaluated one (dataset, template) per job): ``--shard I/N`` keeps
the I-th of N slices of the sorted (dataset, template) pairs; :func:`merge_results` combines the shard
JSON files into the same document a single run writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from train.data import load_eval_examples
from train.errors import ConfigError, DataError


def select_shard(examples: list[dict], shard: str) -> list[dict]:
    """Keep the examples of the I-th of N slices (``shard`` = "I/N", 0-based) of the sorted (dataset, template) pairs."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: write it as INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 3/24.") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {shard!r}: INDEX must be in [0, {count}).")
    pairs = sorted({(e["dataset"], e["template"]) for e in examples})
    mine = {pair for i, pair in enumerate(pairs) if i % count == index}
    return [e for e in examples if (e["dataset"], e["template"]) in mine]


def count_shards(mixture: str) -> int:
    """Number of (dataset, template) pairs of an eval mixture: the size of the Slurm job array."""
    examples, _, _ = load_eval_examples(mixture)
    return len({(e["dataset"], e["template"]) for e in examples})


def load_model_for_eval(model: str, kind: str = "auto", tokenizer: Optional[str] = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) from an HF directory / hub name, a run directory, or a run checkpoint.

    Raises:
        ConfigError: the path holds no model (the message lists what it looked for).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(model)
    if path.is_dir() and not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        path = path / "final"  # a run directory: its export
    if path.is_dir() and (path / "trainer_state.json").exists():
        return _load_from_checkpoint(path, kind, tokenizer)
    if path.exists() and not (path / "config.json").exists():
        raise ConfigError(
            f"{model}: no model found (looked for config.json, a run's final/ export, or a checkpoint's "
            "trainer_state.json). Pass a Hugging Face model directory, e.g. runs/demo/final.")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{model}: cannot load a model config ({str(err).splitlines()[0]}).") from None
    is_encdec = bool(getattr(config, "is_encoder_decoder", False))
    resolved = ("encdec" if is_encdec else "decoder") if kind == "auto" else kind
    auto = AutoModelForSeq2SeqLM if is_encdec else AutoModelForCausalLM
    loaded = auto.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(tokenizer or str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return loaded, tok, resolved


def _load_from_checkpoint(path: Path, kind: str, tokenizer: Optional[str]) -> tuple[Any, Any, str]:
    from safetensors.torch import load_file

    from train.config import Config, _build, read_yaml
    from train.models import build_model, infer_kind, load_model_config, load_tokenizer

    run_config = path.parent.parent / "config.yaml"
    if not run_config.exists():
        raise ConfigError(f"{path}: a checkpoint needs its run's config.yaml at {run_config} to rebuild the model.")
    # Only the model section matters here; the run's data paths may no longer exist.
    cfg = _build(Config, read_yaml(run_config), "", str(run_config))
    weights = sorted((path / "accelerate").glob("model*.safetensors"))
    if not weights:
        raise ConfigError(f"{path}: no model weights under accelerate/ (a DeepSpeed checkpoint?). "
                          f"Evaluate the run's final/ export instead.")
    model_config = load_model_config(cfg.model)
    resolved = infer_kind(cfg.model, model_config) if kind == "auto" else kind
    cfg.model.gradient_checkpointing = False
    model = build_model(cfg.model, model_config, resolved)
    state = {}
    for file in weights:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise ConfigError(f"{path}: the checkpoint does not match the run's model (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    cfg.model.tokenizer = tokenizer or cfg.model.tokenizer
    return model, load_tokenizer(cfg.model), resolved


def run_eval_command(*, model_dir: str, mixture: str, kind: str = "auto", tokenizer: Optional[str] = None,
                     batch_size: int = 16, max_examples_per_template: Optional[int] = None,
                     output: Optional[str] = None, shard: Optional[str] = None) -> Optional[dict]:
    """Evaluate ``model_dir`` on ``mixture``; return the results on the main process (None elsewhere)."""
    import torch
    from accelerate import Accelerator

    from train.evaluation import evaluate, write_results

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with accelerator.main_process_first():
        examples, clusters, languages = load_eval_examples(mixture)
    if shard:
        examples = select_shard(examples, shard)
    model, tok, resolved = load_model_for_eval(model_dir, kind, tokenizer)
    model.to(accelerator.device)
    results = evaluate(model, tok, examples, kind=resolved, batch_size=batch_size, accelerator=accelerator,
                       max_examples_per_template=max_examples_per_template, clusters=clusters, languages=languages)
    results.setdefault("meta", {}).update({"model": str(model_dir), "mixture": str(mixture), "shard": shard})
    if not accelerator.is_main_process:
        return None
    if output:
        write_results(output, results)
    return results


def merge_results(paths: list[str]) -> dict:
    """Combine shard result files (``--shard``) into the document a single ``mtf eval`` writes."""
    from train.evaluation import aggregate

    per_template: dict = {}
    clusters: dict = {}
    languages: dict = {}
    meta: dict = {"shards": []}
    for p in paths:
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"shard result {p} does not exist; did every `mtf eval --shard` job finish?") from None
        except json.JSONDecodeError as err:
            raise DataError(f"shard result {p} is not valid JSON ({err}); rerun that shard.") from None
        for dataset, rows in data.get("templates", {}).items():
            for template, row in rows.items():
                if template in per_template.get(dataset, {}):
                    raise DataError(f"{p}: {dataset}/{template} appears in two shards; merge each shard once.")
                per_template.setdefault(dataset, {})[template] = row
        for dataset, summary in data.get("datasets", {}).items():
            clusters[dataset] = summary.get("cluster")
            languages[dataset] = summary.get("language")
        meta["shards"].append(str(p))
    merged = aggregate(per_template, {k: v for k, v in clusters.items() if v}, {k: v for k, v in languages.items() if v})
    merged["meta"] = meta
    return merged
