"""Feature converter: golden tensors, and packed == unpacked (losses and gradients) for every model kind.

Tiny random models (fp32, CPU, dropout off) built from transformers configs. The packed forward must give
each example the same per-token NLL and the same parameter gradients as running it alone, unpacked,
through the model's own standard path.
"""

import random
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from train.errors import ConfigError, DataError
from train.modeling.features import IGNORE_INDEX, collate, model_forward, reference_target_nll
from train.modeling.losses import per_example_losses, token_nll
from train.data.packing import Packer, build_row

VOCAB = 128
CAP = dict(max_input_tokens=24, max_target_tokens=12, max_tokens=32)


def t5(attn: str) -> torch.nn.Module:
    config = T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=VOCAB, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation=attn,
    )
    return T5ForConditionalGeneration(config).eval()


def llama(attn: str) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def gpt2(attn: str) -> torch.nn.Module:
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).eval()


def bloom(attn: str) -> torch.nn.Module:
    config = BloomConfig(
        hidden_size=32, n_layer=2, n_head=2, vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0,
        attn_implementation=attn,
    )
    return BloomForCausalLM(config).eval()


def examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "input_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 9))],
            "target_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 5))],
            "task": f"t{i % 2}",
            "index": i,
        }
        for i in range(n)
    ]


def pack(exs: list[dict], kind: str) -> tuple[list[dict], dict]:
    rows = list(Packer(kind, window=4, **_caps(kind)).rows(iter(exs)))
    return rows, collate(rows, kind, pad_id=0, decoder_start_id=0, **_caps(kind))


def _caps(kind: str) -> dict:
    if kind == "encdec":
        return {"max_input_tokens": CAP["max_input_tokens"], "max_target_tokens": CAP["max_target_tokens"]}
    return {"max_tokens": CAP["max_tokens"]}


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def assert_packed_equals_unpacked(model: torch.nn.Module, kind: str) -> None:
    exs = examples(10)
    rows, batch = pack(exs, kind)
    assert max(len(r["indices"]) for r in rows) >= 3, "test needs rows that really hold several examples"
    order = [i for r in rows for i in r["indices"]]

    model.zero_grad()
    nll = token_nll(model_forward(model, batch, kind), batch["labels"])
    packed = per_example_losses(nll, batch)
    nll.sum().backward()
    packed_grads = grads(model)

    model.zero_grad()
    refs = [reference_target_nll(model, exs[i], kind, decoder_start_id=0) for i in order]
    torch.stack([r.sum() for r in refs]).sum().backward()
    ref_grads = grads(model)

    loss_diff = max(abs(a - r.mean().item()) for a, r in zip(packed, refs))
    grad_diff = max((a - b).abs().max().item() for a, b in zip(packed_grads, ref_grads))
    assert len(packed) == len(exs)
    assert loss_diff <= 1e-5, f"{type(model).__name__}/{kind}: per-example loss differs by {loss_diff}"
    assert grad_diff <= 1e-5, f"{type(model).__name__}/{kind}: gradient differs by {grad_diff}"
    assert any(g.abs().sum() > 0 for g in packed_grads)


# ------------------------------------------------------------------------------------------ golden tensors


def test_collate_encdec_golden():
    row = build_row(
        [{"input_ids": [5, 6, 1], "target_ids": [7, 1]}, {"input_ids": [8, 1], "target_ids": [9, 10, 1]}], "encdec"
    )
    batch = collate([row], "encdec", pad_id=0, decoder_start_id=0, max_input_tokens=7, max_target_tokens=6)
    assert batch["input_ids"].tolist() == [[5, 6, 1, 8, 1, 0, 0]]
    assert batch["input_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    # Shift right per segment: the start token (0) opens every segment; padding stays pad.
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 0, 9, 10, 0]]
    assert batch["labels"].tolist() == [[7, 1, 9, 10, 1, IGNORE_INDEX]]
    assert batch["target_segment_ids"].tolist() == [[1, 1, 2, 2, 2, 0]]
    assert batch["loss_segment_ids"].tolist() == [[1, 1, 2, 2, 2, 0]]


