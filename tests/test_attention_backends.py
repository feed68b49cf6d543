"""Attention backends for packed rows (``model.attn_implementation``): each one against the sdpa 4-D mask path.

The sdpa path is the reference: tests/test_features.py proves it equal to running every example alone. Here
every other backend must give the same per-example losses (and choice scores) and the same parameter
gradients, in fp32, on rows that pack several examples of different lengths plus padding, batch >= 2:

* flex_attention (BlockMasks): Llama decoder, prefix-LM, rows with answer choices, and T5 (whose relative
  position bias needs :func:`train.modeling.models.register_batched_bias_flex_attention`). On CPU this runs
  torch's uncompiled flex reference, backward included (see :func:`flex_reference`); on CUDA the compiled
  kernels (skips without CUDA).
* flash_attention_2 (varlen, no mask): on CPU through a stand-in for the kernel that computes what
  ``flash_attn_varlen_func(causal=True)`` computes, one sdpa call per piece, so everything but the kernel is
  the real path; on CUDA with flash_attn the real kernel (skips otherwise).

Then the clear errors: every backend that cannot run here, for this model or this config fails at start.
"""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, BloomConfig, GPT2Config, LlamaConfig, T5Config

from conftest import REPO_ROOT
from train.config import ModelConfig, load_config
from train.data.packing import Packer
from train.errors import ConfigError
from train.modeling import losses, models
from train.modeling.features import collate, model_forward, segment_block_mask, segment_mask, varlen_sequences
from train.modeling.models import build_model, check_attn_implementation, model_info, varlen_limitation

VOCAB = 128
CAPS = {"encdec": {"max_input_tokens": 24, "max_target_tokens": 16}, "decoder": {"max_tokens": 40},
        "prefix_lm": {"max_tokens": 40}}
CUDA = torch.cuda.is_available()
FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def model_config(kind: str, **overrides):
    """A tiny transformers config (width 32, 2 layers, fp32, no dropout): T5 for encdec, Llama (GQA) otherwise."""
    if kind == "encdec":
        return T5Config(**{**dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=VOCAB,
                                  dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
                           **overrides})
    return LlamaConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64), **overrides})


def build(kind: str, attention: str, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """A model built the way the trainer builds it (:func:`build_model`), with ``like``'s weights when given."""
    torch.manual_seed(0)
    cfg = ModelConfig(config="<tiny test config>", attn_implementation=attention)  # build_model only needs it set
    model = build_model(cfg, model_config(kind), kind).eval()
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def examples(n: int, *, choices: bool, seed: int = 0) -> list[dict]:
    """Examples of different lengths; with ``choices`` two of every three carry 1-2 wrong answer choices."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = {"input_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 8))],
              "target_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 4))] + [1],
              "task": "t", "index": i, "choice_ids": [], "choice_lengths": []}
        if choices and i % 3 != 2:
            for _ in range(rng.randint(1, 2)):
                choice = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 3))] + [1]
                ex["choice_ids"] += choice
                ex["choice_lengths"].append(len(choice))
        out.append(ex)
    return out


def packed_batch(kind: str, *, choices: bool = False) -> dict[str, torch.Tensor]:
    rows = list(Packer(kind, window=4, choices=choices, **CAPS[kind]).rows(iter(examples(10, choices=choices))))
    batch = collate(rows, kind, pad_id=0, decoder_start_id=0, **CAPS[kind])
    seg = batch["target_segment_ids"] if kind == "encdec" else batch["segment_ids"]
    assert seg.shape[0] >= 2 and seg.max() >= 3, "rows must really pack several examples"
    assert (seg == 0).any(), "rows must carry padding"
    return batch


def losses_and_grads(model: torch.nn.Module, batch: dict, kind: str) -> tuple[list[float], torch.Tensor | None, list]:
    """Per-example LM losses, choice scores (rows with choices) and every parameter's gradient."""
    model.zero_grad()
    logits = model_forward(model, batch, kind)
    nll = losses.token_nll(logits, batch["labels"])
    total = nll.sum()
    scores = None
    if "choice_slot" in batch:
        scores = losses.choice_scores(logits, batch)
        total = total - scores.sum()
    total.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    return losses.per_example_losses(nll, batch), scores, grads


def max_differences(model: torch.nn.Module, reference: torch.nn.Module, batch: dict, kind: str) -> tuple[float, float]:
    """Max |difference| of per-example losses (and choice scores), and of parameter gradients, vs ``reference``."""
    loss, scores, grads = losses_and_grads(model, batch, kind)
    ref_loss, ref_scores, ref_grads = losses_and_grads(reference, batch, kind)
    assert len(loss) == len(ref_loss) >= 6
    loss_diff = max(abs(a - b) for a, b in zip(loss, ref_loss))
    if scores is not None:
        loss_diff = max(loss_diff, (scores - ref_scores).abs().max().item())
    missing = [name for (name, _), g in zip(model.named_parameters(), grads) if g is None]
    assert not missing, f"no gradient reached {missing}"
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
    return loss_diff, grad_diff


# ------------------------------------------------------------------------------------------ flex_attention


@pytest.fixture
def flex_reference(monkeypatch):
    """Run flex_attention through torch's uncompiled reference implementation, backward included, on CPU.

    transformers wraps flex_attention in torch.compile (on CPU: ~20 s to compile, and no backward), and
    torch's public ``flex_attention`` refuses a backward on CPU up front (``_validate_device``). The
    reference implementation underneath has one; these two patches reach it, so the tests compare what this
    repo builds (BlockMasks, T5's batched bias) with the sdpa masks, forward and backward. They do not test
    the fused kernels: test_flex_on_cuda does, where there is CUDA. The refusals of flex on CPU
    (:func:`check_attn_implementation`) are lifted too: they guard against those kernels, unused here.
    """
    import torch.nn.attention.flex_attention as flex
    import transformers.integrations.flex_attention as hf_flex

    monkeypatch.setattr(models, "check_attn_implementation", lambda *args, **kwargs: None)

    masks = []  # the block mask of every flex_attention call, so a test can see the path was taken

    def uncompiled(query, key, value, training=False, **kwargs):
        masks.append(kwargs["block_mask"])
        return flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)
    return masks


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind, choices", [("decoder", False), ("prefix_lm", False), ("decoder", True),
                                           ("encdec", False), ("encdec", True)])
