"""Feature converter: golden tensors, and packed == unpacked (losses and gradients) for every model kind.

Tiny random models (fp32, CPU, dropout off) built from transformers configs. The packed forward must give
each example the same per-token NLL and the same parameter gradients as running it alone, unpacked,
through the model's own standard path.
"""

import random

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

from train.errors import DataError
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