def test_collate_decoder_labels_are_preshifted_within_segment():
    row = build_row([{"input_ids": [5, 6], "target_ids": [7, 1]}, {"input_ids": [8], "target_ids": [9, 1]}], "decoder")
    batch = collate([row], "decoder", pad_id=0, max_tokens=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 8, 9, 1, 0, 0]]
    I = IGNORE_INDEX  # noqa: E741
    # Position 1 (last input token) predicts the first target token 7; position 3 (segment 1's eos) must
    # not predict segment 2's first token 8.
    assert batch["labels"].tolist() == [[I, 7, 1, I, 9, 1, I, I, I]]
    assert batch["loss_segment_ids"].tolist() == [[0, 1, 1, 0, 2, 2, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 0]]


def test_collate_errors_name_the_problem():
    row = build_row([{"input_ids": [5] * 10, "target_ids": [1]}], "decoder")
    with pytest.raises(DataError, match="more than the capacity 8"):
        collate([row], "decoder", pad_id=0, max_tokens=8)
    with pytest.raises(DataError, match=r"lacks \['segment_ids'"):
        collate([{"input_ids": [1]}], "decoder", pad_id=0, max_tokens=8)


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "make, kind",
    [(llama, "decoder"), (gpt2, "decoder"), (llama, "prefix_lm"), (gpt2, "prefix_lm")],
    ids=["llama-rotary", "gpt2-absolute", "llama-prefix_lm", "gpt2-prefix_lm"],
)
def test_packed_equals_unpacked_decoders(make, kind, attn):
    torch.manual_seed(0)
    assert_packed_equals_unpacked(make(attn), kind)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_t5(attn):
    torch.manual_seed(0)
    assert_packed_equals_unpacked(t5(attn), "encdec")


def test_packed_equals_unpacked_bloom_alibi():
    # BLOOM has no sdpa implementation (FIELD_NOTES.md); eager only.
    torch.manual_seed(0)
    assert_packed_equals_unpacked(bloom("eager"), "decoder")


def test_guard_t5_4d_mask_path_still_exact():
    """Fails if a transformers upgrade breaks the two-call 4-D mask path for T5 (it once did elsewhere)."""
    torch.manual_seed(1)
    model = t5("sdpa")
    exs = examples(6, seed=1)
    rows, batch = pack(exs, "encdec")
    with torch.no_grad():
        nll = token_nll(model_forward(model, batch, "encdec"), batch["labels"])
        packed = sum(per_example_losses(nll, batch))
        order = [i for r in rows for i in r["indices"]]
        unpacked = sum(reference_target_nll(model, exs[i], "encdec", decoder_start_id=0).mean().item() for i in order)
    assert abs(packed - unpacked) <= 1e-5, (
        f"T5 packed loss {packed} != unpacked {unpacked} with transformers {transformers.__version__}: "
        "the 4-D mask path of train.modeling.features.model_forward no longer isolates segments"
    )


# ------------------------------------------------------------------------------------------ isolation


@pytest.mark.parametrize(
    "make, kind", [(llama, "decoder"), (t5, "encdec"), (bloom, "decoder")], ids=["llama", "t5", "bloom"]
)
def test_perturbing_segment_one_leaves_other_segments_untouched(make, kind):
    """Megatron-style: change one input token of segment 1; logits of other segments and rows must not move."""
    torch.manual_seed(0)
    model = make("eager")
    rows, batch = pack(examples(10), kind)
    seg_key = "target_segment_ids" if kind == "encdec" else "segment_ids"
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % VOCAB  # row 0, segment 1, first input token
    with torch.no_grad():
        before = model_forward(model, batch, kind)
        after = model_forward(model, changed, kind)
    seg = batch[seg_key]
    in_seg1 = torch.zeros_like(seg, dtype=torch.bool)
    in_seg1[0] = seg[0] == 1
    others = (seg > 0) & ~in_seg1
    assert others.sum() > 0
    assert (before - after)[others].abs().max().item() <= 1e-6
    assert (before - after)[in_seg1].abs().max().item() > 1e-4, "the perturbation should change segment 1"


