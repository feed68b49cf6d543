"""T-Few's three losses on packed rows: hand-computed values, packed == unpacked, packing and resume, a real run.

The losses (train/modeling/losses.py) are checked against numbers worked out by hand from fixed
probabilities; the packed choice scores and gradients against each choice run ALONE through the model's
own standard path (``reference_target_nll``); the packer with choices off against the packer that never
saw choices; and a short train() on the demo mixture for the logged components.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, ByT5Tokenizer

from conftest import FAST, fresh_accelerate
from train.config import load_config
from train.data.packing import Packer, build_row, count_choice_sets
from train.errors import ConfigError
from train.modeling import losses
from train.modeling.features import check_choice_support, collate, model_forward, reference_target_nll

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- hand computation

# Example A: target [2, 1] (the gold choice) and wrong choices [3, 1] and [2, 3, 1]; example B: target
# [3, 1] and no choices. The model's probabilities of the scored tokens are fixed by hand:
#   gold of A   [2, 1]     p = 0.5, 0.5            mean log p = -1.0 ln 2
#   wrong 1     [3, 1]     p = 0.25, 0.5           mean log p = -1.5 ln 2
#   wrong 2     [2, 3, 1]  p = 0.5, 0.25, 0.125    mean log p = -2.0 ln 2
#   target of B [3, 1]     p = 0.25, 0.5
# (for enc-dec wrong 2 is 0.125, 0.25, 0.5: the decoder shares its first logit with the gold target).
LN2 = math.log(2)
HAND_LM = (LN2 + LN2 + 2 * LN2 + LN2) / 4  # token_mean over the 4 target tokens of A and B
HAND_UNLIKELIHOOD = -(2 * math.log(1.01 - 0.25) + 2 * math.log(1.01 - 0.5) + math.log(1.01 - 0.125)) / 5
# softmax over scores (-1, -1.5, -2) ln 2 against the gold: -log(2^-1 / (2^-1 + 2^-1.5 + 2^-2))
HAND_RANK = math.log(1 + 2 ** -0.5 + 2 ** -1)
VOCAB = 5
A = {"input_ids": [4, 4], "target_ids": [2, 1], "choices": [[3, 1], [2, 3, 1]], "task": "a", "index": 0}
B = {"input_ids": [4], "target_ids": [3, 1], "task": "b", "index": 1}


def _logits(length: int, probs: dict[int, dict[int, float]]) -> torch.Tensor:
    """(1, length, VOCAB) logits = log of distributions; at position t, token -> p as given, the rest uniform."""
    table = torch.full((length, VOCAB), 1.0 / VOCAB, dtype=torch.float64)
    for t, fixed in probs.items():
        rest = (1 - sum(fixed.values())) / (VOCAB - len(fixed))
        table[t] = rest
        for token, p in fixed.items():
            table[t, token] = p
    return table.log().float()[None].requires_grad_()


def _hand_batch(kind: str) -> tuple[dict, torch.Tensor]:
    row = build_row([A, B], kind, choices=True)
    if kind == "encdec":
        # target row: A gold (0-1), wrong 1 (2-3), wrong 2 (4-6), B (7-8); logits are not shifted.
        assert row["target_ids"] == [2, 1, 3, 1, 2, 3, 1, 3, 1]
        assert row["target_branch_ids"] == [1, 1, 2, 2, 3, 3, 3, 1, 1]
        probs = {0: {2: .5}, 1: {1: .5}, 2: {3: .25}, 3: {1: .5}, 4: {2: .125}, 5: {3: .25}, 6: {1: .5},
                 7: {3: .25}, 8: {1: .5}}
        batch = collate([row], kind, pad_id=0, decoder_start_id=0, max_input_tokens=4, max_target_tokens=10)
        return batch, _logits(10, probs)
    # row: A input (0-1), gold (2-3), wrong 1 (4-5), wrong 2 (6-8), B input (9), B target (10-11). The logit
    # at t predicts token t + 1, and the last input token (1) predicts the first token of every branch of A.
    assert row["input_ids"] == [4, 4, 2, 1, 3, 1, 2, 3, 1, 4, 3, 1]
    assert row["branch_ids"] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 0, 1, 1]
    assert row["positions"] == [0, 1, 2, 3, 2, 3, 2, 3, 4, 0, 1, 2]
    probs = {1: {2: .5, 3: .25}, 2: {1: .5}, 4: {1: .5}, 6: {3: .25}, 7: {1: .125}, 9: {3: .25}, 10: {1: .5}}
    batch = collate([row], kind, pad_id=0, max_tokens=13)
    return batch, _logits(13, probs)


@pytest.mark.parametrize("kind", ["encdec", "decoder"])
def test_each_loss_equals_the_hand_computation(kind):
    batch, logits = _hand_batch(kind)
    assert losses.local_denominator(batch, "token_mean") == 4  # the choices carry no LM labels
    assert losses.unlikelihood_denominator(batch) == 5 and losses.rank_classification_denominator(batch) == 1
    scores = losses.choice_scores(logits, batch)
    assert scores.tolist() == pytest.approx([-LN2, -1.5 * LN2, -2 * LN2], abs=1e-6)
    lm = losses.local_numerator(losses.token_nll(logits, batch["labels"]), batch, "token_mean") / 4
    assert lm.item() == pytest.approx(HAND_LM, abs=1e-6)
    assert (losses.unlikelihood_numerator(logits, batch) / 5).item() == pytest.approx(HAND_UNLIKELIHOOD, abs=1e-6)
    assert losses.rank_classification_numerator(logits, batch).item() == pytest.approx(HAND_RANK, abs=1e-6)

    # The weighted total with T-Few's weights 1:1:1, and with other weights.
    for weights in ({"lm": 1.0, "unlikelihood": 1.0, "rank_classification": 1.0},
                    {"lm": 0.5, "rank_classification": 2.0}):
        numerators = losses.local_numerators(logits, batch, "token_mean", weights)
        denominators = losses.local_denominators(batch, "token_mean", weights)
        total = losses.weighted_loss(numerators, denominators, weights, mode="token_mean")
        hand = {"lm": HAND_LM, "unlikelihood": HAND_UNLIKELIHOOD, "rank_classification": HAND_RANK}
        assert total.item() == pytest.approx(sum(w * hand[k] for k, w in weights.items()), abs=1e-6)
        step = losses.step_losses({k: v.item() for k, v in numerators.items()}, denominators, "token_mean")
        assert step == pytest.approx({k: hand[k] for k in weights}, abs=1e-6)


def test_batch_without_choices_gives_zero_losses_that_still_backward():
    row = build_row([B], "encdec", choices=True)
    batch = collate([row], "encdec", pad_id=0, decoder_start_id=0, max_input_tokens=4, max_target_tokens=4)
    logits = _logits(4, {})
    assert losses.unlikelihood_denominator(batch) == 0 and losses.rank_classification_denominator(batch) == 0
    total = losses.unlikelihood_numerator(logits, batch) + losses.rank_classification_numerator(logits, batch)
    total.backward()  # a micro-batch without choices must not break the backward (lm weight 0, DDP)
    assert total.item() == 0 and logits.grad is not None
    weights = {"unlikelihood": 1.0}
    assert losses.step_losses({"unlikelihood": 0.0}, {"unlikelihood": 0.0}, "token_mean") == {"unlikelihood": None}
    assert losses.weighted_loss({"unlikelihood": total}, {"unlikelihood": 0.0}, weights, mode="token_mean").item() == 0


# ------------------------------------------------------------------------------- packed == unpacked


def _tiny(name: str, kind: str) -> torch.nn.Module:
    data = json.loads((REPO / "configs" / "models" / name).read_text())
    data["vocab_size"] = TEST_VOCAB  # the shipped 32k vocab only makes the output layer slower here
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if kind == "encdec" else AutoModelForCausalLM
    return auto.from_config(config).eval()


TEST_VOCAB = 1024


def _examples(kind: str, n: int = 9) -> list[dict]:
    """Tokenized examples as the stream yields them: flat choice_ids / choice_lengths, some without choices."""
    rng = random.Random(7)
    out = []
    for i in range(n):
        ex = {"input_ids": [rng.randrange(2, TEST_VOCAB) for _ in range(rng.randint(2, 7))],
              "target_ids": [rng.randrange(2, TEST_VOCAB) for _ in range(rng.randint(1, 3))] + [1],
              "task": "t", "index": i, "choice_ids": [], "choice_lengths": []}
        if i % 3 != 2:
            for _ in range(rng.randint(1, 3)):
                choice = [rng.randrange(2, TEST_VOCAB) for _ in range(rng.randint(1, 3))] + [1]
                ex["choice_ids"] += choice
                ex["choice_lengths"].append(len(choice))
        out.append(ex)
    return out


def _split(ex: dict) -> list[list[int]]:
    flat, out = ex["choice_ids"], []
    for n in ex["choice_lengths"]:
        out.append(flat[:n])
        flat = flat[n:]
    return out


def _packed_and_reference(model: torch.nn.Module, kind: str, *, pack: bool = True,
                          pad_to: str = "capacity") -> tuple[float, float, float]:
    """Max |difference| of per-token choice log-probs, of the three (mean) losses, and of gradients."""
    exs = _examples(kind)
    caps = (dict(max_input_tokens=24, max_target_tokens=24) if kind == "encdec" else dict(max_tokens=48))
    packer = Packer(kind, window=3, choices=True, pack=pack, **caps)
    rows = list(packer.rows(iter(exs)))
    assert packer.stats["dropped_choice_sets"] == 0 and packer.stats["choice_sets"] == 6
    if pack:
        assert max(count_choice_sets([r]) for r in rows) >= 2, "rows must hold several examples with choices"
    batch = collate(rows, kind, pad_id=0, decoder_start_id=0, pad_to=pad_to, **caps)
    if pad_to == "longest":  # the choice gather indices must follow the narrower width
        assert batch["labels"].shape[1] < (caps["max_target_tokens"] if kind == "encdec" else caps["max_tokens"])

    # packed: one forward over all rows
    model.zero_grad()
    logits = model_forward(model, batch, kind)
    packed_logp = losses.choice_token_log_probs(logits, batch)
    lm = losses.local_numerator(losses.token_nll(logits, batch["labels"]), batch, "token_mean")
    ul, rc = losses.unlikelihood_numerator(logits, batch), losses.rank_classification_numerator(logits, batch)
    (lm + ul + rc).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]

    # reference: every choice of every example run alone, in the packed order (gold first, then wrong ones)
    model.zero_grad()
    ref_logp, ref_lm, ref_ul, ref_rc = [], 0.0, 0.0, 0.0
    for i in (i for row in rows for i in row["indices"]):
        ex = exs[i]
        choices = [ex["target_ids"]] + _split(ex)
        nll = [reference_target_nll(model, {"input_ids": ex["input_ids"], "target_ids": c}, kind, decoder_start_id=0)
               for c in choices]
        ref_lm = ref_lm + nll[0].sum()
        if len(choices) < 2:
            continue
        ref_logp += [-x for x in nll]
        scores = torch.stack([-x.mean() for x in nll])
        ref_rc = ref_rc + torch.nn.functional.cross_entropy(scores[None], torch.tensor([0]))
        wrong = torch.cat([-x for x in nll[1:]])
        ref_ul = ref_ul - torch.log(1 - wrong.exp() + 0.01).sum()
    (ref_lm + ref_ul + ref_rc).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]

    logp_diff = (packed_logp - torch.cat(ref_logp)).abs().max().item()
    counts = (losses.local_denominator(batch, "token_mean"), losses.unlikelihood_denominator(batch),
              losses.rank_classification_denominator(batch))
    loss_diff = max(abs(a.item() - b.item()) / n for a, b, n in zip((lm, ul, rc), (ref_lm, ref_ul, ref_rc), counts))
    grad_diff = max((a - b).abs().max().item() for a, b in zip(packed_grads, ref_grads))
    assert any(g.abs().sum() > 0 for g in packed_grads)
    return logp_diff, loss_diff, grad_diff


@pytest.mark.parametrize("name, kind", [("t5_tiny.json", "encdec"), ("llama_tiny.json", "decoder"),
                                        ("llama_tiny.json", "prefix_lm")])
def test_packed_choice_scores_and_gradients_equal_unpacked(name, kind):
    logp_diff, loss_diff, grad_diff = _packed_and_reference(_tiny(name, kind), kind)
    print(f"{name}/{kind}: log-prob {logp_diff:.2e}, losses {loss_diff:.2e}, gradients {grad_diff:.2e}")
    assert logp_diff <= 1e-5, f"per-token choice log-prob differs by {logp_diff}"
    assert loss_diff <= 1e-5, f"a loss differs by {loss_diff}"
    assert grad_diff <= 1e-5, f"gradient differs by {grad_diff}"


@pytest.mark.parametrize("name, kind", [("t5_tiny.json", "encdec"), ("llama_tiny.json", "decoder")])
def test_unpacked_padded_to_longest_choice_scores_equal_unpacked(name, kind):
    """data.packing=false pads to the micro-batch's longest row; the choice losses stay exact."""
    logp_diff, loss_diff, grad_diff = _packed_and_reference(_tiny(name, kind), kind, pack=False, pad_to="longest")
    assert max(logp_diff, loss_diff, grad_diff) <= 1e-5, (logp_diff, loss_diff, grad_diff)


