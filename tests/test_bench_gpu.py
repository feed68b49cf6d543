"""scripts/bench_gpu.py: the FLOPs / MFU formula on hand examples, and the ``--smoke`` run end to end on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_script

bench = load_script("bench_gpu")


def test_decoder_flops_by_hand():
    # N = 100 matmul parameters, 2 layers, d_attn 4; one example of 3 input + 1 target tokens (s = 4):
    # 6 * 100 * 4 = 2400 dense; 12 * 2 * 4 * (4 * 5 / 2) = 960 attention (causal pairs 10).
    dims = bench.ModelDims("decoder", d_attn=4, n_params=100, layers=2)
    assert bench.example_flops(dims, 3, 1) == 2400 + 960


def test_encdec_flops_by_hand():
    # s_in 3, s_tgt 2: dense 6 * (10 * 3 + 20 * 2) = 420; pairs = 1 * 9 (encoder) + 2 * (3 causal + 6 cross) = 27;
    # attention 12 * 8 * 27 = 2592.
    dims = bench.ModelDims("encdec", d_attn=8, n_enc=10, n_dec=20, enc_layers=1, dec_layers=2)
    assert bench.example_flops(dims, 3, 2) == 420 + 2592


def test_mfu_and_peaks():
    assert bench.mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert bench.mfu(1e12, None) is None
    assert bench.peak_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_for("NVIDIA H200") == 989.0
    assert bench.peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_for("NVIDIA L40S") == 362.0
    assert bench.peak_for("Some Future GPU") is None


def test_model_dims_count_the_matmul_parameters():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    dims = bench.model_dims(model, "decoder")
    total = sum(p.numel() for p in model.parameters())
    assert dims.n_params == total - 50 * 16  # every parameter but the input embedding lookup
    assert (dims.layers, dims.d_attn) == (2, 16)
    cfg.tie_word_embeddings = True
    tied = LlamaForCausalLM(cfg)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert bench.model_dims(tied, "decoder").n_params == total - 50 * 16  # the tied head is a matmul all the same


def test_model_dims_encdec():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg)
    dims = bench.model_dims(model, "encdec")
    total = sum(p.numel() for p in model.parameters())
    # The shared embedding lookup out, the output layer in (on the decoder side), whether or not the build ties it.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert dims.n_enc + dims.n_dec == total - 50 * 16 + (50 * 16 if tied else 0)
    assert (dims.enc_layers, dims.dec_layers, dims.d_attn) == (1, 2, 16)


def test_smoke_run_json(tmp_path):
    bench_md = tmp_path / "BENCHMARKS.md"
    bench_md.write_text("# Benchmarks\n\nkept\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_gpu.py"), "--smoke", "--json",
                           "--write-benchmarks", str(bench_md)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["smoke"] is True and result["device"] == "cpu" and result["peak_bf16_tflops"] is None
    assert set(result["models"]) == {"decoder", "encdec"}
    for kind, model in result["models"].items():
        arms = model["arms"]
        backends = {"packed_flex", "packed_flash"} if kind == "decoder" else {"packed_flex"}
        assert set(arms) == {"packed_sdpa", "padded", *backends}
        for name in backends:  # no CUDA (and fp32) here: the trainer's own start-up error says why
            assert arms[name]["available"] is False
            assert "model.attn_implementation" in arms[name]["reason"]
        for name in ("packed_sdpa", "padded"):
            arm = arms[name]
            assert arm["tokens_per_second"] > 0 and arm["timed_steps"] >= 1
            assert arm["mfu"] is None  # CPU, no peak
            assert arm["model_tflops_per_second"] > 0
            assert arm["real_tokens_per_step"] <= arm["token_slots_per_step"]
        assert arms["packed_sdpa"]["micro_batches_per_step"] == 1
        assert model["packed_over_padded"] > 0
        assert 0 < model["padded_efficiency"] <= 1 and 0 < model["packed_efficiency"] <= 1
    text = bench_md.read_text(encoding="utf-8")
    assert "kept" in text and text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert "| decoder" in text and "packed_sdpa" in text