def test_prefix_lm_inputs_attend_bidirectionally():
    torch.manual_seed(0)
    model = llama("sdpa")
    row = build_row([{"input_ids": [5, 6, 7], "target_ids": [8, 1]}], "prefix_lm")
    batch = collate([row], "prefix_lm", pad_id=0, max_tokens=6)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 2] = 9  # the LAST input token
    with torch.no_grad():
        moved = {
            kind: (model_forward(model, batch, kind) - model_forward(model, changed, kind))[0, 0].abs().max().item()
            for kind in ("prefix_lm", "decoder")
        }
    assert moved["prefix_lm"] > 1e-4  # the first input token sees the last one
    assert moved["decoder"] == 0.0  # causal: it cannot


# ------------------------------------------------------------------------------------------ dtype


@pytest.mark.parametrize("make, kind", [(t5, "encdec"), (llama, "decoder")], ids=["t5", "llama"])
def test_bf16_autocast_is_finite_and_close(make, kind):
    torch.manual_seed(0)
    model = make("sdpa")
    _, batch = pack(examples(10), kind)
    with torch.no_grad():
        fp32 = token_nll(model_forward(model, batch, kind), batch["labels"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model_forward(model, batch, kind)
        bf16 = token_nll(logits, batch["labels"])
    assert torch.isfinite(logits).all(), "padding rows must not produce NaN/inf"
    assert (fp32 - bf16).abs().max().item() < 0.1


# ------------------------------------------------------------------------------------------ pad to longest

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [  # lengths from a few tokens to ~60, so micro-batch widths differ from each other and from the capacity
    ("translate English to German: The house is wonderful.", "Das Haus ist wunderbar."),
    ("Is this review positive? Great film.", "yes"),
    ("Question: what colour is the sky on a clear day, and why does it look that way to people standing on the "
     "ground at noon? Think about how sunlight is scattered by the molecules of the atmosphere. Answer:", "blue"),
    ("Summarize: the committee met on Tuesday and agreed to postpone the vote until next month.", "Vote postponed."),
    ("Topic of: Stocks rallied after the central bank held rates.", "Business"),
    ("Premise: A man plays a guitar on stage. Hypothesis: A person makes music. Entailment?", "yes"),
    ("Fill in: The capital of France is", "Paris"),
    ("Which is heavier, a kilogram of feathers or a kilogram of iron? Explain briefly for a child who is eight "
     "years old and has just started learning about weight and mass at school.", "They weigh the same."),
]


def _tokenized(kind: str) -> list[dict]:
    """PROMPTS tokenized by the pipeline's own tokenizer step with the shipped T5 tokenizer."""
    import datasets
    from transformers import AutoTokenizer

    from train.data.tokenization import tokenize_prompted

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "configs" / "tokenizers" / "t5"))
    prompted = datasets.Dataset.from_dict({"inputs": [p for p, _ in PROMPTS], "targets": [[t] for _, t in PROMPTS],
                                           "task": ["t"] * len(PROMPTS), "index": list(range(len(PROMPTS)))})
    return tokenize_prompted(prompted, tokenizer, kind).to_list()


def _shipped_tiny(name: str, kind: str) -> torch.nn.Module:
    """configs/models/<name> (vocab 32128, the T5 tokenizer's), randomly initialised, seeded."""
    from train.config import ModelConfig
    from train.modeling.models import build_model, load_model_config

    spec = ModelConfig(config=str(REPO / "configs" / "models" / name), kind=kind)
    torch.manual_seed(0)
    return build_model(spec, load_model_config(spec), kind).eval()


SHIPPED_CAPS = {"encdec": dict(max_input_tokens=96, max_target_tokens=16), "decoder": dict(max_tokens=96),
                "prefix_lm": dict(max_tokens=96)}
MICRO = 3  # rows per micro-batch, as trainer.micro_batch_size


def _micro_batches(rows: list[dict], kind: str, pad_to: str) -> list[dict]:
    return [collate(rows[i:i + MICRO], kind, pad_id=0, decoder_start_id=0, pad_to=pad_to, **SHIPPED_CAPS[kind])
            for i in range(0, len(rows), MICRO)]


