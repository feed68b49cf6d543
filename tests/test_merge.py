"""``mtf merge``: the merge formulas on tensors written out here, then whole merges of tiny saved models.

What is proved: TIES trims to exactly k entries (ties at the threshold broken by index), elects a sign by
summed magnitude (a sign tie and all-zero entries keep the base) and averages only the agreeing experts;
DARE's mask is seeded per (expert, tensor) and reproducible, and survivors are scaled by 1/(1-p); averaging
two copies of a model returns it bit for bit, task arithmetic with lambda=0 returns the base bit for bit and
with lambda=1 returns the expert to float32 round-off; merging LoRA and (IA)^3 adapters equals merging
their ``merge_and_unload`` exports (T5, and GPT-2's Conv1D with fan_in_fan_out and biases); mismatched
inputs and bad configs exit 2 naming every problem; the output (one file or shards) loads with
``from_pretrained`` and ``mtf eval`` scores it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from conftest import fresh_accelerate
from train.errors import ConfigError
from train.experts.merge_config import load_merge_config
from train.experts.merging import merge
from train.experts.methods import (dare, disjoint_mean, elect_sign, keep_mask, linear, merge_tensor,
                                   task_arithmetic, tensor_seed, ties, top_k_count, trim)

REPO = Path(__file__).resolve().parents[1]
T = torch.tensor


# ------------------------------------------------------------------------------------------ formulas


def test_linear_is_the_weighted_sum_and_exact_on_identical_experts():
    a, b = T([1.0, 2.0, -4.0]), T([3.0, 0.0, 4.0])
    assert torch.equal(linear([a, b], [0.25, 0.75]), T([2.5, 0.5, 2.0]))
    x = T([0.1, 0.7, 1e-8])
    assert torch.equal(linear([x, x, x], [1 / 3, 1 / 3, 1 / 3]), x)  # the float sum alone would round


def test_task_arithmetic_adds_the_scaled_weighted_task_vectors():
    base = T([1.0, 2.0, 3.0])
    taus = [T([1.0, 0.0, -1.0]), T([0.5, 0.5, 0.5])]
    assert torch.equal(task_arithmetic(base, taus, [1.0, 1.0], 0.5), T([1.75, 2.25, 2.75]))
    assert torch.equal(task_arithmetic(base, taus, [1.0, -2.0], 1.0), T([1.0, 1.0, 1.0]))  # negation subtracts a task
    assert torch.equal(task_arithmetic(base, taus, [1.0, 1.0], 0.0), base)


def test_trim_keeps_exactly_k_largest_magnitudes_and_breaks_ties_by_index():
    tau = T([0.1, -0.5, 0.3, -0.3, 0.0])
    assert torch.equal(trim(tau, 0.6), T([0.0, -0.5, 0.3, -0.3, 0.0]))  # k = 3
    assert torch.equal(trim(tau, 0.4), T([0.0, -0.5, 0.3, 0.0, 0.0]))  # k = 2: |0.3| twice, the lower index wins
    assert torch.equal(trim(tau, 1.0), tau)
    assert torch.equal(trim(T([[2.0, 2.0], [2.0, 2.0]]), 0.5), T([[2.0, 2.0], [0.0, 0.0]]))  # all tied
    assert top_k_count(0.3, 10) == 3 and top_k_count(0.01, 10) == 1  # ceil on the decimal written (0.3*10 != 3.0 in float)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):  # many ties (small integers): the same as a stable sort by magnitude, first k
        tau = torch.randint(-3, 4, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator).float()
        density = round(float(torch.rand(1, generator=generator)) * 0.99 + 0.01, 2)
        order = sorted(range(tau.numel()), key=lambda i: (-abs(tau[i].item()), i))[:top_k_count(density, tau.numel())]
        assert torch.equal(trim(tau, density), torch.zeros_like(tau).index_copy(0, torch.tensor(order, dtype=torch.long),
                                                                                tau[order])), (tau, density)


def test_ties_elects_by_summed_magnitude_and_averages_only_agreeing_experts():
    # columns: clear +, a sign tie (0.2 - 0.2), all zero, all zero, one large - against two small +
    taus = [T([0.3, 0.2, 0.0, 0.0, -1.0]),
            T([-0.1, -0.2, 0.0, 0.0, 0.5]),
            T([0.5, 0.0, 0.0, 0.0, 0.25])]
    sign = elect_sign(taus, [1.0, 1.0, 1.0])
    assert torch.equal(sign, T([1.0, 0.0, 0.0, 0.0, -1.0]))
    mean = disjoint_mean(taus, sign, [1.0, 1.0, 1.0])
    torch.testing.assert_close(mean, T([0.4, 0.0, 0.0, 0.0, -1.0]))  # (0.3 + 0.5) / 2; the tie and zeros give 0
    weighted = disjoint_mean(taus, sign, [1.0, 1.0, 3.0])
    torch.testing.assert_close(weighted[0], torch.tensor((0.3 + 3 * 0.5) / 4))
    base = T([10.0, 20.0, 30.0, 40.0, 50.0])
    torch.testing.assert_close(ties(base, taus, [1.0] * 3, 1.0, [1.0] * 3), T([10.4, 20.0, 30.0, 40.0, 49.0]))
    # with trimming to k = 2 per expert: expert 2 keeps -0.2 and 0.5, so column 1 is no longer a tie
    torch.testing.assert_close(ties(base, taus, [1.0] * 3, 1.0, [0.4] * 3), T([10.4, 19.8, 30.0, 40.0, 49.0]))
    torch.testing.assert_close(ties(base, taus, [1.0] * 3, 0.5, [0.4] * 3), T([10.2, 19.9, 30.0, 40.0, 49.5]))


def test_dare_rescales_the_survivors_of_a_pinned_mask():
    tau = T([1.0, -2.0, 3.0, -4.0])
    assert torch.equal(dare(tau, 0.5, T([True, False, True, False])), T([2.0, 0.0, 6.0, 0.0]))
    assert torch.equal(dare(T([0.25, 0.5]), 0.75, T([True, True])), T([1.0, 2.0]))  # / (1 - 0.75)
    assert torch.equal(dare(tau, 0.0, keep_mask(tau.shape, 0.0, 7)), tau)  # p = 0 keeps everything as it is


def test_dare_masks_are_seeded_per_expert_and_tensor_and_reproducible():
    assert tensor_seed(0, 0, "encoder.w") == tensor_seed(0, 0, "encoder.w")  # sha256, not Python's salted hash
    assert tensor_seed(0, 0, "w") == 3095981765379215825  # pinned: the same on every machine and run
    seeds = {tensor_seed(0, 0, "w"), tensor_seed(1, 0, "w"), tensor_seed(0, 1, "w"), tensor_seed(0, 0, "v")}
    assert len(seeds) == 4
    pinned = keep_mask((12,), 0.5, tensor_seed(0, 0, "w"))
    assert pinned.tolist() == [True, True, False, False, False, False, False, True, False, False, True, True]
    assert torch.equal(keep_mask((1000,), 0.9, 5), keep_mask((1000,), 0.9, 5))
    assert not torch.equal(keep_mask((1000,), 0.9, 5), keep_mask((1000,), 0.9, 6))
    kept = keep_mask((20000,), 0.9, 5).float().mean().item()
    assert 0.09 < kept < 0.11
    base, thetas = torch.zeros(64), [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    once = merge_tensor("dare_ties", "w", base, thetas, [1.0, 1.0], drop_rates=[0.5, 0.5], seed=3)
    assert torch.equal(once, merge_tensor("dare_ties", "w", base, thetas, [1.0, 1.0], drop_rates=[0.5, 0.5], seed=3))
    assert not torch.equal(once, merge_tensor("dare_ties", "w", base, thetas, [1.0, 1.0], drop_rates=[0.5, 0.5], seed=4))


# ------------------------------------------------------------------------------------------ tiny models


def _t5(**changes) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=128, dropout_rate=0.0,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu")
    return T5ForConditionalGeneration(T5Config(**{**config, **changes})).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 initialises biases to 0, which would hide (IA)^3's scaling of c_attn's bias
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    return model


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _perturbed(base: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """An "expert": the base plus small seeded noise on every tensor (a stand-in for finetuning)."""
    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in _tensors(base).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


def _merge(tmp_path: Path, name: str, **spec) -> tuple[Path, dict]:
    spec.setdefault("output_dir", str(tmp_path / name))
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(spec))
    summary = merge(load_merge_config(file))
    return Path(spec["output_dir"]), summary


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t5")
    _t5().save_pretrained(root / "base")
    return {"base": root / "base", "a": _perturbed(root / "base", root / "a", 1),
            "b": _perturbed(root / "base", root / "b", 2), "root": root}


def test_averaging_two_copies_of_a_model_returns_it_exactly(t5, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(t5["a"], copy)
    out, summary = _merge(tmp_path, "avg", models=[str(t5["a"]), str(copy)], method="linear")
    mine, theirs = _tensors(out), _tensors(t5["a"])
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert summary["tensors_changed"] == 0 and summary["parameters"] == {"normalize_weights": True}
    loaded = T5ForConditionalGeneration.from_pretrained(out)  # tied embeddings stored once, tied again on load
    assert torch.equal(loaded.lm_head.weight, theirs["shared.weight"])


def test_task_arithmetic_lambda_0_is_the_base_and_lambda_1_of_one_expert_is_the_expert(t5, tmp_path):
    out, _ = _merge(tmp_path, "zero", base_model=str(t5["base"]), models=[str(t5["a"]), str(t5["b"])],
                    method="task_arithmetic", parameters={"lambda": 0.0})
    mine, base = _tensors(out), _tensors(t5["base"])
    assert all(torch.equal(mine[k], base[k]) for k in base)  # bit for bit
    out, _ = _merge(tmp_path, "one", base_model=str(t5["base"]), models=[str(t5["a"])], method="task_arithmetic")
    mine, expert = _tensors(out), _tensors(t5["a"])
    for k in expert:  # (theta - base) + base: within one float32 ulp of max(|theta|, |base|), mostly exact
        bound = torch.finfo(torch.float32).eps * torch.maximum(expert[k].abs(), base[k].abs())
        assert ((mine[k] - expert[k]).abs() <= bound).all(), k
    exact = sum(int((mine[k] == expert[k]).sum()) for k in expert) / sum(v.numel() for v in expert.values())
    assert exact > 0.99


def test_ties_and_dare_merges_match_the_formulas_and_write_a_record(t5, tmp_path):
    base, a, b = (_tensors(t5[k]) for k in ("base", "a", "b"))
    out, summary = _merge(tmp_path, "ties", base_model=str(t5["base"]), models=[
        {"model": str(t5["a"]), "weight": 1.0}, {"model": str(t5["b"]), "weight": 2.0, "density": 0.5}],
        method="ties", parameters={"lambda": 0.8, "density": 0.3}, max_shard_mb=0.05,
        chosen_by={"search": "grid", "split": "validation", "points": [{"parameters": {"lambda": 0.8}, "score": 0.61}]})
    name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    expected = ties(base[name], [a[name] - base[name], b[name] - base[name]], [1.0, 2.0], 0.8, [0.3, 0.5])
    assert torch.equal(_tensors(out)[name], expected)
    assert len(summary["files"]) > 1 and (out / "model.safetensors.index.json").is_file()
    record = json.loads((out / "merge_record.json").read_text())
    assert record["method"] == "ties" and record["parameters"] == {"lambda": 0.8, "density": 0.3}
    assert record["chosen_by"]["points"] == [{"parameters": {"lambda": 0.8}, "score": 0.61}]  # how they were chosen
    assert [m["density"] for m in record["models"]] == [0.3, 0.5]
    weights = t5["a"] / "model.safetensors"
    assert record["models"][0]["files"][str(weights)] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["memory"]["peak_rss_growth_mb"] >= 0 and record["memory"]["working_set_mb"] > 0
    loaded = T5ForConditionalGeneration.from_pretrained(out)  # from the shards and the index
    assert torch.equal(loaded.state_dict()[name], expected)

    once, _ = _merge(tmp_path, "dare1", base_model=str(t5["base"]), models=[str(t5["a"]), str(t5["b"])],
                     method="dare_linear", parameters={"drop_rate": 0.5, "seed": 1})
    twice, _ = _merge(tmp_path, "dare2", base_model=str(t5["base"]), models=[str(t5["a"]), str(t5["b"])],
                      method="dare_linear", parameters={"drop_rate": 0.5, "seed": 1})
    assert all(torch.equal(x, _tensors(twice)[k]) for k, x in _tensors(once).items())  # the masks are seeded
    dare_a = dare(a[name] - base[name], 0.5, keep_mask(base[name].shape, 0.5, tensor_seed(1, 0, name)))
    dare_b = dare(b[name] - base[name], 0.5, keep_mask(base[name].shape, 0.5, tensor_seed(1, 1, name)))
    torch.testing.assert_close(_tensors(once)[name], base[name] + dare_a + dare_b, rtol=0, atol=1e-7)


def test_integer_tensors_are_copied_and_must_be_equal_everywhere(t5, tmp_path, capsys):
    def with_counter(source: Path, name: str, counter: torch.Tensor) -> Path:
        out = tmp_path / name
        out.mkdir()
        save_file({**_tensors(source), "extra.counter": counter}, str(out / "model.safetensors"))
        shutil.copy(source / "config.json", out / "config.json")
        return out

    base = with_counter(t5["base"], "base", torch.arange(5))
    same, other = with_counter(t5["a"], "same", torch.arange(5)), with_counter(t5["b"], "other", torch.arange(1, 6))
    out, _ = _merge(tmp_path, "ints", base_model=str(base), models=[str(same)], method="ties", dtype="bfloat16")
    merged = _tensors(out)  # int64 first (widest), then the bf16 tensors, in one hand-written safetensors file
    assert torch.equal(merged["extra.counter"], torch.arange(5)) and merged["shared.weight"].dtype == torch.bfloat16
    _expect_error(tmp_path, capsys, {"base_model": str(base), "models": [str(other)], "method": "ties"},
                  "tensor `extra.counter` (I64) is not a float tensor and differs between base_model "
                  f"({base / 'model.safetensors'}) and models[0] ({other / 'model.safetensors'})")


# ------------------------------------------------------------------------------------------ adapters


def _adapter_pair(model_fn, root: Path, name: str, pconfig, seed: int) -> tuple[Path, Path]:
    """(adapter directory, its merge_and_unload export) of a randomly initialised peft adapter on the base."""
    from peft import get_peft_model

    model = model_fn()  # the saved base, rebuilt with its seed
    torch.manual_seed(100 + seed)
    wrapped = get_peft_model(model, pconfig)
    wrapped.save_pretrained(root / name)
    wrapped.merge_and_unload().save_pretrained(root / f"{name}_merged")
    return root / name, root / f"{name}_merged"


def _peft_configs(family: str, method: str, seed: int):
    from peft import IA3Config, LoraConfig

    task = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
    if method == "lora_embedding":  # LoRA on the (tied) embedding, rsLoRA scaling, a per-module alpha
        return LoraConfig(task_type=task, target_modules=["shared", "q"], r=4, lora_alpha=7, use_rslora=True,
                          alpha_pattern={"q": 3}, init_lora_weights=False)
    if family == "t5":
        if method == "lora":
            return LoraConfig(task_type=task, target_modules=["q", "v", "wi_1"], r=4, lora_alpha=8 + seed,
                              init_lora_weights=False)
        return IA3Config(task_type=task, target_modules=["k", "v", "wo"], feedforward_modules=["wo"],
                         init_ia3_weights=False)
    if method == "lora":  # GPT-2's Conv1D stores (in, out): fan_in_fan_out
        return LoraConfig(task_type=task, target_modules=["c_attn"], r=4, lora_alpha=16, fan_in_fan_out=True,
                          init_lora_weights=False)
    return IA3Config(task_type=task, target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                     fan_in_fan_out=True, init_ia3_weights=False)  # c_attn's bias is scaled too


@pytest.mark.parametrize("family,method", [("t5", "lora"), ("t5", "ia3"), ("t5", "lora_embedding"), ("gpt2", "lora"),
                                           ("gpt2", "ia3")])
def test_merging_adapters_equals_merging_their_merged_exports(family, method, tmp_path):
    model_fn = _t5 if family == "t5" else _gpt2
    model_fn().save_pretrained(tmp_path / "base")
    adapters, exports = zip(*(_adapter_pair(model_fn, tmp_path, f"{method}{i}", _peft_configs(family, method, i), i)
                              for i in range(2)))
    for merge_method, parameters in (("ties", {"density": 0.5}), ("dare_ties", {"drop_rate": 0.3}),
                                     ("linear", {})):
        common = dict(base_model=str(tmp_path / "base"), method=merge_method, parameters=parameters)
        from_adapters, summary = _merge(tmp_path, f"{merge_method}_adapters", models=[str(p) for p in adapters], **common)
        from_exports, _ = _merge(tmp_path, f"{merge_method}_exports", models=[str(p) for p in exports], **common)
        mine, theirs = _tensors(from_adapters), _tensors(from_exports)
        assert set(mine) == set(theirs)
        worst = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
        assert worst <= 1e-6, (merge_method, worst)
        assert [m["kind"] for m in summary["models"]] == [method.split("_")[0]] * 2
        adapted = {("t5", "lora"): 16, ("t5", "ia3"): 16, ("t5", "lora_embedding"): 7, ("gpt2", "lora"): 2,
                   ("gpt2", "ia3"): 6}[family, method]
        assert summary["tensors_changed"] == adapted  # only the adapted tensors (and GPT-2's c_attn biases) change


# ------------------------------------------------------------------------------------------ refusals


def _expect_error(tmp_path: Path, capsys, spec: dict, *fragments: str) -> str:
    from train.cli import main

    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "never"), **spec}))
    assert main(["merge", str(file)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err and not (tmp_path / "never").exists()
    return err


def test_mismatched_models_are_refused_naming_the_tensor_and_both_files(t5, tmp_path, capsys):
    base = t5["base"]
    _t5(d_ff=48).save_pretrained(tmp_path / "wide")
    missing = tmp_path / "missing"
    missing.mkdir()
    state = _tensors(t5["a"])
    del state["decoder.final_layer_norm.weight"]
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", missing / "config.json")
    err = _expect_error(tmp_path, capsys, {"base_model": str(base), "method": "ties",
                                           "models": [str(tmp_path / "wide"), str(missing)]},
                        "the models cannot be merged (13 problem(s))",
                        "tensor `encoder.block.0.layer.1.DenseReluDense.wi_0.weight` has shape [64, 32] in base_model "
                        f"({base / 'model.safetensors'}) but [48, 32] in models[0] "
                        f"({tmp_path / 'wide' / 'model.safetensors'})",
                        f"tensor `decoder.final_layer_norm.weight` is in base_model ({base / 'model.safetensors'}) but "
                        f"missing from models[1] ({missing})")
    assert err.count("has shape") == 12  # every wi_0 / wi_1 / wo of both stacks, all in one message

    other = tmp_path / "other_arch"
    shutil.copytree(t5["a"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["T5EncoderModel"]}))
    _expect_error(tmp_path, capsys, {"base_model": str(base), "method": "ties", "models": [str(other)]},
                  f"models[0] ({other / 'config.json'}) is a t5 model ['T5EncoderModel'], but base_model "
                  f"({base / 'config.json'}) is a t5 model ['T5ForConditionalGeneration']")


def test_a_different_tokenizer_is_refused_naming_both_files(t5, tmp_path, capsys):
    from transformers import AutoTokenizer

    base, expert = tmp_path / "base", tmp_path / "expert"
    shutil.copytree(t5["base"], base)
    shutil.copytree(t5["a"], expert)
    AutoTokenizer.from_pretrained(REPO / "configs/tokenizers/t5").save_pretrained(base)
    doc = json.loads((base / "tokenizer.json").read_text())
    doc["model"]["vocab"][5][0] = "▁changed"
    (expert / "tokenizer.json").write_text(json.dumps(doc))
    _expect_error(tmp_path, capsys, {"base_model": str(base), "method": "ties", "models": [str(expert)]},
                  f"models[0] has a different tokenizer from base_model: {base / 'tokenizer.json'} vs "
                  f"{expert / 'tokenizer.json'}", "first difference at id 5", "'▁changed'")


def test_a_bad_config_lists_every_problem_and_exits_2(t5, tmp_path, capsys):
    err = _expect_error(tmp_path, capsys, {
        "base_modle": str(t5["base"]), "models": [{"model": str(t5["a"]), "densty": 0.5}, str(t5["b"])],
        "method": "tie", "parameters": {"lamda": 1.0, "density": 1.5, "drop_rate": 0.5}},
        "unknown key `base_modle`. Did you mean `base_model`?",
        "unknown key `models[0].densty`. Did you mean `models[0].density`?",
        "`method` is 'tie', but it must be one of 'linear', 'task_arithmetic', 'ties', 'dare_linear', 'dare_ties'. "
        "Did you mean 'ties'?",
        "unknown key `parameters.lamda`. Did you mean `parameters.lambda`?",
        "`parameters.density` is 1.5; it must be in (0, 1]")
    assert len(err.strip().splitlines()) == 5, err
    err = _expect_error(tmp_path, capsys, {"base_model": str(t5["base"]), "models": [str(t5["a"])], "method": "ties",
                                           "parameters": {"drop_rate": 0.5, "density": 0}, "dtype": "fp16"},
                        "`parameters.drop_rate` is set, but `ties` does not use it",
                        "`parameters.density` is 0.0; it must be in (0, 1]", "`dtype` is 'fp16'")
    assert len(err.strip().splitlines()) == 3, err


def test_overrides_set_keys_and_index_experts(t5, tmp_path):
    file = tmp_path / "m.yaml"
    file.write_text(yaml.safe_dump({"base_model": str(t5["base"]), "models": [str(t5["a"]), str(t5["b"])],
                                    "method": "ties", "output_dir": str(tmp_path / "out")}))
    cfg = load_merge_config(file, ["models.1.weight=2", "parameters.density=0.5", "models.0.density=1"])
    assert [m.weight for m in cfg.models] == [1.0, 2.0] and cfg.expert_values("density") == [1.0, 0.5]
    with pytest.raises(ConfigError, match="`7` is not an index of the 2 entries of `models`"):
        load_merge_config(file, ["models.7.weight=2"])
    merge(load_merge_config(file))
    with pytest.raises(ConfigError, match="exists and is not empty; choose another directory or set `overwrite=true`"):
        load_merge_config(file)
    summary = merge(load_merge_config(file, ["overwrite=true", "method=linear", "parameters=null"]))
    assert json.loads((tmp_path / "out" / "merge_record.json").read_text())["method"] == summary["method"] == "linear"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no partial or replaced directory left


def test_every_shipped_merge_config_validates(tmp_path, monkeypatch):
    files = sorted((REPO / "configs/merges").glob("*.yaml"))
    assert files
    for path in files:
        data = yaml.safe_load(path.read_text())
        monkeypatch.chdir(tmp_path)  # its inputs are training outputs: stand in empty directories for them
        for name in [data.get("base_model")] + [m["model"] if isinstance(m, dict) else m for m in data["models"]]:
            if name:
                (tmp_path / name).mkdir(parents=True, exist_ok=True)
        cfg = load_merge_config(path)
        assert cfg.method and cfg.models


# ------------------------------------------------------------------------------------------ end to end


def test_the_merge_loads_and_mtf_eval_scores_it(tmp_path, capsys):
    """A tiny T5 with the real T5 tokenizer, two experts, `mtf merge` then `mtf eval` in this process."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from train.cli import main

    spec = json.loads((REPO / "configs/models/t5_tiny.json").read_text())
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    model.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(REPO / "configs/tokenizers/t5").save_pretrained(tmp_path / "base")
    experts = [_perturbed(tmp_path / "base", tmp_path / f"e{i}", i) for i in range(2)]
    file = tmp_path / "merge.yaml"
    file.write_text(yaml.safe_dump({"base_model": str(tmp_path / "base"), "models": [str(e) for e in experts],
                                    "method": "ties", "parameters": {"density": 0.2}, "dtype": "bfloat16",
                                    "output_dir": str(tmp_path / "merged")}))
    assert main(["merge", str(file), "--dry-run"]) == 0  # headers checked, nothing written
    assert "merge plan checked: ties" in capsys.readouterr().out and not (tmp_path / "merged").exists()
    assert main(["merge", str(file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == 51 and summary["files"] == ["model.safetensors"]
    assert summary["tokenizer_from"] == str(tmp_path / "base")
    out = tmp_path / "merged"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert loaded.shared.weight.dtype == torch.bfloat16
    with fresh_accelerate():
        code = main(["eval", str(out), "--mixture", "data_mixtures/demo_eval.yaml", "--max-examples-per-template", "5",
                     "--output", str(tmp_path / "eval.json")])
    assert code == 0, capsys.readouterr().err[-3000:]
    # rows 0-4 hold both COPA questions (rows 0-3 are all "effect"), so the cause-only and effect-only templates score too
    assert len(json.loads((tmp_path / "eval.json").read_text())["templates"]["super_glue/copa"]) == 12
