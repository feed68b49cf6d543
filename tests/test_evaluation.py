"""Tests for train/evaluation/: scores against a direct per-choice computation, batch/padding
invariance, skip accounting, aggregation math, generation metrics, and a real 2-process gloo run."""

import json
import math
import os
import socket

import pytest
import torch
from transformers import (
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from train import evaluation as ev
from train.evaluation import evaluator as evaluator_mod
from train.evaluation import generation, metrics
from train.evaluation import results as er
from train.errors import ConfigError, DataError

TOL = 1e-5


def _t5():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"t5": _t5, "llama": _llama, "gpt2": _gpt2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine threads fight each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def models():
    return {name: make() for name, make in MODELS.items()}


def _ex(inputs, targets, choices, dataset="ds", template="t", index=0, **extra):
    return {"inputs": inputs, "targets": targets, "answer_choices": choices, "task": f"{dataset}_{template}",
            "dataset": dataset, "template": template, "example_index": index, **extra}


def _examples():
    """Variable prompt lengths and 2..5 choices per example, over two datasets / three templates."""
    rows = [
        ("Is the sky blue?", ["yes"], ["yes", "no"]),
        ("Pick the colour of grass, please, from these options", ["green"], ["red", "green", "blue", "grey"]),
        ("2+2=", ["four"], ["three", "four", "five"]),
        ("A much longer premise that goes on and on. What happened next?", ["it rained"],
         ["it rained", "the sun came out brightly", "nothing", "a dog barked", "snow"]),
        ("Short", ["b"], ["a", "b"]),
        ("Which animal says moo?", ["cow"], ["cow", "cat", "duck"]),
        ("", ["ok"], ["ok", "not ok"]),
    ]
    out = []
    for i, (inp, tgt, ch) in enumerate(rows):
        ds, tp = ("d1", "a") if i < 3 else (("d1", "b") if i < 5 else ("d2", "c"))
        out.append(_ex(inp, tgt, ch, ds, tp, i))
    return out


# ----------------------------------------------------------------------------------------------------
# Independent reference: one forward per (example, choice) with `labels`, summed NLL.
# ----------------------------------------------------------------------------------------------------


def _reference_scores(model, item, kind):
    """Summed NLL of each choice from its own forward with ``labels`` (fp64 log-softmax of the logits)."""
    scores = []
    for choice in item.choice_ids:
        with torch.no_grad():
            if kind == "encdec":
                labels = torch.tensor([choice])
                out = model(input_ids=torch.tensor([item.prompt_ids]), labels=labels)
                logits = out.logits[0]
            else:
                p, n = len(item.prompt_ids), len(item.prompt_ids) + len(choice)
                labels = torch.tensor([[-100] * p + choice])
                kwargs = {}
                if kind == "prefix_lm":  # full sequence, 4-D mask bidirectional over the prompt, causal after it
                    allowed = torch.ones(n, n).tril().bool()
                    allowed[:p, :p] = True
                    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
                    kwargs = dict(attention_mask=mask, position_ids=torch.arange(n)[None], use_cache=False)
                out = model(input_ids=torch.tensor([item.prompt_ids + choice]), labels=labels, **kwargs)
                logits, labels = out.logits[0, p - 1 : n - 1], labels[:, p:]
            nll = torch.nn.functional.cross_entropy(logits.double(), labels[0], reduction="sum")
            assert abs(nll.item() / len(choice) - out.loss.item()) < 1e-4  # same target tokens as the model's loss
        scores.append(-nll.item())
    return scores


@pytest.mark.parametrize("kind,name", [("encdec", "t5"), ("decoder", "llama"), ("decoder", "gpt2"),
                                       ("prefix_lm", "llama"), ("prefix_lm", "gpt2")])
def test_scores_match_direct_per_choice_computation(tok, models, kind, name):
    model = models[name]
    evaluator = ev.ZeroShotEvaluator(tok, _examples(), kind=kind)
    with torch.no_grad():
        scores = ev.score_rank_items(model, evaluator.rank_items, kind, batch_size=4, pad_id=0)
    assert len(scores) == 7
    for item in evaluator.rank_items:
        ref = _reference_scores(model, item, kind)
        got = scores[item.index]
        assert len(got.sum_logprob) == len(item.choice_ids)
        assert max(abs(a - b) for a, b in zip(ref, got.sum_logprob)) <= TOL
        assert got.num_tokens == [len(c) for c in item.choice_ids]
        assert got.length_normalized() == pytest.approx([s / n for s, n in zip(ref, got.num_tokens)], abs=TOL)


def test_tokenization_follows_training_contract(tok):
    ex = [_ex("Hi", ["yes"], ["yes", "no"])]
    encdec = ev.ZeroShotEvaluator(tok, ex, kind="encdec").rank_items[0]
    assert encdec.prompt_ids == tok("Hi", add_special_tokens=False)["input_ids"] + [1]
    assert encdec.choice_ids[0] == tok("yes", add_special_tokens=False)["input_ids"] + [1]
    dec = ev.ZeroShotEvaluator(tok, ex, kind="decoder").rank_items[0]
    assert dec.prompt_ids == tok("Hi", add_special_tokens=False)["input_ids"]
    assert dec.choice_ids[1] == tok(" no", add_special_tokens=False)["input_ids"] + [1]


def test_prefix_lm_attends_bidirectionally_over_the_prompt(tok, models):
    evaluator = ev.ZeroShotEvaluator(tok, _examples()[:2], kind="decoder")
    with torch.no_grad():
        causal = ev.score_rank_items(models["llama"], evaluator.rank_items, "decoder", pad_id=0)
        prefix = ev.score_rank_items(models["llama"], evaluator.rank_items, "prefix_lm", pad_id=0)
    assert abs(causal[1].sum_logprob[0] - prefix[1].sum_logprob[0]) > 1e-3


@pytest.mark.parametrize("kind,name", [("encdec", "t5"), ("decoder", "gpt2"), ("prefix_lm", "llama")])
def test_scores_independent_of_batch_size_budget_and_padding_side(tok, models, kind, name):
    model = models[name]
    evaluator = ev.ZeroShotEvaluator(tok, _examples(), kind=kind)
    runs = []
    with torch.no_grad():
        for bs in (1, 3, 8):
            for side in ("right", "left"):
                runs.append(ev.score_rank_items(model, evaluator.rank_items, kind, batch_size=bs, pad_id=0,
                                                padding_side=side))
        runs.append(ev.score_rank_items(model, evaluator.rank_items, kind, batch_size=8, max_tokens_per_batch=60,
                                        pad_id=0))
    base = runs[0]
    for run in runs[1:]:
        assert sorted(run) == sorted(base)
        for i in base:
            assert run[i].sum_logprob == pytest.approx(base[i].sum_logprob, abs=TOL)
    # The tokenizer's own padding side is irrelevant to the public entry point.
    results = []
    for side in ("left", "right"):
        tok.padding_side = side
        results.append(ev.evaluate(model, tok, _examples(), kind=kind, batch_size=3))
    tok.padding_side = "right"
    assert results[0]["templates"] == results[1]["templates"]


class _MoreBatchesElsewhere(ev.DistContext):
    """Pretends another rank has 3 more batches (ZeRO-3 case): this rank must run dummy batches."""

    def max_int(self, value):
        return value + 3


def test_dummy_batches_for_zero3_ranks_change_nothing(tok, models):
    evaluator = ev.ZeroShotEvaluator(tok, _examples(), kind="encdec")
    calls = []
    model = models["t5"]
    handle = model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        plain = ev.score_rank_items(model, evaluator.rank_items, "encdec", batch_size=4)
        n_plain = len(calls)
        synced = ev.score_rank_items(model, evaluator.rank_items, "encdec", batch_size=4, dist=_MoreBatchesElsewhere())
    handle.remove()
    assert len(calls) - n_plain == n_plain + 3  # 2 real batches + 3 dummies
    assert sorted(synced) == sorted(plain) == list(range(7))
    assert all(synced[i].sum_logprob == pytest.approx(plain[i].sum_logprob, abs=TOL) for i in plain)


def test_make_batches_respects_limits_and_covers_everything():
    costs = [(10, 3, 2), (50, 5, 4), (5, 2, 2), (30, 4, 3), (7, 9, 5)]
    batches = ev.make_batches(costs, batch_size=2, max_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert batches[0][0] == 1  # longest first
    for b in batches:
        assert len(b) <= 2
        padded = len(b) * max(costs[i][0] for i in b) + sum(costs[i][2] for i in b) * max(costs[i][1] for i in b)
        assert len(b) == 1 or padded <= 80
    with pytest.raises(ConfigError, match="batch_size"):
        ev.make_batches(costs, batch_size=0, max_tokens=None)


def test_variable_choices_multiple_correct_and_skips(tok, models):
    model = models["t5"]
    base = ev.ZeroShotEvaluator(tok, [_ex("Pick one", ["alpha"], ["alpha", "beta", "gamma"])], kind="encdec")
    with torch.no_grad():
        best = ev.score_rank_items(model, base.rank_items, "encdec")[0].argmax()
    choices = ["alpha", "beta", "gamma"]
    other = choices[(best + 1) % 3]
    examples = [
        _ex("Pick one", [other], choices, "d", "multi", 0),  # wrong: argmax is not the gold
        _ex("Pick one", [other, f"  {choices[best]} "], choices, "d", "multi", 1),  # a second target matches
        _ex("Pick one", ["nope"], choices, "d", "multi", 2),  # gold not among the choices
        _ex("Pick one", ["x"], [], "d", "multi", 3),  # template without answer choices, no metrics
        _ex("Pick one", [], choices, "d", "multi", 4),  # no target at all
        _ex("Two only", ["b"], ["a", "b"], "d", "two", 0),
    ]
    res = ev.evaluate(model, tok, examples, kind="encdec", batch_size=2)
    row = res["templates"]["d"]["multi"]
    assert row["n"] == 2 and row["accuracy"] == 0.5
    assert row["skipped"] == {ev.SKIP_GOLD_NOT_IN_CHOICES: 1, ev.SKIP_NO_CHOICES: 1, ev.SKIP_NO_TARGETS: 1}
    assert row["num_skipped"] == 3
    assert row["chance"] == pytest.approx(1 / 3)
    assert res["templates"]["d"]["two"]["chance"] == 0.5
    capped = ev.evaluate(model, tok, examples, kind="encdec", max_examples_per_template=1)
    assert capped["templates"]["d"]["multi"]["n"] == 1 and capped["meta"]["num_examples"] == 2


def test_invalid_inputs_raise_clear_errors(tok):
    bad = [_ex("a", ["z"], ["x", "y"], "super_glue/rte", "tmpl_a"), _ex("b", ["q"], [], "super_glue/rte", "tmpl_b")]
    with pytest.raises(DataError, match=r"super_glue/rte/tmpl_a.*gold_not_in_choices"):
        ev.ZeroShotEvaluator(tok, bad, kind="encdec")
    missing = [{"inputs": "a", "dataset": "x", "template": "y"}]
    with pytest.raises(DataError, match=r"dataset='x', template='y'.*targets"):
        ev.ZeroShotEvaluator(tok, missing, kind="decoder")
    with pytest.raises(ConfigError, match="unknown model kind"):
        ev.ZeroShotEvaluator(tok, _examples(), kind="seq2seq")


def test_examples_by_task_mapping_and_model_mode_restored(tok, models):
    model = models["gpt2"]
    model.train()
    by_task = {"t1": _examples()[:3], "t2": _examples()[3:]}
    res = ev.evaluate(model, tok, by_task, kind="decoder", clusters={"d1": "nli", "d2": "coreference"},
                      languages={"d2": "fr"})
    assert model.training  # evaluation switches to eval() and back
    model.eval()
    flat_list = ev.evaluate(model, tok, _examples(), kind="decoder")
    assert res["templates"] == flat_list["templates"]
    assert res["datasets"]["d1"]["cluster"] == "nli" and res["datasets"]["d2"]["language"] == "fr"
    assert set(res["clusters"]) == {"nli", "coreference"} and set(res["languages"]) == {"en", "fr"}


# ----------------------------------------------------------------------------------------------------
# Aggregation and reporting
# ----------------------------------------------------------------------------------------------------


def _row(acc, ln=None, n=10):
    return {"task": "t", "n": n, "skipped": {}, "num_skipped": 0, "metric": "accuracy", "accuracy": acc,
            "accuracy_length_normalized": ln, "chance": 0.5, "score": acc}


def test_aggregation_math():
    per_template = {
        "rte": {"p1": _row(0.5, 0.6), "p2": _row(0.7, 0.4), "p3": _row(0.9, 0.5), "p4": _row(0.6, 0.7)},
        "copa": {"p1": _row(0.8), "p2": _row(0.6), "p3": _row(None, n=0)},
        "wsc": {"p1": _row(0.3)},
    }
    res = er.aggregate(per_template, {"rte": "nli", "copa": "sentence_completion", "wsc": "coreference"},
                       {"wsc": "fr"})
    rte = res["datasets"]["rte"]
    assert rte["median"] == pytest.approx(0.65) and rte["mean"] == pytest.approx(0.675)
    assert (rte["min"], rte["max"], rte["num_templates"]) == (0.5, 0.9, 4)
    assert rte["length_normalized"]["median"] == pytest.approx(0.55)
    copa = res["datasets"]["copa"]  # the template with nothing scored is left out
    assert copa["median"] == pytest.approx(0.7) and copa["num_templates"] == 2 and "length_normalized" not in copa
    assert res["clusters"]["nli"]["mean"] == pytest.approx(0.65)
    assert res["languages"]["en"]["mean"] == pytest.approx((0.65 + 0.7) / 2)
    assert res["languages"]["fr"]["datasets"] == ["wsc"]
    flat = er.flatten_for_logging(res)
    assert flat["eval/rte/p2/accuracy"] == 0.7
    assert flat["eval/rte/median"] == pytest.approx(0.65)
    assert flat["eval/rte/length_normalized_median"] == pytest.approx(0.55)
    assert flat["eval/cluster/coreference/mean"] == 0.3
    assert "eval/copa/p3/accuracy" not in flat
    assert all(isinstance(v, float) for v in flat.values())


def test_write_results_and_table(tmp_path, tok, models):
    res = ev.evaluate(models["t5"], tok, _examples(), kind="encdec")
    path = er.write_results(tmp_path / "sub" / "eval.json", res)
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    table = er.format_results_table(res)
    scoring, header = table.splitlines()[:2]
    assert scoring.startswith("scoring t0: choices end with eos, separator ''")  # the convention heads the table
    assert res["scoring"]["name"] == "t0" and res["scoring"]["choice_eos"] is True
    assert "chance" in header and "len-norm" in header
    # d1/a has choices 2, 4 and 3 -> chance = mean(1/2, 1/4, 1/3)
    line = next(l for l in table.splitlines() if l.startswith("d1") and " a " in l)
    assert f"{100 * (1 / 2 + 1 / 4 + 1 / 3) / 3:6.2f}" in line
    assert "median over 2 templates" in table


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


def test_generation_metrics_on_hand_made_example():
    preds = ["The cat sat on the mat.", "paris", "blue sky today"]
    refs = [["the cat sat on the mat"], ["Paris", "City of Light"], ["a red car"]]
    m = metrics.generation_metrics(preds, refs, ["exact_match", "f1", "rouge1", "rougeL", "bleu"])
    assert m["exact_match"] == pytest.approx(2 / 3)  # SQuAD normalisation drops case, punctuation, articles
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["rouge1"] == pytest.approx(2 / 3)
    assert m["rougeL"] == pytest.approx(2 / 3)
    import sacrebleu

    expect = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [r[-1] for r in refs]]).score
    assert m["bleu"] == pytest.approx(expect)
    # partial overlap: pred "b c y" vs "b x c d e" -> p=2/3, r=2/5, f1=1/2 (best of the references)
    assert metrics.squad_f1("b c y", ["b x c d e", "w"]) == pytest.approx(0.5)
    # the article "a" is dropped by normalisation: pred [b, c] -> p=1, r=2/5
    assert metrics.squad_f1("a b c", ["b x c d e"]) == pytest.approx(2 * 0.4 / 1.4)
    with pytest.raises(ConfigError, match="unknown generation metric"):
        metrics.generation_metrics(["a"], [["a"]], ["meteor"])