def _run(model: torch.nn.Module, rows: list[dict], kind: str, pad_to: str) -> tuple[dict, list[torch.Tensor]]:
    """{example index: mean NLL} and the parameter gradients of the summed NLL, micro-batch by micro-batch."""
    model.zero_grad()
    losses = {}
    chunks = [rows[i:i + MICRO] for i in range(0, len(rows), MICRO)]
    for chunk, batch in zip(chunks, _micro_batches(rows, kind, pad_to)):
        nll = token_nll(model_forward(model, batch, kind), batch["labels"])
        nll.sum().backward()
        losses.update(zip((i for r in chunk for i in r["indices"]), per_example_losses(nll, batch)))
    return losses, grads(model)


@pytest.mark.parametrize("name, kind", [("t5_tiny.json", "encdec"), ("llama_tiny.json", "decoder"),
                                        ("llama_tiny.json", "prefix_lm")])
def test_unpacked_padded_to_longest_equals_packed(name, kind):
    """data.packing=false with pad_to=longest (its default) gives every example the loss packing gives it."""
    exs = _tokenized(kind)
    model = _shipped_tiny(name, kind)
    packed_rows = list(Packer(kind, window=4, **SHIPPED_CAPS[kind]).rows(iter(exs)))
    unpacked_rows = list(Packer(kind, pack=False, **SHIPPED_CAPS[kind]).rows(iter(exs)))
    assert max(len(r["indices"]) for r in packed_rows) >= 3, "packed rows must hold several examples"
    packed, packed_grads = _run(model, packed_rows, kind, "capacity")
    longest, longest_grads = _run(model, unpacked_rows, kind, "longest")
    capacity, _ = _run(model, unpacked_rows, kind, "capacity")  # the old unpacked baseline
    assert sorted(packed) == sorted(longest) == sorted(capacity) == list(range(len(PROMPTS)))
    loss_diff = max(abs(longest[i] - packed[i]) for i in packed)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(longest_grads, packed_grads))
    assert loss_diff <= 1e-5, f"{name}/{kind}: per-example loss differs from packed by {loss_diff}"
    assert max(abs(longest[i] - capacity[i]) for i in packed) <= 1e-5
    assert grad_diff <= 1e-5, f"{name}/{kind}: gradient differs from packed by {grad_diff}"


@pytest.mark.parametrize("kind", ["encdec", "decoder", "prefix_lm"])
def test_collated_width_is_the_micro_batch_longest_or_the_capacity(kind):
    exs = _tokenized(kind)
    rows = list(Packer(kind, pack=False, **SHIPPED_CAPS[kind]).rows(iter(exs)))
    caps = SHIPPED_CAPS[kind]
    sides = ({"input_ids": ("input_ids", "max_input_tokens"), "labels": ("target_ids", "max_target_tokens")}
             if kind == "encdec" else {"input_ids": ("input_ids", "max_tokens")})
    widths = set()
    for i, (longest, capacity) in enumerate(zip(_micro_batches(rows, kind, "longest"),
                                                _micro_batches(rows, kind, "capacity"))):
        chunk = rows[i * MICRO:(i + 1) * MICRO]
        for tensor, (field, cap) in sides.items():
            expected = max(len(r[field]) for r in chunk)  # enc-dec: encoder and decoder side each their own
            assert longest[tensor].shape == (len(chunk), expected) and expected < caps[cap]
            assert capacity[tensor].shape == (len(chunk), caps[cap])
            widths.add(expected)
        assert all(v.shape[-1] == longest["input_ids"].shape[-1] for k, v in longest.items()
                   if k in ("input_segment_ids", "input_positions", "segment_ids", "position_ids", "prefix_mask"))
    assert len(widths) >= 2, "micro-batches should differ in width"
    with pytest.raises(DataError, match="more than the capacity 8"):  # the capacity still bounds a row
        collate(rows[:1], kind, pad_id=0, decoder_start_id=0, pad_to="longest",
                **{k: 8 for k in SHIPPED_CAPS[kind]})
    with pytest.raises(ConfigError, match="unknown pad_to 'shortest'"):
        collate(rows[:1], kind, pad_id=0, decoder_start_id=0, pad_to="shortest", **SHIPPED_CAPS[kind])
