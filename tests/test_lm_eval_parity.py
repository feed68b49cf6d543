"""Parity with lm-evaluation-harness: under ``scoring: lm-eval`` the per-choice log-likelihoods of ``mtf eval``
equal the harness's own (its HF model class, ``HFLM.loglikelihood``) on the same checkpoint and prompts.

Prompts are rendered from the shipped PromptSource COPA templates (``data_mixtures/demo_eval.yaml``): every
choice is several tokens and, within an example, the two choices often share their first tokens ("The
man ..."). The test asserts both properties are present, adds a prompt with trailing whitespace (the harness
moves it into the continuation) and one longer than T5's 512 positions, and checks the scores both ways (≤ 1e-4), and that under the default t0
convention the scores differ by exactly the choices' eos.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface", reason="lm-evaluation-harness (lm_eval) is not "
                                 "installed; `make install` installs the pinned version")
from lm_eval.api.instance import Instance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = 4  # COPA rows per template; all 12 templates


def _save(tmp_path: Path, config_file: str, tokenizer_dir: Path, seq2seq: bool) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    spec = json.loads((REPO / "configs/models" / config_file).read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config)
    out = tmp_path / config_file.removesuffix(".json")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def copa() -> list[dict]:
    from train.evaluation.runner import load_examples

    examples, _, _ = load_examples(str(REPO / "data_mixtures/demo_eval.yaml"), max_examples_per_template=ROWS)
    # One prompt that ends in whitespace: the harness moves it to the start of the continuation.
    examples.append({**examples[0], "inputs": examples[0]["inputs"] + "  ", "template": "trailing whitespace"})
    # One prompt longer than T5's 512 positions (~750 tokens: the harness keeps its last 512; the decoders' 1024 fit).
    examples.append({**examples[1], "inputs": " ".join([examples[1]["inputs"]] * 20), "template": "over-long"})
    return examples


def _ours(model_dir: Path, examples: list[dict], scoring: str) -> tuple[list, list[tuple[str, str]], str]:
    """Per-choice summed log-probabilities from this stack, the (context, continuation) requests, the kind."""
    from train.evaluation.evaluator import ZeroShotEvaluator
    from train.evaluation.items import resolve_scoring
    from train.evaluation.runner import load_model_for_eval
    from train.evaluation.scoring import score_rank_items

    model, tok, kind = load_model_for_eval(str(model_dir))
    convention = resolve_scoring(scoring)
    evaluator = ZeroShotEvaluator(tok, examples, kind=kind, scoring=convention,  # the prompt cap as mtf eval's
                                  max_input_tokens=convention.max_prompt_tokens(kind, model.config, tok))
    scores = score_rank_items(model.eval(), evaluator.rank_items, kind, batch_size=5, pad_id=evaluator.pad)
    assert len(evaluator.rank_items) == len(examples)  # nothing skipped: every request is compared
    flat, requests = [], []
    for item, ex in zip(evaluator.rank_items, examples):
        flat.extend(scores[item.index].sum_logprob)
        requests.extend((ex["inputs"], " " + choice) for choice in ex["answer_choices"])
    return flat, requests, kind


def _harness(model_dir: Path, requests: list[tuple[str, str]], backend: str) -> list[float]:
    lm = lm_eval_hf.HFLM(pretrained=str(model_dir), backend=backend, device="cpu", batch_size=4)
    out = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                            for i, r in enumerate(requests)], disable_tqdm=True)
    return [logprob for logprob, _ in out]


def _check(model_dir: Path, examples: list[dict], backend: str) -> None:
    ours, requests, kind = _ours(model_dir, examples, "lm-eval")
    theirs = _harness(model_dir, requests, backend)
    assert len(ours) == len(theirs) == sum(len(ex["answer_choices"]) for ex in examples)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst <= 1e-4, f"{kind}: max |mtf - harness| = {worst:.2e} over {len(ours)} choices"
    assert all(math.isfinite(x) and x < 0 for x in ours)


def _properties(model_dir: Path, examples: list[dict]) -> None:
    """The requests really have multi-token choices and choices that share a prefix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    firsts = [[tuple(tok(" " + c, add_special_tokens=False)["input_ids"][:1]) for c in ex["answer_choices"]]
              for ex in examples]
    assert all(len(tok(" " + c, add_special_tokens=False)["input_ids"]) > 1 for ex in examples
               for c in ex["answer_choices"])
    assert any(len(set(f)) < len(f) for f in firsts), "no example has two choices sharing their first token"


def test_t5_log_likelihoods_equal_the_harness(tmp_path, copa):
    model_dir = _save(tmp_path, "t5_tiny.json", REPO / "configs/tokenizers/t5", seq2seq=True)
    _properties(model_dir, copa)
    _check(model_dir, copa, "seq2seq")


def test_t0_convention_differs_from_the_harness_by_the_choice_eos(tmp_path, copa):
    """Under the default convention each choice also scores its eos: the difference is that token's log-prob."""
    model_dir = _save(tmp_path, "t5_tiny.json", REPO / "configs/tokenizers/t5", seq2seq=True)
    harness_like, _, _ = _ours(model_dir, copa, "lm-eval")
    t0, _, _ = _ours(model_dir, copa, "t0")
    assert all(b < a for a, b in zip(harness_like, t0))  # one more (eos) token, log-prob < 0


def test_decoder_with_the_t5_tokenizer_equals_the_harness(tmp_path, copa):
    """A Llama-style decoder whose tokenizer appends eos to every encoding (T5's): the harness's split applies."""
    model_dir = _save(tmp_path, "llama_tiny.json", REPO / "configs/tokenizers/t5", seq2seq=False)
    _check(model_dir, copa, "causal")


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers/gpt2").is_dir(),
                    reason=f"needs the GPT-2 tokenizer in {SHARED_DATA / 'tokenizers/gpt2'} (present in CI)")
def test_gpt2_log_likelihoods_equal_the_harness(tmp_path, copa):
    model_dir = _save(tmp_path, "gpt2_tiny.json", SHARED_DATA / "tokenizers/gpt2", seq2seq=False)
    _properties(model_dir, copa)
    _check(model_dir, copa, "causal")