@pytest.mark.parametrize("kind,name", [("encdec", "t5"), ("decoder", "llama"), ("prefix_lm", "gpt2")])
def test_generation_path_matches_one_example_at_a_time(tok, models, kind, name):
    model = models[name]
    examples = [_ex(f"Say something number {i} " + "x" * i, ["hello"], [], "gen", "g", i, metrics=["Squad", "ROUGE"])
                for i in range(4)]
    evaluator = ev.ZeroShotEvaluator(tok, examples, kind=kind)
    with torch.no_grad():
        batched = ev.generate_predictions(model, tok, evaluator.gen_items, kind, batch_size=4, max_new_tokens=6,
                                          pad_id=0, eos_id=1)
        single = ev.generate_predictions(model, tok, evaluator.gen_items, kind, batch_size=1, max_new_tokens=6,
                                         pad_id=0, eos_id=1)
    assert batched == single and len(batched) == 4
    if kind == "prefix_lm":
        # First greedy token = argmax of the bidirectional reference forward at the last prompt position.
        item = evaluator.gen_items[0]
        p = len(item.prompt_ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([item.prompt_ids]), attention_mask=torch.zeros(1, 1, p, p),
                           use_cache=False).logits[0, -1]
        first = generation._greedy_prefix_lm(model, [item.prompt_ids], 1, 0, 1, torch.float32)[0]
        assert first[:1] == [int(logits.argmax())] or (first == [] and int(logits.argmax()) == 0)
    res = evaluator(model, batch_size=2, max_new_tokens=6)
    row = res["templates"]["gen"]["g"]
    assert row["n"] == 4 and row["metric"] == "exact_match" and row["chance"] is None
    expect = metrics.generation_metrics([batched[i] for i in range(4)], [["hello"]] * 4, ["exact_match", "f1", "rouge1"])
    assert row["f1"] == pytest.approx(expect["f1"]) and row["rouge1"] == pytest.approx(expect["rouge1"])
    assert er.flatten_for_logging(res)["eval/gen/g/rouge2"] == row["rouge2"]