def test_flex_attention_equals_the_sdpa_masks(flex_reference, kind, choices):
    batch = packed_batch(kind, choices=choices)
    reference = build(kind, "sdpa")
    model = build(kind, "flex_attention", like=reference)
    loss_diff, grad_diff = max_differences(model, reference, batch, kind)
    print(f"flex_attention {kind} choices={choices}: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    layers = 6 if kind == "encdec" else 2  # T5: encoder self, decoder self and cross-attention, 2 layers each
    assert len(flex_reference) == layers and all(isinstance(m, BlockMask) for m in flex_reference)
    assert loss_diff <= 1e-5 and grad_diff <= 1e-5, (loss_diff, grad_diff)


def test_t5_flex_runs_under_the_batched_bias_name(flex_reference):
    # transformers' own flex path reads T5's (1, heads, q, k) bias at position_bias[batch_idx]: out of bounds
    # for row 1 on. The registered wrapper broadcasts it; transformers' flex checks still apply (the name).
    assert "flex_attention" in build("encdec", "flex_attention").config._attn_implementation
    assert build("decoder", "flex_attention").config._attn_implementation == "flex_attention"


def test_block_mask_and_float_mask_encode_the_same_rule():
    from torch.nn.attention.flex_attention import create_mask

    batch = packed_batch("prefix_lm", choices=True)
    seg, prefix, branch = batch["segment_ids"], batch["prefix_mask"], batch["branch_ids"]
    rule = dict(causal=True, prefix=prefix, query_branch=branch, key_branch=branch)
    block = segment_block_mask(seg, seg, **rule)
    assert block.shape == (seg.shape[0], 1, seg.shape[1], seg.shape[1])  # 40-token rows: no padding to 128 needed
    allowed = create_mask(block.mask_mod, seg.shape[0], 1, seg.shape[1], seg.shape[1], device="cpu")
    assert torch.equal(allowed, segment_mask(seg, seg, torch.float32, **rule) == 0)


@pytest.mark.skipif(not CUDA, reason="the compiled flex_attention kernels with a backward need CUDA (no GPU here)")
@pytest.mark.parametrize("kind", ["decoder", "prefix_lm", "encdec"])
def test_flex_on_cuda(kind):
    batch = {k: v.cuda() for k, v in packed_batch(kind, choices=kind != "prefix_lm").items()}
    reference = build(kind, "sdpa").cuda()
    model = build(kind, "flex_attention", like=reference).cuda()
    loss_diff, grad_diff = max_differences(model, reference, batch, kind)
    print(f"flex_attention on CUDA {kind}: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff <= 1e-4 and grad_diff <= 1e-4, (loss_diff, grad_diff)


# ------------------------------------------------------------------------------------------ flash_attention_2


def test_varlen_sequences_golden():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 0, 0, 0]])
    out = varlen_sequences(seg)
    # Pieces: row 0 -> 1 1 1 | 2 2 | pad; row 1 -> one piece; row 2 -> 1 | 2 | 3 | pad pad pad.
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 12, 13, 14, 15, 18]
    assert out["cu_seq_lens_q"].dtype == torch.int32 and out["cu_seq_lens_k"] is out["cu_seq_lens_q"]
    assert out["max_length_q"] == out["max_length_k"] == 6 and isinstance(out["max_length_q"], int)


