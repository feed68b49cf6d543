"""Benchmark packing: efficiency vs pad-to-longest, training tokens/s packed vs padded, packer speed.

Data: real task files from ``../shared/data/tasks`` turned into simple prompts (the text fields joined
as ``field: value``, the label or answer as the target), tokenized with the real T5 tokenizer following
the tokenized-example contract (enc-dec: + eos on both parts; decoder: target = tokens(" " + target) + eos).

Measured:

* decoder: packed efficiency at ``max_tokens=1024`` vs pad-to-longest batches of 32 examples;
* enc-dec: packed efficiency at 1024/256 vs pad-to-longest batches of 32 (inputs, targets, both);
* train: real (non-pad) tokens/s of forward+backward of a tiny Llama on packed rows vs pad-to-longest
  batches (token ids folded into a small vocabulary, so the output layer does not dominate);
* packer: examples/s of ``Packer.next_row`` (decoder, 1024, window 16).

Usage::

    python scripts/bench_packing.py [--examples 6000] [--train-steps 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train.data import Packer  # noqa: E402
from train.modeling import collate, model_forward, token_nll  # noqa: E402

SHARED = Path(os.environ.get("MTF_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "data"
# file -> target field (default "label"); a small but varied set of prompt lengths.
FILES = {
    "super_glue/rte/superglue_format/train.jsonl": "label",
    "super_glue/boolq/superglue_format/val.jsonl": "label",
    "ag_news/test.jsonl": "Class Index",
    "trec/train.jsonl": "label",
    "rotten_tomatoes/sample.jsonl": "label",
    "cosmos_qa/validation.jsonl": "label",
    "sciq/validation.jsonl": "correct_answer",
    "social_i_qa/validation.jsonl": "label",
    "piqa/validation.jsonl": "label",
    "glue/mrpc/validation.jsonl": "label",
}


def load_prompts(limit: int, seed: int) -> list[tuple[str, str]]:
    """(inputs, target) pairs, shuffled, from the shared task files."""
    pairs = []
    for rel, target_field in FILES.items():
        with open(SHARED / "tasks" / rel, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                text = " ".join(f"{k}: {v}" for k, v in row.items() if isinstance(v, str) and k != target_field)
                pairs.append((text, str(row.get(target_field, ""))))
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def tokenize(pairs: list[tuple[str, str]], tokenizer, kind: str) -> list[dict]:
    eos = tokenizer.eos_token_id
    inputs = tokenizer([p[0] for p in pairs], add_special_tokens=False)["input_ids"]
    prefix = "" if kind == "encdec" else " "
    targets = tokenizer([prefix + p[1] for p in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for i, (inp, tgt) in enumerate(zip(inputs, targets)):
        inp = inp + [eos] if kind == "encdec" else inp
        out.append({"input_ids": inp, "target_ids": tgt + [eos], "task": "bench", "index": i})
    return out


def padded_efficiency(examples: list[dict], kind: str, caps: dict, batch: int = 32) -> dict:
    """Pad-to-longest per batch of ``batch`` examples (after the same truncation as the packer)."""
    fitted = [r for r in Packer(kind, pack=False, **caps).rows(iter(examples))]
    real_in = real_tgt = cap_in = cap_tgt = 0
    for i in range(0, len(fitted), batch):
        rows = fitted[i : i + batch]
        if kind == "encdec":
            li, lt = max(len(r["input_ids"]) for r in rows), max(len(r["target_ids"]) for r in rows)
            real_in += sum(len(r["input_ids"]) for r in rows)
            real_tgt += sum(len(r["target_ids"]) for r in rows)
            cap_in, cap_tgt = cap_in + li * len(rows), cap_tgt + lt * len(rows)
        else:
            real_in += sum(len(r["input_ids"]) for r in rows)
            cap_in += max(len(r["input_ids"]) for r in rows) * len(rows)
    if kind == "encdec":
        both = (real_in + real_tgt) / (cap_in + cap_tgt)
        return {"input": real_in / cap_in, "target": real_tgt / cap_tgt, "both": both}
    return {"both": real_in / cap_in}


def efficiency(examples: list[dict]) -> tuple[dict, dict]:
    dec_caps = {"max_tokens": 1024}
    packer = Packer("decoder", window=16, **dec_caps)
    list(packer.rows(iter(examples["decoder"])))
    decoder = {
        "packed_efficiency": packer.efficiency()["efficiency"],
        "padded_efficiency": padded_efficiency(examples["decoder"], "decoder", dec_caps)["both"],
        "examples_per_row": packer.efficiency()["examples_per_row"],
        "truncated_inputs": packer.stats["truncated_inputs"],
    }
    ed_caps = {"max_input_tokens": 1024, "max_target_tokens": 256}
    packer = Packer("encdec", window=16, **ed_caps)
    list(packer.rows(iter(examples["encdec"])))
    eff, st = packer.efficiency(), packer.stats
    padded = padded_efficiency(examples["encdec"], "encdec", ed_caps)
    encdec = {
        "packed_efficiency": (st["input_tokens"] + st["target_tokens"]) / (st["rows"] * (1024 + 256)),
        "padded_efficiency": padded["both"],
        "packed_input_efficiency": eff["input_efficiency"],
        "packed_target_efficiency": eff["target_efficiency"],
        "padded_input_efficiency": padded["input"],
        "padded_target_efficiency": padded["target"],
        "examples_per_row": eff["examples_per_row"],
    }
    return decoder, encdec


def train_throughput(examples: list[dict], steps: int, vocab: int = 512, max_tokens: int = 512) -> dict:
    """Real tokens/s of forward+backward, packed rows vs pad-to-longest batches of the same examples."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=max_tokens)
    )
    folded = [
        dict(ex, input_ids=[t % vocab for t in ex["input_ids"]], target_ids=[t % vocab for t in ex["target_ids"]])
        for ex in examples
    ]
    caps = {"max_tokens": max_tokens}

    def run(batches: list[dict], tokens: list[int]) -> float:
        model_forward(model, batches[0], "decoder")  # warm-up
        start, done = time.perf_counter(), 0
        for batch, n in zip(batches[:steps], tokens[:steps]):
            logits = model_forward(model, batch, "decoder")
            token_nll(logits, batch["labels"]).sum().backward()
            done += n
        return done / (time.perf_counter() - start)

    rows = list(Packer("decoder", window=16, **caps).rows(iter(folded)))
    packed_batches, packed_tokens = [], []
    for i in range(0, len(rows) - 3, 4):  # 4 rows of 512 per step
        chunk = rows[i : i + 4]
        packed_batches.append(collate(chunk, "decoder", pad_id=0, **caps))
        packed_tokens.append(sum(len(r["input_ids"]) for r in chunk))
    singles = list(Packer("decoder", pack=False, **caps).rows(iter(folded)))
    padded_batches, padded_tokens = [], []
    for i in range(0, len(singles) - 31, 32):  # 32 examples per step, padded to the longest
        chunk = singles[i : i + 32]
        padded_batches.append(collate(chunk, "decoder", pad_id=0, pad_to="longest", **caps))
        padded_tokens.append(sum(len(r["input_ids"]) for r in chunk))
    packed = run(packed_batches, packed_tokens)
    padded = run(padded_batches, padded_tokens)
    return {"tokens_per_s_packed": packed, "tokens_per_s_padded": padded, "ratio": packed / padded}


