"""Single-GPU training throughput and MFU of ``mtf train``'s step: a ~1B Llama-style decoder and a T5-large-sized model.

One prepared script for one GPU: bf16 autocast (fp32 weights, what ``trainer.precision=bf16`` runs), random
init from a model config (no hub), the project's own training path for every step:

    demo mixture (data_mixtures/demo_train.yaml, PromptSource templates, configs/tokenizers/t5)
      -> tokenize_prompted -> seeded MixtureStream -> Packer -> collate -> model_forward (bf16 autocast)
      -> losses.local_numerators / weighted_loss with global denominators -> backward -> clip 1.0 -> AdamW

The demo examples are short (tens to a few hundred tokens), so a 2048-token row holds many of them: that is
what packing does with any prompted mixture.

Arms (per model):

* ``packed_sdpa``: packed rows (``data.packing=true``, ``pad_to=capacity``), ``attn_implementation="sdpa"``
  with the 4-D additive segment masks that :func:`train.modeling.features.model_forward` builds (today's path).
* ``packed_flex``: the same packed rows with ``attn_implementation="flex_attention"``: a BlockMask of the same
  segment rule (:func:`train.modeling.features.segment_block_mask`), empty 128x128 tiles skipped.
* ``packed_flash``: decoder only, ``attn_implementation="flash_attention_2"``: no mask, one varlen sequence per
  packed example (:func:`train.modeling.features.varlen_sequences`); needs the ``flash_attn`` package.
  An arm this machine cannot run (no CUDA, no ``flash_attn``) is reported as not available, with the
  trainer's own start-up error as the reason.
* ``padded``: one example per row, each micro-batch padded to its longest example (``data.packing=false``,
  ``pad_to=longest``), through the same collate / model_forward / loss. Every optimizer step has as many
  examples as a packed step has on average (the convention of scripts/bench_packing.py), split into the
  fewest equal micro-batches (gradient accumulation, as the trainer does) whose padded token slots stay
  within 1.25x a packed micro-batch's, so both arms fit the same memory.

Timing: ``--warmup-steps`` untimed steps (CUDA kernels, allocator, autotuning), then up to ``--steps`` timed
steps, each ended by ``torch.cuda.synchronize()``; an arm stops early when its timed steps pass
``--max-seconds``. The batches of every step are collated on the CPU before the clock starts, so the
figure is the GPU step (the trainer overlaps nothing either, but its data time is benchmarked by
scripts/bench_data_ranks.py). Tokens/s counts REAL tokens (inputs + targets, no padding).

MFU (model FLOPs utilisation) = achieved model FLOPs per second / the GPU's dense bf16 peak, where the model
FLOPs of a step count only the work the real tokens need (padding and masked-out attention are free):

    decoder:  F = 6 * N * T  +  12 * L * d_attn * P_causal
    enc-dec:  F = 6 * (N_enc * T_in + N_dec * T_tgt)
                + 12 * d_attn * (L_enc * P_enc + L_dec * (P_dec_causal + P_cross))

* ``N``: parameters used in matmuls per token: all parameters except the input embedding lookup (the output
  layer counts, tied or not); for enc-dec ``N_enc`` = encoder parameters minus the shared embedding,
  ``N_dec`` = decoder parameters minus the shared embedding plus the output layer. Norm weights and T5's
  relative-position bias are counted too (< 0.1%).
* ``T``: real tokens (``T_in`` / ``T_tgt``: real encoder / decoder tokens).
* ``P``: attended (query, key) pairs of real tokens, per example: ``s (s + 1) / 2`` causal, ``s_in^2``
  encoder, ``s_tgt * s_in`` cross. The factor 12 = 2 matmuls (QK^T, AV) x 2 FLOPs per multiply-add x 3
  (forward + backward); ``d_attn`` = heads x head dim. This is PaLM's ``6N + 12 L H Q T`` per token with the
  context length replaced by each token's real context.

The peak is looked up from ``torch.cuda.get_device_name`` (PEAK_BF16_TFLOPS) or given with
``--peak-tflops``; without either (CPU, ``--smoke``, an unknown GPU) MFU is null.

Budget (default run, H100 SXM, estimate): the decoder has 954M parameters (888M in matmuls); a packed row
holds ~44 demo examples (~46 tokens each), so a step of 8 rows x 2048 is ~16.3k real tokens and ~8.7e13
model FLOPs -> ~0.2 s at 45% MFU; the padded arm's step has the same ~356 examples in 4 micro-batches of
~89 x ~170 slots (~32% of its slots real). T5-sized: ~310M encoder + ~440M decoder matmul parameters, ~25
examples per 1024 / 256 row, 16 rows -> ~16k + 4k real tokens, ~4e13 FLOPs -> ~0.12 s at 35%. 3 warm-up +
10 timed steps per arm, 2 arms per model -> well under a minute of steps. Around them: tokenizing the demo
mixture and building the steps (~4 s per model on 2 CPU cores), random init of each model on the GPU
(seconds), CUDA start-up. Expected total ~1-2 min, far under 6 min; ``--max-seconds`` (60 s default) caps
every arm's timed loop (4 arms), so even a much slower GPU stays near 6 min. Memory: fp32 weights + grads
+ AdamW state, 16 bytes per parameter (~15 GB for the decoder), plus the activations and fp32 logits of
~16-20k tokens (tens of GB): fits 80 GB; lower ``--rows`` on smaller cards.

``--smoke``: tiny models (hidden 64, 2 layers), short rows, fp32 on the CPU, 1 + 2 steps: a test of the
script, not a measurement (MFU null unless ``--peak-tflops``).

Usage::

    python scripts/bench_gpu.py [--json] [--write-benchmarks BENCHMARKS.md] [--peak-tflops 989]
    python scripts/bench_gpu.py --smoke --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from bench_env import REPO  # offline Hugging Face, this checkout first on sys.path: before torch / train
import benchmarks_md  # noqa: E402

BEGIN, END = "<!-- bench_gpu:begin -->", "<!-- bench_gpu:end -->"
DEMO = REPO / "configs" / "demo.yaml"
TOKENIZER = REPO / "configs" / "tokenizers" / "t5"
MIXTURE = REPO / "data_mixtures" / "demo_train.yaml"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from the vendors' data sheets. Matched against the
# lower-cased device name, first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("gh200", 989.0), ("h200", 989.0), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0),
    ("h800 pcie", 756.0), ("h800", 989.0), ("b200", 2250.0), ("b100", 1750.0), ("a100", 312.0), ("a800", 312.0),
    ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("a10g", 70.0), ("a10", 125.0), ("a6000", 155.0),
)

TARGETS = {"decoder_mfu": 0.45, "encdec_mfu": 0.35, "packed_over_padded": 2.0}

# Model configs, random init. ~1B Llama-style decoder (untied head, full multi-head attention) and a
# T5-large-sized enc-dec with t5-v1_1-large's gated-GELU FFN; both on the T5 tokenizer's vocabulary.
MODELS = {
    "decoder": {
        "model_type": "llama", "vocab_size": 32128, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
    },
    "encdec": {
        "model_type": "t5", "vocab_size": 32128, "d_model": 1024, "d_kv": 64, "d_ff": 2816, "num_layers": 24,
        "num_decoder_layers": 24, "num_heads": 16, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
    },
}
SMOKE_MODELS = {
    "decoder": {**MODELS["decoder"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128},
    "encdec": {**MODELS["encdec"], "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
               "num_heads": 4},
}
CAPS = {"decoder": {"max_tokens": 2048}, "encdec": {"max_input_tokens": 1024, "max_target_tokens": 256}}
SMOKE_CAPS = {"decoder": {"max_tokens": 128}, "encdec": {"max_input_tokens": 96, "max_target_tokens": 24}}
ROWS = {"decoder": 8, "encdec": 16}  # packed rows per step (one micro-batch)
PADDED_SLOT_SLACK = 1.25  # a padded micro-batch may hold this many times a packed one's token slots


# ----------------------------------------------------------------------------------------- FLOPs and MFU


@dataclass
class ModelDims:
    """What the FLOPs formula (module docstring) needs to know about a model."""

    kind: str  # "decoder" or "encdec"
    d_attn: int  # heads x head dim
    n_params: int = 0  # decoder: matmul parameters per token
    layers: int = 0  # decoder layers
    n_enc: int = 0  # enc-dec: matmul parameters per encoder token
    n_dec: int = 0  # enc-dec: matmul parameters per decoder token (output layer included)
    enc_layers: int = 0
    dec_layers: int = 0


def model_dims(model, kind: str) -> ModelDims:
    """Matmul parameter counts and attention width of a built Hugging Face model (see the module docstring)."""
    cfg = model.config
    embed_weight, head_weight = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embed, head = embed_weight.numel(), head_weight.numel()
    if kind == "encdec":
        enc = sum(p.numel() for p in model.encoder.parameters())  # includes the shared embedding once
        dec = sum(p.numel() for p in model.decoder.parameters())
        return ModelDims(kind, d_attn=cfg.num_heads * cfg.d_kv, n_enc=enc - embed, n_dec=dec - embed + head,
                         enc_layers=cfg.num_layers, dec_layers=cfg.num_decoder_layers)
    total = sum(p.numel() for p in model.parameters())  # an untied head is in it; a tied one only as the embedding
    tied = head_weight is embed_weight
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelDims(kind, d_attn=cfg.num_attention_heads * head_dim, n_params=total - embed + (head if tied else 0),
                     layers=cfg.num_hidden_layers)


def example_flops(dims: ModelDims, input_len: int, target_len: int) -> float:
    """Model FLOPs (forward + backward) of one training example of ``input_len`` + ``target_len`` real tokens.

    Decoder: the example is one causal sequence of ``s = input_len + target_len`` tokens:
    ``6 N s + 12 L d_attn s (s + 1) / 2``. Enc-dec: ``6 (N_enc s_in + N_dec s_tgt) + 12 d_attn (L_enc s_in^2 +
    L_dec (s_tgt (s_tgt + 1) / 2 + s_tgt s_in))``.
    """
    if dims.kind == "encdec":
        s_in, s_tgt = input_len, target_len
        dense = 6.0 * (dims.n_enc * s_in + dims.n_dec * s_tgt)
        pairs = dims.enc_layers * s_in * s_in + dims.dec_layers * (s_tgt * (s_tgt + 1) / 2 + s_tgt * s_in)
        return dense + 12.0 * dims.d_attn * pairs
    s = input_len + target_len
    return 6.0 * dims.n_params * s + 12.0 * dims.layers * dims.d_attn * s * (s + 1) / 2


def mfu(flops_per_second: float, peak_tflops: float | None) -> float | None:
    """Achieved model FLOPs per second as a fraction of the peak; None without a peak."""
    if not peak_tflops:
        return None
    return flops_per_second / (peak_tflops * 1e12)


def peak_for(device_name: str | None) -> float | None:
    """Dense bf16 peak (TFLOPS) of a GPU by its ``torch.cuda.get_device_name``; None if unknown."""
    if not device_name:
        return None
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


# ----------------------------------------------------------------------------------------- data


def run_config(kind: str, model_json: Path, caps: dict, cache_dir: str, *, bf16: bool, seed: int,
               attention: str = "sdpa"):
    """The ``mtf train`` config of one arm: the demo's data and optimizer with this model and these capacities."""
    from train.config import load_config

    return load_config(DEMO, [
        f"model.config={model_json}", f"model.tokenizer={TOKENIZER}", f"data.train_mixture={MIXTURE}",
        f"data.cache_dir={cache_dir}", "eval.mixture=null", f"model.attn_implementation={attention}",
        *(f"data.{key}={value}" for key, value in caps.items()),
        f"trainer.precision={'bf16' if bf16 else 'fp32'}", f"trainer.seed={seed}", "optim.name=adamw",
        "optim.clip_grad_norm=1.0", "logging.wandb.mode=disabled"])


