"""Parameter-efficient finetuning through peft: (IA)^3 and LoRA in the same loop, packing, checkpoints and eval.

What is proved here: a fresh adapter changes nothing (IA^3 vectors start at 1, LoRA's B at 0); packed
rows stay exact with adapters on (losses and adapter gradients vs unpacked); an adapter run trains only
the adapter (the frozen base is bit-identical afterwards, optimizer state holds the adapter alone, the
checkpoint is a few hundred KB); kill -9 + resume is bit-exact; 2 processes (DDP) and DeepSpeed ZeRO-3
match 1 process; the exported adapter loads with ``PeftModel.from_pretrained`` and ``mtf eval`` scores
it exactly like the merged export; gradient checkpointing with a frozen base still trains
(transformers#26334); bad adapter settings fail before training with exit 2.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from conftest import FAST
from test_features import examples, pack
from test_trainer import PY, REPO, _env, _losses, _mtf, _wait_for_checkpoint
from train.config import load_config
from train.modeling.adapters import parameter_counts, wrap_with_adapter
from train.modeling.features import model_forward, reference_target_nll
from train.modeling.losses import per_example_losses, token_nll

# The tiny T-Few preset ((IA)^3, three losses, few-shot sets), shortened: 8 steps, no eval, every step logged.
ADAPTER = ["configs/runs/tfew_tiny.yaml", "eval.mixture=null", "trainer.max_steps=8", "trainer.global_batch_size=4",
           "trainer.micro_batch_size=2", "schedule.name=constant", "schedule.warmup_steps=0", "logging.every_steps=1",
           "logging.progress_bar=false", "data.max_input_tokens=128", "data.max_target_tokens=32",
           "checkpoint.export_final=false", "peft.export_merged=false",
           # AdamW, not the preset's Adafactor: under DeepSpeed ZeRO, Adafactor sees flat partitions instead of
           # the parameter tensors (its update RMS and factoring differ), so ZeRO cannot match 1 process with it.
           "optim.name=adamw", "optim.lr=0.05"]


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "encdec":
        config = T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=128, dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu")
        return T5ForConditionalGeneration(config).eval()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _wrap(model: torch.nn.Module, method: str, **peft) -> torch.nn.Module:
    overrides = [f"peft.method={method}", "model.config=configs/models/t5_tiny.json"]
    overrides += [f"peft.{k}={json.dumps(v)}" for k, v in peft.items()]
    cfg = load_config(None, overrides)
    return wrap_with_adapter(cfg, model, model.config)


@pytest.mark.parametrize("method", ["ia3", "lora"])
@pytest.mark.parametrize("kind", ["encdec", "decoder"])
def test_a_fresh_adapter_gives_the_base_models_logits(kind, method):
    base = _tiny(kind)
    exs = examples(6)
    _, batch = pack(exs, kind)
    with torch.no_grad():
        before = model_forward(base, batch, kind)
        wrapped = _wrap(base, method).eval()
        after = model_forward(wrapped, batch, kind)
    assert (after - before).abs().max().item() <= 1e-6
    trainable, total = parameter_counts(wrapped)
    assert 0 < trainable < 0.15 * total  # LoRA r=8 on width 32 is large; the real presets are far smaller
    assert all(("ia3_l" in n or "lora_" in n) for n, p in wrapped.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["ia3", "lora"])
@pytest.mark.parametrize("kind", ["encdec", "decoder", "prefix_lm"])
def test_packed_equals_unpacked_with_an_adapter(kind, method):
    """The adapter must not change how masks reach attention: losses and adapter gradients stay exact."""
    model = _wrap(_tiny("encdec" if kind == "encdec" else "decoder"), method)
    torch.manual_seed(1)
    with torch.no_grad():  # move the adapter off its identity start, so it really takes part
        for name, param in model.named_parameters():
            if param.requires_grad:  # small: fp32 rounding of larger gradients alone reaches 1e-5 in absolute terms
                param.add_(0.05 * torch.randn_like(param))
    trainable = [p for p in model.parameters() if p.requires_grad]
    exs = examples(10)
    rows, batch = pack(exs, kind)
    assert max(len(r["indices"]) for r in rows) >= 3
    order = [i for r in rows for i in r["indices"]]

    nll = token_nll(model_forward(model, batch, kind), batch["labels"])
    packed = per_example_losses(nll, batch)
    packed_grads = torch.autograd.grad(nll.sum(), trainable)
    refs = [reference_target_nll(model, exs[i], kind, decoder_start_id=0) for i in order]
    ref_grads = torch.autograd.grad(torch.stack([r.sum() for r in refs]).sum(), trainable)

    assert max(abs(a - r.mean().item()) for a, r in zip(packed, refs)) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(packed_grads, ref_grads)) <= 1e-5
    assert all(g.abs().sum() > 0 for g in packed_grads)


def test_gradient_checkpointing_with_a_frozen_base_trains_the_adapter():
    """transformers#26334: frozen embeddings + reentrant checkpointing silently dropped adapter gradients.

    On the pinned torch/transformers the adapter gets its gradients even without the input-grad hook
    that wrap_with_adapter installs (transformers 5 installs one too); this guards against a regression.
    """
    cfg = load_config(None, ["peft.method=lora", "model.config=configs/models/t5_tiny.json",
                             "model.gradient_checkpointing=true"])
    model = _tiny("encdec")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = wrap_with_adapter(cfg, model, model.config).train()
    _, batch = pack(examples(6), "encdec")
    nll = token_nll(model_forward(model, batch, "encdec"), batch["labels"])
    nll.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n), \
        [n for n, g in grads.items() if g is None]


# ------------------------------------------------------------------------------------------ end to end


def test_bf16_and_gradient_checkpointing_adapter_run_trains(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "bf16"
    proc = _mtf(["train", *ADAPTER, "trainer.max_steps=2", "trainer.precision=bf16",
                 "model.gradient_checkpointing=true", "checkpoint.export_final=true", f"run.output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    vectors = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in vectors.values())
    assert sum(int((v != 1).sum()) for v in vectors.values()) > 0.5 * sum(v.numel() for v in vectors.values())


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ia3")
    proc = _mtf(["train", *ADAPTER, f"run.output_dir={run}", "checkpoint.every_steps=4",
                 "checkpoint.export_final=true", "peft.export_merged=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run / "stdout.txt").write_text(proc.stdout)
    return run


def test_adapter_run_trains_only_the_adapter(adapter_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    line = next(ln for ln in (adapter_run / "stdout.txt").read_text().splitlines() if "trainable /" in ln)
    found = re.search(r"parameters: ([\d,]+) trainable / ([\d,]+) total", line)
    trainable, total = (int(x.replace(",", "")) for x in found.groups())
    assert 0 < trainable < 0.01 * total, line  # the tiny T5 (IA)^3 preset: well under 1%
    records = [json.loads(ln) for ln in (adapter_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "train/loss_rank_classification" in r][-1]
    assert last["examples_with_choices"] > 0  # the run reports how many trained examples had answer choices
    assert all(k in last for k in ("train/loss_lm", "train/loss_unlikelihood"))

    # the frozen base after training (final/base holds the trained model's base weights) == a fresh seeded build
    cfg = load_config(ADAPTER[0], [*ADAPTER[1:], f"run.output_dir={adapter_run}"])
    from train.modeling.models import build_model, load_model_config

    from accelerate.utils import set_seed

    set_seed(cfg.trainer.seed)
    fresh = build_model(cfg.model, load_model_config(cfg.model), "encdec").state_dict()
    base = AutoModelForSeq2SeqLM.from_pretrained(adapter_run / "final" / "base").state_dict()
    assert all(torch.equal(base[k], fresh[k]) for k in fresh), "the base changed during an adapter run"

    # the adapter moved; merged differs from the base exactly in the adapted modules
    adapter = load_file(str(adapter_run / "final" / "adapter_model.safetensors"))
    assert adapter and all("ia3_l" in k for k in adapter)
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in adapter.values())
    merged = AutoModelForSeq2SeqLM.from_pretrained(adapter_run / "final" / "merged").state_dict()
    changed = {k.rsplit(".", 2)[-2] for k in merged if not torch.equal(merged[k], base[k])}
    assert changed == {"k", "v", "wi_1"}, changed

    # peft's own loader takes the export
    loaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(adapter_run / "final" / "base"),
                                       str(adapter_run / "final"))
    assert sum(p.numel() for n, p in loaded.named_parameters() if "ia3_l" in n) == trainable

    # the checkpoint holds the adapter only: its weights, its optimizer state, RNG and trainer state
    ckpt = adapter_run / "checkpoints" / "step-00000008" / "accelerate"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert len(saved) == len(adapter) and all(".ia3_l." in k for k in saved), sorted(saved)[:5]
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(adapter)


def test_a_decoder_trains_a_lora_adapter_with_the_choice_losses(tmp_path):
    """The same loop with a Llama-style decoder, LoRA and T-Few's losses (choices packed as branches)."""
    from safetensors.torch import load_file

    run = tmp_path / "llama"
    proc = _mtf(["train", *ADAPTER, "model.config=configs/models/llama_tiny.json", "model.kind=prefix_lm",
                 "data.max_tokens=192", "peft.method=lora", "peft.target_modules=null", "peft.feedforward_modules=null",
                 "trainer.max_steps=3", "checkpoint.export_final=true", f"run.output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora adapter" in proc.stdout
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["examples_with_choices"] > 0 and "train/loss_rank_classification" in records[-1]
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert {tuple(k.split(".")[-3:-1]) for k in adapter} == {(m, w) for m in ("q_proj", "v_proj") for w in ("lora_A", "lora_B")}
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved off zero


def test_adapter_checkpoint_is_under_5_percent_of_a_full_one(adapter_run, tmp_path):
    full = tmp_path / "full"
    proc = _mtf(["train", "configs/demo.yaml", *FAST, "trainer.max_steps=1", f"run.output_dir={full}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    adapter_size = size(adapter_run / "checkpoints" / "step-00000008")
    full_size = size(full / "checkpoints" / "step-00000001")
    assert adapter_size < 0.05 * full_size, (adapter_size, full_size)


def test_kill_9_then_resume_an_adapter_run_gives_the_same_losses(adapter_run, tmp_path):
    run = tmp_path / "killed"
    args = ["train", *ADAPTER, f"run.output_dir={run}", "checkpoint.every_steps=4",
            "checkpoint.export_final=true", "peft.export_merged=true"]
    proc = subprocess.Popen([PY, "-m", "train.cli", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    final = _mtf(args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stdout + final.stderr
    resumed, uninterrupted = _losses(run), _losses(adapter_run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):  # fp32 on CPU: bit-identical
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])


def test_mtf_eval_scores_the_adapter_like_the_merged_export(adapter_run, tmp_path, capsys):
    from train.cli import main

    def scores(model: Path, out: str) -> dict:
        code = main(["eval", str(model), "--mixture", "data_mixtures/demo_eval.yaml", "--max-examples-per-template", "6",
                     "--output", str(tmp_path / out)])
        assert code == 0, capsys.readouterr().err[-3000:]
        doc = json.loads((tmp_path / out).read_text())
        return {t: (r["score"], r.get("accuracy_length_normalized")) for t, r in doc["templates"]["super_glue/copa"].items()}

    adapter = scores(adapter_run / "final", "adapter.json")
    assert len(adapter) == 12
    assert adapter == scores(adapter_run / "final" / "merged", "merged.json")
    assert adapter == scores(adapter_run / "checkpoints" / "step-00000008", "checkpoint.json")


def test_init_from_starts_from_the_given_adapter(adapter_run, tmp_path):
    cfg = load_config(ADAPTER[0], [*ADAPTER[1:], f"peft.init_from={adapter_run / 'final'}"])
    from safetensors.torch import load_file

    from train.modeling.adapters import build_run_model
    from train.modeling.models import load_model_config

    model = build_run_model(cfg, load_model_config(cfg.model), "encdec")
    saved = load_file(str(adapter_run / "final" / "adapter_model.safetensors"))
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key.replace("ia3_l", "ia3_l.default")], value), key


@pytest.mark.parametrize("override,needle", [
    ("peft.target_modules=[qq]", "`peft.target_modules`: 'qq' matches no module"),
    ("peft.method=prefix", "`peft.method` is 'prefix', but it must be one of"),
    ("peft.init_from={tmp}", "holds no adapter_config.json"),
])
def test_bad_adapter_settings_fail_before_training(tmp_path, capsys, override, needle):
    from train.cli import main

    code = main(["train", "configs/demo.yaml", *FAST, "trainer.max_steps=1", "peft.method=ia3",
                 override.format(tmp=tmp_path), f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert needle in err, err[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_adapter_of_another_base_is_refused(adapter_run, tmp_path, capsys):
    from train.cli import main

    other = tmp_path / "adapter"
    other.mkdir()
    config = json.loads((adapter_run / "final" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "bigscience/T0_3B"
    (other / "adapter_config.json").write_text(json.dumps(config))
    code = main(["train", *ADAPTER, f"peft.init_from={other}", f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "was trained on base model 'bigscience/T0_3B'" in err and "model.name_or_path" in err


def test_a_checkpoint_from_before_the_peft_section_resumes_with_the_default_settings():
    """Keys a checkpoint's version did not have yet count as their defaults, not as a config change."""
    from train.config import to_dict
    from train.loop.checkpointing import config_changes

    now = to_dict(load_config("configs/demo.yaml"))
    saved = {k: v for k, v in now.items() if k != "peft"}
    saved["trainer"] = {k: v for k, v in now["trainer"].items() if k != "loss_weights"}
    assert config_changes(saved, now) == []
    adapter = to_dict(load_config("configs/demo.yaml", ["peft.method=ia3"]))
    assert config_changes(saved, adapter) == ["peft.method: 'none' -> 'ia3'"]


# ------------------------------------------------------------------------------------------ several processes


@pytest.mark.slow
def test_two_processes_and_zero3_match_one_process(adapter_run, tmp_path):
    """DDP, DeepSpeed ZeRO-2 and ZeRO-3 (2 ranks each) adapter runs give 1-process losses and a whole adapter."""
    from safetensors.torch import load_file

    one = _losses(adapter_run)
    reference = load_file(str(adapter_run / "final" / "adapter_model.safetensors"))
    launches = {"ddp": ["--multi_gpu"], "zero2": ["--use_deepspeed"], "zero3": ["--use_deepspeed"]}
    for port, (name, flags) in zip((29561, 29562, 29563), launches.items()):
        env = _env()
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        extra = []
        if name == "ddp":
            env["ACCELERATE_USE_CPU"] = "1"
        else:
            pytest.importorskip("deepspeed")
            extra = [f"trainer.deepspeed=configs/deepspeed/{name}.json"]
        run = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
             "-m", "train.cli", "train", *ADAPTER, f"run.output_dir={run}", *extra,
             "checkpoint.export_final=true"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        assert "= 2 ranks x 1 accumulation x 2 rows" in output
        losses = _losses(run)
        assert sorted(losses) == sorted(one)
        assert max(abs(losses[s] - one[s]) for s in one) <= 1e-5, (name, losses, one)
        exported = load_file(str(run / "final" / "adapter_model.safetensors"))  # peft#453: never empty under ZeRO-3
        assert set(exported) == set(reference)
        for key, value in exported.items():
            assert value.numel() > 0 and (value - reference[key]).abs().max().item() <= 1e-4, (name, key)