def packer_speed(examples: list[dict], repeats: int = 3) -> dict:
    stream = (ex for _ in range(repeats) for ex in examples)
    start = time.perf_counter()
    packer = Packer("decoder", max_tokens=1024, window=16)
    for _ in packer.rows(stream):
        pass
    return {"examples_per_s": packer.stats["examples_seen"] / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=6000, help="prompted examples to tokenize")
    parser.add_argument("--train-steps", type=int, default=6, help="timed forward+backward steps per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not (SHARED / "tasks").is_dir():
        sys.exit(f"bench_packing: needs the shared data folder {SHARED} (set MTF_SHARED_DIR)")
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "t5"))
    pairs = load_prompts(args.examples, args.seed)
    examples = {kind: tokenize(pairs, tokenizer, kind) for kind in ("decoder", "encdec")}
    decoder, encdec = efficiency(examples)
    result = {
        "decoder": decoder,
        "encdec": encdec,
        "train": train_throughput(examples["decoder"], args.train_steps),
        "packer": packer_speed(examples["decoder"]),
        "examples": len(pairs),
    }
    if args.json:
        print(json.dumps(result))
        return
    for section, values in result.items():
        print(section, values if not isinstance(values, dict) else {k: round(v, 3) for k, v in values.items()})


if __name__ == "__main__":
    main()
