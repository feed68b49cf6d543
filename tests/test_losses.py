"""Loss normalisation: per-token NLL, mode definitions, invariance to how a global batch is split."""

import os
import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from train.errors import ConfigError
from train.modeling.features import IGNORE_INDEX, collate, model_forward
from train.modeling.losses import MODES, local_denominator, local_numerator, per_example_losses, scaled_loss, token_nll
from train.data.packing import Packer

VOCAB = 64
MAX_TOKENS = 24


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=VOCAB, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


T5_CAPS = dict(max_input_tokens=16, max_target_tokens=8)


def t5_rows() -> list[dict]:
    rng = random.Random(1)
    exs = [
        {"input_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 8))],
         "target_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 4))], "task": "t", "index": i}
        for i in range(16)
    ]
    return list(Packer("encdec", window=2, **T5_CAPS).rows(iter(exs)))


def t5_gradient(model, rows, global_rows_, world_size):
    """token_mean gradient of T5 on ``rows`` with the denominator of ``global_rows_``."""
    global_batch = collate(global_rows_, "encdec", pad_id=0, decoder_start_id=0, **T5_CAPS)
    denominator = local_denominator(global_batch, "token_mean")
    batch = collate(rows, "encdec", pad_id=0, decoder_start_id=0, **T5_CAPS)
    nll = token_nll(model_forward(model, batch, "encdec"), batch["labels"])
    loss = scaled_loss(local_numerator(nll, batch, "token_mean"), denominator, mode="token_mean", world_size=world_size)
    loss.backward()
    inner = getattr(model, "module", model)
    return torch.cat([p.grad.flatten() for p in inner.parameters()])


def global_rows(n_rows: int = 8) -> list[dict]:
    """n_rows packed rows with a varying number of examples and target lengths (so the modes differ)."""
    rng = random.Random(0)
    exs = (
        {"input_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 8))],
         "target_ids": [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 6))], "task": "t", "index": i}
        for i in range(10_000)
    )
    rows = Packer("decoder", max_tokens=MAX_TOKENS, window=2).rows(exs)
    return [next(rows) for _ in range(n_rows)]


def step_gradients(model, rows, micro_batch_rows: int, mode: str, *, local_mean: bool = False):
    """One optimizer step's gradients with gradient accumulation over micro-batches of the given size.

    Returns:
        (flat gradient, loss value as the trainer would log it).
    """
    model.zero_grad()
    batches = [
        collate(rows[i : i + micro_batch_rows], "decoder", pad_id=0, max_tokens=MAX_TOKENS)
        for i in range(0, len(rows), micro_batch_rows)
    ]
    denominator = sum(local_denominator(b, mode) for b in batches)  # before any backward
    logged = 0.0
    for b in batches:
        numerator = local_numerator(token_nll(model_forward(model, b, "decoder"), b["labels"]), b, mode)
        if local_mean:  # the classic bug: each micro-batch normalised by its own denominator
            loss = scaled_loss(numerator, local_denominator(b, mode), mode=mode) / len(batches)
        else:
            loss = scaled_loss(numerator, denominator, mode=mode)
        loss.backward()
        logged += loss.item()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), logged


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------ definitions


def test_token_nll_matches_log_softmax_and_zero_on_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    labels = torch.tensor([[1, IGNORE_INDEX, 4], [0, 2, IGNORE_INDEX]])
    nll = token_nll(logits, labels)
    assert nll.dtype == torch.float32 and nll.shape == (2, 3)
    expected = -torch.log_softmax(logits.float(), -1)[0, 2, 4]
    assert torch.allclose(nll[0, 2], expected)
    assert nll[0, 1] == 0 and nll[1, 2] == 0


def test_mode_values_on_a_hand_made_batch():
    # Row 0: segment 1 has 1 target token (nll 4), segment 2 has 3 (nll 1, 2, 3). Row 1: segment 1 has 2 (nll 6, 8).
    nll = torch.tensor([[4.0, 0.0, 1.0, 2.0, 3.0], [6.0, 8.0, 0.0, 0.0, 0.0]])
    seg = torch.tensor([[1, 0, 2, 2, 2], [1, 1, 0, 0, 0]])
    batch = {"loss_segment_ids": seg, "labels": torch.where(seg > 0, 1, IGNORE_INDEX)}
    assert per_example_losses(nll, batch) == [4.0, 2.0, 7.0]
    value = {m: scaled_loss(local_numerator(nll, batch, m), local_denominator(batch, m), mode=m).item() for m in MODES}
    assert value["token_mean"] == pytest.approx(24 / 6)
    assert value["sequence_mean"] == pytest.approx((4 + 2 + 7) / 3)
    assert value["target_mean"] == pytest.approx((4 + 2 + 7) / 3)  # coincides with sequence_mean (see docstring)
    assert value["sum"] == pytest.approx(24.0)
    assert scaled_loss(torch.tensor(3.0), 6.0, mode="token_mean", world_size=2).item() == pytest.approx(1.0)
    assert scaled_loss(torch.tensor(3.0, requires_grad=True), 0.0, mode="token_mean").item() == 0.0


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="token_mean"):
        local_denominator({"labels": torch.zeros(1, 1)}, "mean")