def reference_varlen_attention(module, query, key, value, attention_mask, *, cu_seq_lens_q, cu_seq_lens_k,
                               max_length_q, max_length_k, scaling=None, dropout=0.0, **kwargs):
    """CPU stand-in for transformers' flash_attention_2: ``flash_attn_varlen_func(causal=True)`` as sdpa per piece.

    Same signature and layout as transformers' attention functions: query (batch, heads, seq, dim), key and
    value (batch, kv_heads, seq, dim) in; (batch, seq, heads, dim) out. The keyword-only boundaries make it
    fail loudly if the model did not hand them through to its attention.
    """
    assert attention_mask is None, "the varlen path must reach the attention without a mask"
    assert cu_seq_lens_k is cu_seq_lens_q and max_length_q == max_length_k
    batch, heads, seq, dim = query.shape
    groups = heads // key.shape[1]

    def flat(x):  # (batch, heads, seq, dim) -> (batch * seq, heads, dim): the flattened token order
        return x.transpose(1, 2).reshape(batch * seq, heads, dim)

    q, k, v = flat(query), flat(key.repeat_interleave(groups, 1)), flat(value.repeat_interleave(groups, 1))
    bounds = cu_seq_lens_q.tolist()
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scaling
        ).transpose(0, 1)  # (piece, heads, dim)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    assert max(e - s for s, e in zip(bounds[:-1], bounds[1:])) == max_length_q
    return torch.cat(pieces).reshape(batch, seq, heads, dim), None


def test_flash_varlen_path_equals_the_sdpa_masks(monkeypatch):
    batch = packed_batch("decoder")
    reference = build("decoder", "sdpa")
    model = build("decoder", "sdpa", like=reference)
    # Everything transformers does for flash_attention_2 (mask creation, kwargs down to the attention) but
    # the kernel: the model is switched to that name and only the kernel is replaced, for this test.
    calls = []

    def kernel(*args, **kwargs):
        calls.append(kwargs["cu_seq_lens_q"])
        return reference_varlen_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", kernel)
    model.config._attn_implementation = "flash_attention_2"
    loss_diff, grad_diff = max_differences(model, reference, batch, "decoder")
    assert len(calls) == 2, "each of the 2 layers must run the varlen kernel once"
    assert calls[0].numel() > batch["segment_ids"].shape[0] + 1, "several pieces per row"
    print(f"flash_attention_2 (varlen stand-in) decoder: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff <= 1e-5 and grad_diff <= 1e-5, (loss_diff, grad_diff)


@pytest.mark.skipif(not (CUDA and FLASH_ATTN), reason="needs CUDA and the flash_attn package (neither is here)")
def test_flash_attention_2_on_cuda():
    batch = {k: v.cuda() for k, v in packed_batch("decoder").items()}
    reference = build("decoder", "sdpa").cuda()
    model = build("decoder", "flash_attention_2", like=reference).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # FlashAttention computes in bf16 / fp16 only
        loss_diff, grad_diff = max_differences(model, reference, batch, "decoder")
    scale = max(p.grad.abs().max().item() for p in reference.parameters())
    print(f"flash_attention_2 on CUDA (bf16): loss {loss_diff:.2e} grad {grad_diff:.2e} of {scale:.2e}")
    assert loss_diff <= 2e-2 and grad_diff <= 2e-2 * scale, (loss_diff, grad_diff)


# ------------------------------------------------------------------------------------------ clear errors


def refusal(attention: str, kind: str, *, training: bool = True, **overrides) -> str:
    cfg = ModelConfig(config="configs/models/tiny.json", attn_implementation=attention)
    config = (GPT2Config(n_embd=32, n_layer=1, n_head=2) if kind == "gpt2" else
              BloomConfig(hidden_size=32, n_layer=1, n_head=2) if kind == "bloom" else model_config(kind, **overrides))
    with pytest.raises(ConfigError) as err:
        check_attn_implementation(cfg, config, "decoder" if kind in ("gpt2", "bloom") else kind, training=training)
    message = str(err.value)
    assert f"`model.attn_implementation={attention}`" in message and "configs/models/tiny.json" in message
    assert "sdpa" in message, "the message must name the fix"
    return message


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def pretend_flash_attn(monkeypatch, installed: bool) -> None:
    find_spec = importlib.util.find_spec
    spec = object() if installed else None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: spec if name == "flash_attn"
                        else find_spec(name, *rest))