# ------------------------------------------------------------------------------------------- packing


def test_golden_rows_with_choices():
    # The module docstring's pictures, as data (n = [31, 32, 1], m = [33, 1] are a's wrong choices).
    a = {"input_ids": [11, 12, 1], "target_ids": [21, 1], "choices": [[31, 32, 1], [33, 1]], "task": "a"}
    b = {"input_ids": [13, 1], "target_ids": [22, 1], "task": "b"}
    row = build_row([a, b], "encdec", choices=True)
    assert row["target_ids"] == [21, 1, 31, 32, 1, 33, 1, 22, 1]
    assert row["target_segment_ids"] == [1, 1, 1, 1, 1, 1, 1, 2, 2]
    assert row["target_branch_ids"] == [1, 1, 2, 2, 2, 3, 3, 1, 1]
    assert row["target_positions"] == [0, 1, 0, 1, 2, 0, 1, 0, 1]
    batch = collate([row], "encdec", pad_id=0, decoder_start_id=0, max_input_tokens=5, max_target_tokens=9)
    assert batch["decoder_input_ids"][0].tolist() == [0, 21, 0, 31, 32, 0, 33, 0, 22]  # a start per branch
    assert batch["labels"][0].tolist() == [21, 1, -100, -100, -100, -100, -100, 22, 1]

    a["input_ids"], b["input_ids"] = [11, 12], [13]
    row = build_row([a, b], "decoder", choices=True)
    assert row["input_ids"] == [11, 12, 21, 1, 31, 32, 1, 33, 1, 13, 22, 1]
    assert row["branch_ids"] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 0, 1, 1]
    assert row["positions"] == [0, 1, 2, 3, 2, 3, 4, 2, 3, 0, 1, 2]
    assert row["loss_mask"] == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert row["prefix_mask"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("kind, caps", [("encdec", dict(max_input_tokens=24, max_target_tokens=10)),
                                        ("decoder", dict(max_tokens=30))])
def test_choices_off_gives_todays_rows_and_state(kind, caps):
    with_columns = _examples(kind, 60)
    plain = [{k: v for k, v in ex.items() if not k.startswith("choice_")} for ex in with_columns]
    off, never = Packer(kind, window=4, **caps), Packer(kind, window=4, **caps)
    assert list(off.rows(iter(with_columns))) == list(never.rows(iter(plain)))
    assert off.state_dict() == never.state_dict() and "choices" not in off.state_dict()["config"]
    on = Packer(kind, window=4, choices=True, **caps)
    rows = list(on.rows(iter(with_columns)))
    assert on.stats["choice_sets"] == count_choice_sets(rows) > 0
    assert on.efficiency()["examples_per_row"] < off.efficiency()["examples_per_row"]  # choices take room


def test_overlong_choices_are_dropped_and_the_example_kept():
    ex = {"input_ids": [5, 5], "target_ids": [6, 1], "choice_ids": [7, 7, 1, 8, 1], "choice_lengths": [3, 2],
          "task": "t", "index": 0}
    packer = Packer("encdec", max_input_tokens=4, max_target_tokens=6, choices=True)  # 2 + 5 > 6
    (row,) = packer.rows(iter([ex]))
    assert row["target_ids"] == [6, 1] and row["target_branch_ids"] == [1, 1]
    assert packer.stats["dropped_choice_sets"] == 1 and packer.stats["choice_sets"] == 0
    # a cut target is no longer the gold choice: its choices go too
    packer = Packer("decoder", max_tokens=20, overlong_policy="truncate_target", choices=True)
    long_target = dict(ex, input_ids=[5] * 18, target_ids=[6, 6, 6, 1], choice_ids=[7, 1], choice_lengths=[2])
    (row,) = packer.rows(iter([long_target]))
    assert row["input_ids"] == [5] * 18 + [6, 6] and max(row["branch_ids"]) == 1
    assert packer.stats["dropped_choice_sets"] == 1 and packer.stats["truncated_targets"] == 1


@pytest.mark.parametrize("kind, caps", [("encdec", dict(max_input_tokens=24, max_target_tokens=12)),
                                        ("prefix_lm", dict(max_tokens=30))])
def test_packer_resume_with_choices_is_exact(kind, caps):
    exs = _examples(kind, 120)
    uninterrupted = Packer(kind, window=5, choices=True, **caps)
    reference = list(uninterrupted.rows(iter(exs)))
    assert count_choice_sets(reference) > 20
    for cut in (1, 9, 23):
        packer = Packer(kind, window=5, choices=True, **caps)
        source = iter(enumerate(exs))
        pulled = []  # the stream's position: examples handed to the packer so far
        examples = (pulled.append(i) or ex for i, ex in source)
        before = [packer.next_row(examples) for _ in range(cut)]
        saved = json.loads(json.dumps(packer.state_dict()))  # what the trainer checkpoints
        fresh = Packer(kind, window=5, choices=True, **caps)
        fresh.load_state_dict(saved)
        after = list(fresh.rows(iter(exs[len(pulled):])))
        assert before + after == reference, f"resume after {cut} rows differs"
        assert fresh.stats == uninterrupted.stats
    with pytest.raises(ConfigError, match="differs"):
        Packer(kind, window=5, **caps).load_state_dict(saved)  # choices on in the checkpoint, off now


# ----------------------------------------------------------------------- tokenization, stream, config


@pytest.mark.parametrize("kind", ["encdec", "decoder"])
def test_tokenization_carries_the_wrong_choices(kind):
    from train.data.mixtures import MixtureStream, StreamSource, _TokenColumns
    from train.data.tokenization import tokenize_prompted

    prompted = datasets.Dataset.from_dict({
        "inputs": ["q1", "q2", "q3", "q4"],
        "targets": [["yes"], ["b"], ["x"], ["ok"]],
        "answer_choices": [["no", " yes ", "maybe"], ["b"], ["y", "z"], []],  # gold found / 1 choice / no gold / none
    })
    out = tokenize_prompted(prompted, ByT5Tokenizer(), kind, batch_size=2)
    space = [ord(" ") + 3] if kind != "encdec" else []
    tok = lambda text: space + [ord(c) + 3 for c in text] + [1]  # noqa: E731 (ByT5: byte + 3, eos 1)
    assert out[0]["choice_ids"] == tok("no") + tok("maybe") and out[0]["choice_lengths"] == [len(tok("no")), len(tok("maybe"))]
    assert [out[i]["choice_lengths"] for i in (1, 2, 3)] == [[], [], []]
    assert out[0]["target_ids"] == tok("yes")  # the gold choice is the target itself

    stream = MixtureStream([StreamSource("t", "t", 1.0, _TokenColumns(out, "t"), range(4))], seed=0)
    items = {item["index"]: item for item in stream.take(8)}
    assert items[0]["choice_ids"] == out[0]["choice_ids"] and items[0]["choice_lengths"] == out[0]["choice_lengths"]
    assert items[3]["choice_lengths"] == []


def test_config_weights_bounds_and_bloom(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/demo.yaml")
    w = cfg.trainer.loss_weights
    assert (w.lm, w.unlikelihood, w.rank_classification) == (1.0, 0.0, 0.0) and not w.choice_losses()
    with pytest.raises(ConfigError, match="every `trainer.loss_weights` is 0"):
        load_config("configs/demo.yaml", ["trainer.loss_weights.lm=0"])
    with pytest.raises(ConfigError, match=r"`trainer.loss_weights.unlikelihood` is -1.0; it must be at least 0"):
        load_config("configs/demo.yaml", ["trainer.loss_weights.unlikelihood=-1"])
    with pytest.raises(ConfigError, match="BLOOM"):
        load_config("configs/demo.yaml", ["model.config=null", "model.name_or_path=bigscience/bloomz-560m",
                                          "trainer.loss_weights.rank_classification=1"])
    with pytest.raises(ConfigError, match="ALiBi"):
        check_choice_support("bloom", choices=True)
    check_choice_support("bloom", choices=False)


# ------------------------------------------------------------------------------------------ end to end


def test_train_logs_the_three_losses_and_the_examples_with_choices(tmp_path, monkeypatch):
    from train.loop.trainer import train

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/demo.yaml", [*FAST, "trainer.max_steps=2", f"run.output_dir={tmp_path}",
                                            "data.max_examples_per_task=24", "logging.wandb.mode=disabled",
                                            "trainer.loss_weights.unlikelihood=1",
                                            "trainer.loss_weights.rank_classification=1"])
    with fresh_accelerate():
        summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    parts = [last[f"train/loss_{k}"] for k in ("lm", "unlikelihood", "rank_classification")]
    assert last["train/loss_last"] == pytest.approx(sum(parts), rel=1e-9)  # weights 1:1:1
    assert parts[2] > 0 and math.isfinite(parts[1])
    assert 0 < summary["examples_with_choices"] == last["examples_with_choices"]
    assert summary["packing_stats"]["choice_sets"] >= summary["examples_with_choices"]
    state = json.loads(next((tmp_path / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["examples_with_choices"] == summary["examples_with_choices"]