# ------------------------------------------------------------------------------------------ invariance


@pytest.mark.parametrize("mode", MODES)
def test_gradient_invariant_to_micro_batch_split(mode):
    model, rows = tiny_llama(), global_rows(8)
    reference, logged = step_gradients(model, rows, 8, mode)  # 1 x 8
    for micro in (4, 1):  # 2 x 4 and 8 x 1
        grad, logged_split = step_gradients(model, rows, micro, mode)
        assert rel_diff(grad, reference) <= 1e-6, f"{mode}: {8 // micro}x{micro} differs from 1x8"
        assert logged_split == pytest.approx(logged, rel=1e-6)
    # The logged loss means what the mode says.
    batch = collate(rows, "decoder", pad_id=0, max_tokens=MAX_TOKENS)
    with torch.no_grad():
        nll = token_nll(model_forward(model, batch, "decoder"), batch["labels"])
    per_example = per_example_losses(nll, batch)
    expected = {
        "token_mean": nll.sum().item() / (batch["labels"] != IGNORE_INDEX).sum().item(),
        "sequence_mean": sum(per_example) / len(per_example),
        "target_mean": sum(per_example) / len(per_example),
        "sum": nll.sum().item(),
    }[mode]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_local_denominators_would_break_invariance():
    """The test above has teeth: per-micro-batch means (the classic accumulation bug) are not invariant."""
    model, rows = tiny_llama(), global_rows(8)
    reference, _ = step_gradients(model, rows, 8, "sequence_mean", local_mean=True)
    split, _ = step_gradients(model, rows, 1, "sequence_mean", local_mean=True)
    assert rel_diff(split, reference) > 1e-3


# ------------------------------------------------------------------------------------------ two ranks (gloo)


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = torch.nn.parallel.DistributedDataParallel(tiny_llama())
    rows = global_rows(8)[rank * 4 : (rank + 1) * 4]  # each rank its own half of the global batch
    results = {"world_size": dist.get_world_size(), "indices": [i for r in rows for i in r["indices"]]}
    for mode in MODES:
        model.zero_grad()
        batches = [collate(rows[i : i + 2], "decoder", pad_id=0, max_tokens=MAX_TOKENS) for i in (0, 2)]
        denominator = torch.tensor(sum(local_denominator(b, mode) for b in batches), dtype=torch.float64)
        dist.all_reduce(denominator)  # global denominator, before any backward
        for k, b in enumerate(batches):
            sync = model.no_sync() if k == 0 else torch.enable_grad()  # all-reduce gradients once per step
            with sync:
                nll = token_nll(model_forward(model, b, "decoder"), b["labels"])
                scaled_loss(local_numerator(nll, b, mode), denominator, mode=mode, world_size=world_size).backward()
        results[mode] = torch.cat([p.grad.flatten() for p in model.module.parameters()])
    # T5's two-call forward runs the encoder outside DDP.forward; its gradients must still be all-reduced.
    rows_t5 = t5_rows()
    half = len(rows_t5) // 2
    mine = rows_t5[:half] if rank == 0 else rows_t5[half:]
    results["t5"] = t5_gradient(torch.nn.parallel.DistributedDataParallel(tiny_t5()), mine, rows_t5, world_size)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)  # FIELD_NOTES: gloo may abort a rank at interpreter exit after success; exit explicitly


def test_two_ranks_gloo_equal_single_process(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import transformers, ~10 s each).
    # Each worker sets one thread before any op, so the fork is safe after the parent used its thread pool.
    context = mp.start_processes(
        _rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank gloo workers did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"]), "ranks must see different rows"
    model, rows = tiny_llama(), global_rows(8)
    for mode in MODES:
        single, _ = step_gradients(model, rows, 8, mode)
        for r in ranks:
            assert rel_diff(r[mode], single) <= 1e-6, f"{mode}: 2-rank DDP gradient differs from 1 process"
    single_t5 = t5_gradient(tiny_t5(), t5_rows(), t5_rows(), 1)
    for r in ranks:
        assert rel_diff(r["t5"], single_t5) <= 1e-6, "T5 encoder-decoder: 2-rank DDP gradient differs from 1 process"