@pytest.fixture
def fake_cuda_and_flash_attn(monkeypatch):
    """Pretend the machine could run both backends, to reach the checks behind the availability ones."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pretend_flash_attn(monkeypatch, installed=True)


def test_flash_attention_2_needs_the_package_and_cuda(monkeypatch):
    pretend_flash_attn(monkeypatch, installed=False)
    assert "`flash_attn` package is not installed" in refusal("flash_attention_2", "decoder")
    pretend_flash_attn(monkeypatch, installed=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA GPUs only" in refusal("flash_attention_2", "decoder", training=False)  # evaluation too


@pytest.mark.usefixtures("fake_cuda_and_flash_attn")
def test_flash_attention_2_refuses_what_varlen_cannot_express():
    assert "prefix-LM needs bidirectional attention" in refusal("flash_attention_2", "prefix_lm")
    assert "_supports_flash_attn" in refusal("flash_attention_2", "encdec")  # T5
    assert varlen_limitation("decoder", choices=False) is None
    assert "answer choices" in varlen_limitation("decoder", choices=True)  # what the forward refuses for branch ids


@pytest.mark.usefixtures("fake_cuda_and_flash_attn")
def test_flex_attention_refuses_models_without_it_and_attention_dropout():
    message = refusal("flex_attention", "gpt2")
    assert "GPT2LMHeadModel" in message and "_supports_flex_attn" in message
    assert "_supports_flex_attn" in refusal("flex_attention", "bloom")
    assert "`attention_dropout` = 0.1" in refusal("flex_attention", "decoder", attention_dropout=0.1)
    assert "`dropout_rate` = 0.1" in refusal("flex_attention", "encdec", dropout_rate=0.1)  # T0 / mT0 checkpoints


@pytest.mark.usefixtures("no_cuda")
def test_flex_attention_cannot_train_on_cpu_and_evaluates_decoders_only():
    assert "no backward pass on CPU" in refusal("flex_attention", "decoder")
    assert "fails to compile flex_attention with T5" in refusal("flex_attention", "encdec", training=False)
    check_attn_implementation(ModelConfig(config="x", attn_implementation="flex_attention"), model_config("decoder"),
                              "decoder", training=False)


def test_flex_attention_needs_torch_flex(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # as on a torch without it
    assert "has no torch.nn.attention.flex_attention" in refusal("flex_attention", "decoder")


@pytest.mark.usefixtures("no_cuda")
def test_the_checks_fire_at_the_start_of_training_and_before_a_model_is_built():
    from transformers import ByT5Tokenizer

    cfg = ModelConfig(config="configs/models/tiny.json", attn_implementation="flex_attention")
    with pytest.raises(ConfigError, match="no backward pass on CPU"):  # the trainer's first call (setup_run)
        model_info(cfg, model_config("decoder", vocab_size=384), ByT5Tokenizer())
    cfg.attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="flash_attention_2"):  # evaluation builds models through build_model
        build_model(cfg, model_config("decoder"), "decoder")


@pytest.mark.parametrize("overrides, expected", [
    (["model.attn_implementation=flash_attn"], "must be one of 'sdpa', 'eager', 'flex_attention', 'flash_attention_2'"),
    (["model.attn_implementation=flash_attention_2", "trainer.precision=fp32"], "bf16 or fp16 only"),
    (["model.attn_implementation=flash_attention_2", "trainer.precision=bf16",
      "trainer.loss_weights.rank_classification=1"], "answer choices"),
    (["model.attn_implementation=flex_attention", "trainer.cpu=true"], "no backward pass on CPU"),
])
def test_config_refuses_attention_that_contradicts_the_run(monkeypatch, overrides, expected):
    monkeypatch.chdir(REPO_ROOT)  # config paths are relative to the repository root
    with pytest.raises(ConfigError, match="model.attn_implementation") as err:
        load_config(None, ["model.config=configs/models/llama_tiny.json", "model.tokenizer=byt5", *overrides])
    assert expected in str(err.value)