def example_stream(cfg, tokenizer, kind: str):
    """The seeded mixture stream of the demo tasks, tokenized for ``kind``, as ``mtf train`` draws it."""
    from train.data import MixtureStream, count_examples, load_train_tasks, plan_mixture, tokenize_prompted

    spec, tasks = load_train_tasks(cfg)
    tokenized = {name: tokenize_prompted(task.prompted(cfg.data.max_examples_per_task, cache_dir=cfg.data.cache_dir),
                                         tokenizer, kind)
                 for name, task in tasks.items()}
    return MixtureStream.from_plan(plan_mixture(spec, count_examples(tokenized)), tokenized, seed=cfg.trainer.seed)


def row_examples(row: dict, kind: str) -> list[tuple[int, int]]:
    """(input tokens, target tokens) of every example (segment) of a packed or single row."""
    if kind == "encdec":
        ins, tgts = row["input_segment_ids"], row["target_segment_ids"]
        return [(ins.count(s), tgts.count(s)) for s in sorted(set(ins) - {0})]
    seg, loss = row["segment_ids"], row["loss_mask"]
    out = []
    for s in sorted(set(seg) - {0}):
        tgt = sum(1 for a, m in zip(seg, loss) if a == s and m)
        out.append((seg.count(s) - tgt, tgt))
    return out


