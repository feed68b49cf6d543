"""Generation for templates without answer choices: greedy or beam decoding, per architecture.

Decoders continue a left-padded prompt through ``generate``; T5 generates from its encoder; prefix-LM runs
its own greedy loop with a bidirectional prompt mask (``generate`` would apply a causal one). Under
ZeRO-3 with several ranks ``generate(synced_gpus=True)`` keeps ranks stepping together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from train.errors import ConfigError
from train.evaluation.batching import cache_kwarg, model_device_dtype, output_cache, pad_sequences, prefix_prompt_mask
from train.evaluation.distributed import DistContext
from train.evaluation.items import GenItem


def generate_predictions(
    model,
    tokenizer,
    items: Sequence[GenItem],
    kind: str,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    dist: DistContext | None = None,
    pad_id: int = 0,
    eos_id: int = 1,
) -> dict[int, str]:
    """Greedy (num_beams=1) or beam decoding; returns ``{item.index: text}``.

    Under ZeRO-3 with several ranks (``dist`` given) ``generate(synced_gpus=True)`` keeps ranks stepping
    together, and ranks with fewer batches run dummy ones. prefix_lm supports greedy decoding only
    (``generate`` would apply a causal mask over the prompt).

    Raises:
        ConfigError: beam search requested for prefix_lm.
    """
    if not items and dist is None:
        return {}
    if kind == "prefix_lm" and num_beams != 1:
        raise ConfigError("evaluation: prefix_lm generation supports num_beams=1 only (greedy)")
    device, dtype = model_device_dtype(model)
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].prompt_ids), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    num_batches = dist.max_int(len(batches)) if dist is not None else len(batches)
    out: dict[int, str] = {}
    for b in range(num_batches):
        batch = [items[i] for i in batches[b]] if b < len(batches) else [GenItem(-1, [eos_id], [""])]
        if kind == "prefix_lm":
            prompts = [it.prompt_ids for it in batch]
            new_tokens = _greedy_prefix_lm(model, prompts, max_new_tokens, pad_id, eos_id, dtype)
        else:
            # Decoders continue the prompt, so prompts are left-padded; T5 does not care.
            ids, mask = pad_sequences([it.prompt_ids for it in batch], pad_id, "left" if kind == "decoder" else "right")
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                num_beams=num_beams, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
                synced_gpus=dist is not None,
            )
            new_tokens = gen[:, ids.shape[1] :].tolist() if kind == "decoder" else gen.tolist()
        for it, toks in zip(batch, new_tokens):
            if it.index >= 0:
                out[it.index] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    return out


def _greedy_prefix_lm(model, prompts, max_new_tokens: int, pad_id: int, eos_id: int, dtype) -> list[list[int]]:
    """Greedy decoding with a bidirectional prompt (prefix-LM), using the KV cache."""
    device = next(model.parameters()).device
    p_ids, p_mask = pad_sequences(prompts, pad_id, "right")
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    p_len = p_mask.sum(-1)
    attn, neg = prefix_prompt_mask(p_mask, dtype)
    out = model(input_ids=p_ids, attention_mask=attn, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    logits = out.logits[torch.arange(len(prompts), device=device), p_len - 1]
    cache, generated = output_cache(out), []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok = logits.argmax(-1)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        generated.append(tok)
        done |= tok == eos_id
        if bool(done.all()):
            break
        gen_mask = torch.ones(len(prompts), step + 1, dtype=p_mask.dtype, device=device)
        full = torch.cat([p_mask, gen_mask], dim=-1)  # (B, P + step + 1): the new token sees all earlier keys
        attn = torch.zeros(len(prompts), 1, 1, full.shape[1], dtype=dtype, device=device).masked_fill(
            ~full.bool()[:, None, None, :], neg
        )
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=(p_len + step)[:, None],
                    use_cache=True, **{cache_kwarg(model): cache})
        cache, logits = output_cache(out), out.logits[:, -1]
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    return [[t for t in r if t != pad_id] for r in rows]