# ----------------------------------------------------------------------------------------------------
# Two real processes (gloo) vs one
# ----------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    seen = []
    real = evaluator_mod.score_rank_items

    def recording(model, items, *args, **kwargs):
        seen.extend(it.index for it in items)
        return real(model, items, *args, **kwargs)

    evaluator_mod.score_rank_items = recording  # the name the evaluator calls
    tok = ByT5Tokenizer()
    res = ev.evaluate(_t5(), tok, _examples(), kind="encdec", batch_size=2)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": torch.distributed.get_world_size(), "seen": seen, "results": res}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # FIELD_NOTES: gloo can abort a rank at interpreter exit after success; exit explicitly


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tok):
    import torch.multiprocessing as mp

    # fork: the children inherit the imported torch/transformers (spawn re-imports them: ~30 s here)
    mp.start_processes(_two_process_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert seen0 and seen1 and not seen0 & seen1 and seen0 | seen1 == set(range(7))
    single = ev.evaluate(_t5(), tok, _examples(), kind="encdec", batch_size=2)
    for r in ranks:
        assert r["results"]["meta"]["num_processes"] == 2
        assert r["results"]["templates"] == json.loads(json.dumps(single["templates"]))
        assert r["results"]["datasets"] == json.loads(json.dumps(single["datasets"]))
    assert not math.isnan(single["datasets"]["d1"]["median"])