def padded_slots(rows: list[dict], kind: str) -> int:
    """Token slots of ``rows`` collated with ``pad_to=longest`` (both sides for enc-dec)."""
    if kind == "encdec":
        return len(rows) * (max(len(r["input_ids"]) for r in rows) + max(len(r["target_ids"]) for r in rows))
    return len(rows) * max(len(r["input_ids"]) for r in rows)


@dataclass
class Step:
    """One optimizer step's micro-batches (collated on the CPU), with its real tokens and model FLOPs."""

    micro_batches: list[dict]
    examples: list[tuple[int, int]] = field(default_factory=list)
    slots: int = 0

    @property
    def tokens(self) -> int:
        return sum(i + t for i, t in self.examples)


def make_steps(stream, kind: str, caps: dict, info, *, rows: int, steps: int, window: int, overlong: str) -> dict:
    """The packed and the padded arm's steps, from the same stream (the padded arm from its start again).

    Returns ``{"packed": [Step], "padded": [Step], "examples_per_packed_row": float, "padded_micro_batches": int,
    "packed_efficiency": float}``.
    """
    from train.data import Packer
    from train.modeling.features import collate

    def batch(rs: list[dict], pad_to: str) -> dict:
        return collate(rs, kind, pad_id=info.pad_token_id, decoder_start_id=info.decoder_start_token_id,
                       pad_to=pad_to, **caps)

    examples: list[dict] = []  # every example drawn, in stream order: the padded arm takes the same ones first

    def drawn():
        for example in stream:
            examples.append(example)
            yield example

    packer = Packer(kind, window=window, overlong_policy=overlong, **caps)
    packed_rows = list(islice(packer.rows(drawn()), rows * steps))
    if len(packed_rows) < rows * steps:
        raise SystemExit(f"bench_gpu: the demo stream filled only {len(packed_rows)} rows, {rows * steps} needed")
    capacity = sum(caps.values())
    packed = []
    for i in range(steps):
        rs = packed_rows[i * rows:(i + 1) * rows]
        packed.append(Step([batch(rs, "capacity")], [e for r in rs for e in row_examples(r, kind)],
                           slots=rows * capacity))
    per_row = sum(len(s.examples) for s in packed) / (rows * steps)
    per_step = max(1, round(rows * per_row))
    more = islice(stream, max(0, per_step * steps - len(examples)))  # the stream repeats its tasks' examples
    singles = list(islice(Packer(kind, pack=False, overlong_policy=overlong, **caps).rows(
        iter([*examples, *more])), per_step * steps))
    if len(singles) < per_step * steps:
        raise SystemExit(f"bench_gpu: the demo stream gave {len(singles)} examples, {per_step * steps} needed")
    # The fewest equal micro-batches whose padded slots stay within the packed micro-batch's budget (+ slack).
    budget = PADDED_SLOT_SLACK * rows * capacity
    accum = 1
    while accum < per_step:
        size = math.ceil(per_step / accum)
        worst = max(padded_slots(singles[j:j + size], kind) for j in range(0, per_step * steps, size)
                    if singles[j:j + size])
        if worst <= budget:
            break
        accum += 1
    size = math.ceil(per_step / accum)
    padded = []
    for i in range(steps):
        rs = singles[i * per_step:(i + 1) * per_step]
        chunks = [rs[j:j + size] for j in range(0, len(rs), size)]
        padded.append(Step([batch(c, "longest") for c in chunks], [e for r in rs for e in row_examples(r, kind)],
                           slots=sum(padded_slots(c, kind) for c in chunks)))
    return {"packed": packed, "padded": padded, "examples_per_packed_row": per_row,
            "examples_per_padded_step": per_step, "padded_micro_batches": accum,
            "packed_efficiency": sum(s.tokens for s in packed) / sum(s.slots for s in packed),
            "padded_efficiency": sum(s.tokens for s in padded) / sum(s.slots for s in padded)}


