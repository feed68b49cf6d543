"""``trainer.loss_chunk_tokens``: the output layer applied chunk by chunk, over the label positions only.

The chunked loss must equal the full-logits loss of today's path, and so must every parameter gradient
(fp32, within 1e-5; relative to the scale where that exceeds 1), for T5 (tied and untied embeddings), a
Llama decoder, a prefix-LM and GPT-2 on packed rows, every normalisation mode, T-Few's choice losses, a
micro-batch without a label, peft LoRA on the output layer and a DDP wrapper; models that change their
logits after the output layer are refused; and ``mtf train`` logs the same losses with and without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from conftest import FAST
from test_adapters import _tiny as adapter_model, _wrap
from test_features import VOCAB, examples, gpt2, llama, pack, t5
from test_tfew_losses import _examples as choice_examples, _tiny as tfew_model
from test_trainer import _losses, _mtf
from train.config import load_config
from train.data.packing import Packer
from train.errors import ConfigError
from train.modeling import losses
from train.modeling.features import IGNORE_INDEX, collate, head_inputs, model_forward

CHUNKS = (1, 7, 64)
TOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops: on a busy 2-core machine two OpenMP threads made a step of these models 50-100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t5_untied() -> torch.nn.Module:
    config = T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=VOCAB, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return T5ForConditionalGeneration(config).eval()


MODELS = {  # name -> (builder, kind)
    "t5_tied": (lambda: t5("sdpa"), "encdec"),
    "t5_untied": (t5_untied, "encdec"),
    "llama": (lambda: llama("sdpa"), "decoder"),
    "llama_prefix_lm": (lambda: llama("sdpa"), "prefix_lm"),
    "gpt2": (lambda: gpt2("sdpa"), "decoder"),
}


def loss_and_grads(model, batch, kind, mode, names, chunk):
    """(the step loss of ``batch``, every trainable parameter's gradient); ``chunk`` None = full logits.

    The loss is what the trainer calls backward on (:func:`losses.weighted_loss` with this batch's
    denominators, each loss weighted 1).
    """
    model.zero_grad(set_to_none=True)
    logits = (model_forward(model, batch, kind) if chunk is None
              else head_inputs(model, batch, kind, chunk_tokens=chunk))
    numerators = losses.local_numerators(logits, batch, mode, names)
    weights = dict.fromkeys(names, 1.0)
    loss = losses.weighted_loss(numerators, losses.local_denominators(batch, mode, names), weights, mode=mode)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params), "a parameter got no gradient (DDP would hang or fail)"
    return loss.item(), [p.grad.clone() for p in params]


def differences(model, batch, kind, mode, names, chunk, reference=None) -> tuple[float, float]:
    """Largest difference of the loss and of any gradient element from the full-logits path, each relative to
    its scale when that exceeds 1: fp32 keeps ~7 digits, and ``sum`` mode or an untied T5 head at random init
    (std 1) gives losses in the hundreds and gradients in the tens, where 1e-5 is below one rounding step."""
    ref_loss, ref_grads = reference or loss_and_grads(model, batch, kind, mode, names, None)
    loss, grads = loss_and_grads(model, batch, kind, mode, names, chunk)
    return (abs(loss - ref_loss) / max(1.0, abs(ref_loss)),
            max(((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() for a, b in zip(grads, ref_grads)))


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_loss_and_gradients_equal_the_full_logits(name):
    build, kind = MODELS[name]
    torch.manual_seed(0)
    model = build()
    rows, batch = pack(examples(10), kind)
    assert max(len(r["indices"]) for r in rows) >= 3, "the rows must really be packed"
    worst = 0.0
    for mode in losses.MODES:
        reference = loss_and_grads(model, batch, kind, mode, ["lm"], None)
        for chunk in CHUNKS:
            loss_diff, grad_diff = differences(model, batch, kind, mode, ["lm"], chunk, reference)
            worst = max(worst, loss_diff, grad_diff)
            assert loss_diff <= TOL and grad_diff <= TOL, (name, mode, chunk, loss_diff, grad_diff)
    print(f"{name}: max |difference| of loss and gradients {worst:.2e}")


def test_only_label_positions_go_through_the_output_layer_and_t5_keeps_its_rescaling():
    model = t5("sdpa")  # tied embeddings: the decoder output is scaled by d_model**-0.5 before the head
    _, batch = pack(examples(10), "encdec")
    rows_seen = []  # rows of every call that produced logits (hooks also see the pass-through call)
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: rows_seen.append(out.shape[0]) if out.shape[-1] == VOCAB else None)
    try:
        inputs = head_inputs(model, batch, "encdec", chunk_tokens=7)
        assert rows_seen == []  # the forward pass stopped at the head
        losses.local_numerators(inputs, batch, "token_mean", ["lm"])["lm"].backward()
    finally:
        handle.remove()
    labels = int((batch["labels"] != IGNORE_INDEX).sum())
    assert labels < batch["labels"].numel(), "the batch must hold positions without a label"
    assert sum(rows_seen) == 2 * labels and max(rows_seen) == 7  # forward, then the recomputation in backward
    assert model.config.scale_decoder_outputs
    with torch.no_grad():
        out = model_forward(model, batch, "encdec")
        hidden = head_inputs(model, batch, "encdec", chunk_tokens=7).hidden
        assert torch.equal(model.lm_head(hidden), out)  # what the head receives, rescaling included


@pytest.mark.parametrize("name, kind", [("t5_tiny.json", "encdec"), ("llama_tiny.json", "decoder")])
def test_tfew_choice_losses_chunked_equal_the_full_logits(name, kind):
    model = tfew_model(name, kind)
    caps = dict(max_input_tokens=24, max_target_tokens=24) if kind == "encdec" else dict(max_tokens=48)
    rows = list(Packer(kind, window=3, choices=True, **caps).rows(iter(choice_examples(kind))))
    batch = collate(rows, kind, pad_id=0, decoder_start_id=0, **caps)
    assert batch["choice_slot"].numel() > 0
    for names in (list(losses.LOSS_NAMES), ["unlikelihood"], ["rank_classification"]):
        for chunk in CHUNKS:
            loss_diff, grad_diff = differences(model, batch, kind, "token_mean", names, chunk)
            assert loss_diff <= TOL and grad_diff <= TOL, (names, chunk, loss_diff, grad_diff)


@pytest.mark.parametrize("names", [["lm"], ["unlikelihood", "rank_classification"]])
def test_a_micro_batch_without_labels_still_gives_every_parameter_a_gradient(names):
    model = llama("sdpa")
    _, batch = pack(examples(4), "decoder")
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    batch["loss_segment_ids"] = torch.zeros_like(batch["loss_segment_ids"])
    for mode in ("token_mean", "sequence_mean"):
        loss, grads = loss_and_grads(model, batch, "decoder", mode, names, 4)
        assert loss == 0.0 and all(not g.any() for g in grads)


def test_lora_on_the_output_layer_through_peft():
    model = _wrap(adapter_model("decoder"), "lora", target_modules=["q_proj", "v_proj", "lm_head"])
    torch.manual_seed(1)
    with torch.no_grad():  # move LoRA off its identity start, so the adapter on the head really takes part
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    _, batch = pack(examples(10), "decoder")
    head = model.get_base_model().get_output_embeddings()
    assert "lora" in type(head).__module__, "peft must have wrapped the output layer"
    loss_diff, grad_diff = differences(model, batch, "decoder", "sequence_mean", ["lm"], 7)
    assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)


def test_ddp_wrapper_forward_goes_through_ddp(tmp_path):
    """One-rank gloo DDP: the chunked loss backpropagates through DDP's reducer like the full logits do."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = llama("sdpa")
        wrapped = torch.nn.parallel.DistributedDataParallel(llama("sdpa"))
        wrapped.module.load_state_dict(plain.state_dict())
        _, batch = pack(examples(10), "decoder")
        reference = loss_and_grads(plain, batch, "decoder", "token_mean", ["lm"], None)
        loss_diff, grad_diff = differences(wrapped, batch, "decoder", "token_mean", ["lm"], 7, reference)
        assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)
        unused = torch.nn.parallel.DistributedDataParallel(llama("sdpa"), find_unused_parameters=True)
        with pytest.raises(ConfigError, match="find_unused_parameters"):
            head_inputs(unused, batch, "decoder", chunk_tokens=7)
    finally:
        dist.destroy_process_group()