# ----------------------------------------------------------------------------------------- one arm


# arm -> model.attn_implementation; the packed arms share the rows, only the attention differs
PACKED_ARMS = {"packed_sdpa": "sdpa", "packed_flex": "flex_attention", "packed_flash": "flash_attention_2"}


def backend_config(kind: str, model_json: Path, caps: dict, cache_dir: str, model_config, *, bf16: bool, seed: int,
                   attention: str):
    """(the arm's config, None), or (None, why this machine cannot train that attention: the trainer's own
    start-up error, from the config's checks or :func:`train.modeling.models.check_attn_implementation`)."""
    from train.errors import ConfigError
    from train.modeling.models import check_attn_implementation

    try:
        cfg = run_config(kind, model_json, caps, cache_dir, bf16=bf16, seed=seed, attention=attention)
        check_attn_implementation(cfg.model, model_config, kind, training=True)
    except ConfigError as err:
        return None, str(err)
    return cfg, None


def time_arm(cfg, model_config, kind: str, steps: list[Step], *, warmup: int, max_seconds: float, device,
             bf16: bool, peak: float | None) -> dict:
    """Train ``warmup`` untimed then the remaining steps timed, the trainer's step (module docstring); figures."""
    import torch

    from train.loop.trainer import build_optimizer
    from train.modeling import build_run_model, losses
    from train.modeling.features import model_forward

    with torch.device(device):  # random init directly on the GPU
        model = build_run_model(cfg, model_config, kind)
    model.to(device).train()
    dims = model_dims(model, kind)
    optimizer = build_optimizer(cfg, model)
    mode = cfg.trainer.loss_normalization
    weights = losses.active_weights(cfg.trainer.loss_weights)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def one_step(step: Step) -> float:
        batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in step.micro_batches]
        # Global denominators over the step's micro-batches first, as global_step_sums does (1 rank).
        denominators = {name: 0.0 for name in weights}
        for b in batches:
            for name, value in losses.local_denominators(b, mode, weights).items():
                denominators[name] += value
        total = torch.zeros((), device=device)
        for b in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model_forward(model, b, kind)
            numerators = losses.local_numerators(logits, b, mode, weights)
            loss = losses.weighted_loss(numerators, denominators, weights, mode=mode)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    for step in steps[:warmup]:
        one_step(step)
    sync()
    timed, start, loss = 0, time.perf_counter(), None
    for step in steps[warmup:]:
        loss = one_step(step)
        timed += 1
        sync()
        if time.perf_counter() - start > max_seconds:
            break
    seconds = time.perf_counter() - start
    done = steps[warmup:warmup + timed]
    tokens = sum(s.tokens for s in done)
    flops = sum(example_flops(dims, i, t) for s in done for i, t in s.examples)
    result = {
        "timed_steps": timed, "seconds": seconds, "seconds_per_step": seconds / timed,
        "tokens_per_second": tokens / seconds, "real_tokens_per_step": tokens / timed,
        "token_slots_per_step": sum(s.slots for s in done) / timed,
        "examples_per_step": sum(len(s.examples) for s in done) / timed,
        "micro_batches_per_step": len(done[0].micro_batches),
        "model_tflops_per_second": flops / seconds / 1e12, "mfu": mfu(flops / seconds, peak),
        "final_loss": float(loss) if loss is not None else None,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "dims": vars(dims),
    }
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------- the benchmark


def measure(args) -> dict:
    import torch

    from train.modeling.models import load_model_config, load_tokenizer, model_info

    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if not smoke and device.type != "cuda":
        raise SystemExit("bench_gpu: no CUDA device; use --smoke for the CPU check")
    bf16 = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or peak_for(name)
    if bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
    models, caps_all = (SMOKE_MODELS, SMOKE_CAPS) if smoke else (MODELS, CAPS)
    result: dict = {
        "device": name or "cpu", "peak_bf16_tflops": peak, "precision": "bf16 autocast" if bf16 else "fp32",
        "smoke": smoke, "torch": torch.__version__, "targets": TARGETS, "models": {},
    }
    import transformers

    result["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
        for kind in args.kinds:
            model_json = Path(work) / f"{kind}.json"
            model_json.write_text(json.dumps(models[kind]), encoding="utf-8")
            caps = caps_all[kind]
            cfg = run_config(kind, model_json, caps, str(Path(work) / "cache"), bf16=bf16, seed=args.seed)
            tokenizer = load_tokenizer(cfg.model)
            model_config = load_model_config(cfg.model)
            info = model_info(cfg.model, model_config, tokenizer)
            assert info.kind == kind, (info.kind, kind)
            rows = args.rows or (2 if smoke else ROWS[kind])
            total_steps = args.warmup_steps + args.steps
            t0 = time.perf_counter()
            data = make_steps(example_stream(cfg, tokenizer, kind), kind, caps, info, rows=rows, steps=total_steps,
                              window=cfg.data.pack_window, overlong=cfg.data.overlong)
            print(f"[bench_gpu] {kind}: data ready in {time.perf_counter() - t0:.1f} s "
                  f"({data['examples_per_packed_row']:.1f} examples per packed row)", file=sys.stderr, flush=True)
            arms: dict = {}
            for arm in (*[a for a in PACKED_ARMS if kind == "decoder" or a != "packed_flash"], "padded"):
                arm_cfg = cfg
                if arm in PACKED_ARMS and PACKED_ARMS[arm] != "sdpa":
                    arm_cfg, why = backend_config(kind, model_json, caps, str(Path(work) / "cache"), model_config,
                                                  bf16=bf16, seed=args.seed, attention=PACKED_ARMS[arm])
                    if why:
                        arms[arm] = {"available": False, "reason": why}
                        print(f"[bench_gpu] {kind} {arm}: not available: {why}", file=sys.stderr, flush=True)
                        continue
                t0 = time.perf_counter()
                arms[arm] = {"available": True, **time_arm(
                    arm_cfg, model_config, kind, data["padded" if arm == "padded" else "packed"],
                    warmup=args.warmup_steps, max_seconds=args.max_seconds, device=device, bf16=bf16, peak=peak)}
                a = arms[arm]
                print(f"[bench_gpu] {kind} {arm}: {a['tokens_per_second']:,.0f} real tokens/s, "
                      f"MFU {percent(a['mfu'])}, "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            packed, padded = arms["packed_sdpa"], arms["padded"]
            params = packed["dims"]
            result["models"][kind] = {
                "config": models[kind], "capacity": caps, "rows_per_step": rows,
                "parameters_matmul": params["n_params"] or params["n_enc"] + params["n_dec"],
                "examples_per_packed_row": data["examples_per_packed_row"],
                "examples_per_padded_step": data["examples_per_padded_step"],
                "padded_micro_batches": data["padded_micro_batches"],
                "packed_efficiency": data["packed_efficiency"], "padded_efficiency": data["padded_efficiency"],
                "warmup_steps": args.warmup_steps, "arms": arms,
                "packed_over_padded": packed["tokens_per_second"] / padded["tokens_per_second"],
            }
    return result


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render(results: dict) -> str:
    """The BENCHMARKS.md section (between the bench_gpu markers)."""
    peak = results["peak_bf16_tflops"]
    lines = [BEGIN, f"## Single-GPU training throughput and MFU (`scripts/bench_gpu.py`) on {results['device']}", "",
             f"torch {results['torch']}, transformers {results['transformers']}, {results['precision']}, random init, "
             f"AdamW, clip 1.0, the `mtf train` step (Packer -> collate -> model_forward -> losses) on the demo mixture "
             f"(T5 tokenizer). MFU = model FLOPs of the real tokens (6N per token + attention over each example's "
             f"real context; formula in the script's docstring) / {peak if peak else 'unknown'} TFLOPS dense bf16 peak. "
             "Tokens/s counts real tokens. Warm-up steps excluded; each step ends with `cuda.synchronize()`.", "",
             "| model | arm | tokens/s (real) | MFU | model TFLOPS/s | s/step | examples/step | slots used | max mem GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, m in results["models"].items():
        caps = "/".join(str(v) for v in m["capacity"].values())
        label = f"{kind} {m['parameters_matmul'] / 1e6:,.0f}M @ {caps}"
        for arm, a in m["arms"].items():
            if not a["available"]:
                lines.append(f"| {label} | {arm} | not available here (below) | - | - | - | - | - | - |")
                continue
            used = a["real_tokens_per_step"] / a["token_slots_per_step"]
            mem = "n/a" if a["max_memory_gib"] is None else f"{a['max_memory_gib']:.1f}"
            lines.append(f"| {label} | {arm} | {a['tokens_per_second']:,.0f} | {percent(a['mfu'])} | "
                         f"{a['model_tflops_per_second']:.1f} | {a['seconds_per_step']:.3f} | {a['examples_per_step']:.0f} | "
                         f"{100 * used:.0f}% | {mem} |")
    lines.append("")
    for kind, m in results["models"].items():
        target = TARGETS[f"{kind}_mfu"]
        got = m["arms"]["packed_sdpa"]["mfu"]
        verdict = "n/a" if got is None else ("met" if got >= target else "NOT met")
        lines.append(f"- {kind}: packed / padded tokens/s = **{m['packed_over_padded']:.2f}x** (target >= "
                     f"{TARGETS['packed_over_padded']:g}x: {'met' if m['packed_over_padded'] >= TARGETS['packed_over_padded'] else 'NOT met'}); "
                     f"packed MFU {percent(got)} (target >= {100 * target:.0f}%: {verdict}); "
                     f"{m['examples_per_packed_row']:.1f} examples per packed row; padded arm: "
                     f"{m['examples_per_padded_step']} examples per step in {m['padded_micro_batches']} micro-batch(es).")
    for kind, m in results["models"].items():
        for arm, a in m["arms"].items():
            if not a["available"]:
                lines.append(f"- {kind} {arm} not run: {a['reason']}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, short rows, fp32 on the CPU (a test)")
    parser.add_argument("--kinds", nargs="+", choices=sorted(MODELS), default=["decoder", "encdec"])
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step (default: decoder 8, enc-dec 16)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per arm (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm, at most (default 10; smoke 2)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop an arm's timed steps after this long")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (overrides the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--write-benchmarks", default=None, help="rewrite this benchmark's section of this file")
    args = parser.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = 1 if args.smoke else 3
    if args.steps is None:
        args.steps = 2 if args.smoke else 10
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup-steps and --steps must be at least 1 (the first step is never timed)")
    if args.smoke:
        import torch

        torch.set_num_threads(min(2, torch.get_num_threads()))
    results = measure(args)
    if args.json:
        print(json.dumps(results))
    else:
        print(render(results))
    if args.write_benchmarks:
        benchmarks_md.write_section(Path(args.write_benchmarks), render(results), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