class ScaledLogitsLlama(LlamaForCausalLM):
    """Like Cohere's logit_scale or Gemma-2's softcapping: the logits are changed after the output layer."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_a_model_that_changes_its_logits_after_the_head_is_refused():
    model = ScaledLogitsLlama(llama("sdpa").config).eval()
    _, batch = pack(examples(4), "decoder")
    with pytest.raises(ConfigError, match=r"trainer.loss_chunk_tokens=null"):
        head_inputs(model, batch, "decoder", chunk_tokens=8)
    assert "forward" not in model.lm_head.__dict__  # the head was restored


def test_bf16_autocast_runs_the_chunked_head_in_bf16_too():
    model = llama("sdpa")
    _, batch = pack(examples(10), "decoder")
    dtypes = []
    handle = model.lm_head.register_forward_hook(
        lambda m, args, out: dtypes.append(out.dtype) if out.shape[-1] == VOCAB else None)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = losses.local_numerators(model_forward(model, batch, "decoder"), batch, "token_mean", ["lm"])["lm"]
            inputs = head_inputs(model, batch, "decoder", chunk_tokens=7)
        chunked = losses.local_numerators(inputs, batch, "token_mean", ["lm"])["lm"]  # outside: state restored
    finally:
        handle.remove()
    assert set(dtypes) == {torch.bfloat16}
    # the same bf16 products as the full logits (an fp32 head here would differ by ~1e-5 relative)
    assert abs(full.item() - chunked.item()) <= 1e-6 * abs(full.item())


def test_config_key():
    model = "model.config=configs/models/t5_tiny.json"
    assert load_config(None, [model, "trainer.loss_chunk_tokens=1024"]).trainer.loss_chunk_tokens == 1024
    assert load_config(None, [model]).trainer.loss_chunk_tokens is None
    with pytest.raises(ConfigError, match=r"`trainer.loss_chunk_tokens` is 0; it must be at least 1, or null"):
        load_config(None, [model, "trainer.loss_chunk_tokens=0"])


def test_mtf_train_logs_the_same_losses_with_chunked_loss(tmp_path):
    runs = {}
    for arm, extra in (("full", []), ("chunked", ["trainer.loss_chunk_tokens=16"])):
        proc = _mtf(["train", "configs/demo.yaml", *FAST, "trainer.max_steps=4", f"run.output_dir={tmp_path / arm}",
                     *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[arm] = _losses(tmp_path / arm)
    assert sorted(runs["full"]) == sorted(runs["chunked"]) == [1, 2, 3, 4]
    for step, loss in runs["full"].items():
        assert abs(runs["chunked"][step] - loss) <= TOL, (step, runs["chunked"][step], loss)
