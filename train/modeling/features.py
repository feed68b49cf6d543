"""Feature converter: packed rows -> model tensors, and the one forward pass that knows each architecture.

Only this module knows the model architecture. :func:`collate` pads a micro-batch's rows and makes
labels; :func:`model_forward` builds the segment-aware attention masks at forward time (in the dtype the
attention will run in, so bf16 autocast works) and returns logits aligned with ``batch["labels"]``.

Width (``pad_to``): "capacity" pads every row to ``max_*_tokens`` (static shapes, one compiled graph for
torch.compile / XLA); "longest" pads to the micro-batch's longest row, separately for the encoder and
the decoder side of enc-dec (what Hugging Face's DataCollatorForSeq2Seq does). Both give the same
per-token losses: padding keys are blocked for every real query, padding queries carry no label, and
nothing else depends on the width (labels are shifted within each row's segments, T5's relative bias
and per-segment positions come from row indices, choice gather indices use the batch's own width).
The width is not rounded up to a multiple of 8: the sequence length is not a dimension the linear layers'
matmuls need aligned (the hidden sizes are), sdpa takes any length, and rounding only adds padded work.

With ``trainer.loss_chunk_tokens`` set, :func:`head_inputs` replaces :func:`model_forward`: the same call
through the same wrappers, stopped at the output layer, so the loss can apply that layer to the label
positions only, a chunk at a time (:mod:`train.modeling.losses`), and no (tokens, vocab) logits exist.

Labels are PRE-SHIFTED for every kind: ``logits[b, t]`` predicts ``labels[b, t]``. Never pass these
labels to a Hugging Face model's ``labels=`` argument (a decoder would shift them a second time);
:mod:`train.modeling.losses` computes the loss from the logits.

- enc-dec: ``labels`` = target ids; ``decoder_input_ids`` = the targets shifted right *per segment*
  (``decoder_start_id`` at each segment start, seqio's ``make_autoregressive_inputs``).
- decoder / prefix-LM: ``labels[b, t]`` = token ``t + 1`` when that token is a target token of the SAME
  segment, else IGNORE_INDEX. So the first target token is predicted from the last input token of its
  own segment, and the last token of a segment never predicts the first token of the next one.

Masks (additive float, 0 = attend, ``finfo(dtype).min`` = blocked; boolean masks are silently wrong
under eager attention, see FIELD_NOTES.md), shape (batch, 1, queries, keys):

- encoder self-attention: same segment.
- decoder self-attention (enc-dec and causal decoder): same segment and key <= query.
- cross-attention: decoder segment == encoder segment.
- prefix-LM: same segment and (key <= query, or both query and key are input tokens).

Padding QUERIES (segment 0) may attend to every key: no row of a mask is fully blocked, so no NaN can
appear even if a blocked score rounds to -inf (e.g. bf16), and their outputs carry no loss, so they
change nothing. Padding KEYS are never attended by real tokens.

How the rule reaches the attention depends on ``model.attn_implementation`` (:func:`attention_backend`):
sdpa and eager take the additive masks above (:func:`segment_mask`); flex_attention takes the same rule as
a BlockMask (:func:`segment_block_mask`; both evaluate one rule function, so they cannot disagree);
flash_attention_2 takes no mask at all: a decoder gets FlashAttention varlen boundaries, one piece per
segment and per run of padding (:func:`varlen_sequences`), plus the per-segment position ids. Varlen
FlashAttention is causal within each piece and can express nothing else, so it refuses prefix-LM and
answer choices (:func:`~train.modeling.models.varlen_limitation`); enc-dec models have no FlashAttention
in transformers.

Answer choices (rows packed with ``choices=True``, see :mod:`train.data.packing`): every token has a
*branch* within its segment (0 input, 1 target = gold choice, 2.. wrong choices). Labels, and so the LM
loss, cover branch 1 only. Masks add one rule, for both architectures: a query attends a key of its
segment only if the key is in the query's branch or in branch 0 (the decoder's input); so the enc-dec
decoder self-attention is same segment AND same branch AND causal, and a decoder's choice sees its input
and itself, never the target or another choice. T5's relative position bias is computed from row
indices, and within one contiguous branch those distances are the unpacked ones, so it stays exact;
BLOOM's ALiBi would not (the gap between input and choice grows), so BLOOM with choices is refused.
Because one logit can predict the first token of the target AND of every choice (decoders: the last
input token), choices are scored through gather indices rather than a second label array: collate adds

    choice_logit_index   (T,)  flat index b * seq + t of the logit that predicts each choice token
    choice_token_ids     (T,)  the token it must predict
    choice_token_choice  (T,)  which choice (0..C-1 in the micro-batch) the token belongs to
    choice_example       (C,)  which example (0..E-1) each choice belongs to
    choice_slot          (C,)  0 = the gold choice (the target's own tokens, not stored twice), 1.. = wrong

Decoders also get ``position_ids`` reset per segment and run with ``use_cache=False`` (with the cache on,
some models ignore the 4-D mask, FIELD_NOTES.md). BLOOM has no position ids: its ALiBi bias is built
from plain key positions 0..L-1 by :func:`install_bloom_packing_adapter`, which is exact because ALiBi
adds ``slope * key_position`` and softmax is invariant to a constant shift per query row (every key a
query may attend lies in its own segment, so the segment's offset is such a constant).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from train.errors import ConfigError, DataError
from train.modeling.models import varlen_limitation

IGNORE_INDEX = -100

_ROW_FIELDS = {
    "encdec": (
        "input_ids", "input_segment_ids", "input_positions", "target_ids", "target_segment_ids", "target_positions",
    ),
    "decoder": ("input_ids", "segment_ids", "positions", "loss_mask", "prefix_mask"),
    "prefix_lm": ("input_ids", "segment_ids", "positions", "loss_mask", "prefix_mask"),
}


PAD_TO = ("capacity", "longest")


def _width(seqs: Sequence[Sequence[int]], capacity: int, pad_to: str, what: str) -> int:
    """Tensor width of one side of a micro-batch: its longest row ("longest") or ``capacity``.

    Raises:
        DataError: a row is longer than ``capacity`` (it was packed with other max_*_tokens).
    """
    lengths = [len(seq) for seq in seqs]
    longest = max(lengths)
    if longest > capacity:
        raise DataError(
            f"features: row {lengths.index(longest)} has {longest}{' ' + what if what else ''} tokens, more than "
            f"the capacity {capacity}; pack with the same max_*_tokens as the collator"
        )
    return longest if pad_to == "longest" else capacity


def _pad(seqs: Sequence[Sequence[int]], length: int, value: int, what: str) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)  # (batch, length)
    for i, seq in enumerate(seqs):
        if len(seq) > length:
            raise DataError(f"features: row {i} has a {what} field of {len(seq)} tokens, more than the batch width "
                            f"{length} taken from its token ids; the row is malformed")
        out[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


def collate(
    rows: Sequence[dict],
    kind: str,
    *,
    pad_id: int,
    decoder_start_id: int | None = None,
    max_input_tokens: int | None = None,
    max_target_tokens: int | None = None,
    max_tokens: int | None = None,
    pad_to: str = "capacity",
) -> dict[str, torch.Tensor]:
    """Pad a micro-batch of packed rows (to the capacity or to its longest row) and build labels.

    Args:
        rows: packed rows from :class:`train.data.packing.Packer`.
        kind: "encdec", "decoder" or "prefix_lm".
        pad_id: token id written into padding positions.
        decoder_start_id: enc-dec only, the token that starts every target segment (T5: pad id 0).
        max_input_tokens, max_target_tokens: enc-dec capacities.
        max_tokens: decoder capacity.
        pad_to: "capacity" (width = the capacities above) or "longest" (width = the longest row of
            ``rows``, per side for enc-dec; the capacities still bound every row).

    Returns:
        enc-dec: input_ids, input_segment_ids, input_positions (batch, input width);
        decoder_input_ids, target_segment_ids, target_positions, labels, loss_segment_ids
        (batch, target width). Decoder kinds: input_ids, segment_ids, position_ids, prefix_mask,
        labels, loss_segment_ids (batch, width). ``loss_segment_ids`` is the segment of each label
        (0 where the label is IGNORE_INDEX); all tensors are int64. Segment 0 is padding. Rows packed
        with choices add ``target_branch_ids`` / ``branch_ids`` (same shape) and the ``choice_*`` gather
        tensors of the module docstring.

    Raises:
        ConfigError: unknown kind or ``pad_to``, or a missing capacity / decoder_start_id.
        DataError: a row lacks a field or exceeds the capacity.
    """
    if kind not in _ROW_FIELDS:
        raise ConfigError(f"features: unknown model kind {kind!r}; expected one of {list(_ROW_FIELDS)}")
    if pad_to not in PAD_TO:
        raise ConfigError(f"features: unknown pad_to {pad_to!r}; expected one of {list(PAD_TO)}")
    if not rows:
        raise DataError("features: collate got an empty list of rows")
    for i, row in enumerate(rows):
        missing = [f for f in _ROW_FIELDS[kind] if f not in row]
        if missing:
            raise DataError(f"features: row {i} lacks {missing} for kind {kind!r}; was it packed for another kind?")

    if kind == "encdec":
        if max_input_tokens is None or max_target_tokens is None or decoder_start_id is None:
            raise ConfigError("features: encdec needs max_input_tokens, max_target_tokens and decoder_start_id")
        n_in = _width([r["input_ids"] for r in rows], max_input_tokens, pad_to, "input")
        n_tgt = _width([r["target_ids"] for r in rows], max_target_tokens, pad_to, "target")
        batch = {
            "input_ids": _pad([r["input_ids"] for r in rows], n_in, pad_id, "input"),
            "input_segment_ids": _pad([r["input_segment_ids"] for r in rows], n_in, 0, "input"),
            "input_positions": _pad([r["input_positions"] for r in rows], n_in, 0, "input"),
            "target_segment_ids": _pad([r["target_segment_ids"] for r in rows], n_tgt, 0, "target"),
            "target_positions": _pad([r["target_positions"] for r in rows], n_tgt, 0, "target"),
        }
        targets = _pad([r["target_ids"] for r in rows], n_tgt, pad_id, "target")
        seg = batch["target_segment_ids"]
        # Shift right within each segment: position 0 of every segment gets the start token.
        shifted = torch.cat([torch.full_like(targets[:, :1], decoder_start_id), targets[:, :-1]], dim=1)
        starts = batch["target_positions"] == 0
        decoder_input_ids = torch.where(starts, torch.full_like(targets, decoder_start_id), shifted)
        batch["decoder_input_ids"] = torch.where(seg > 0, decoder_input_ids, torch.full_like(targets, pad_id))
        batch["labels"] = torch.where(seg > 0, targets, torch.full_like(targets, IGNORE_INDEX))
        batch["loss_segment_ids"] = seg.clone()
        if _has_branches(rows, "target_branch_ids"):
            # Choices restart their positions at 0, so the shift above already gave each its start token.
            branch = _pad([r["target_branch_ids"] for r in rows], n_tgt, 0, "target")
            gold = branch == 1  # the LM loss is the target's only
            batch["target_branch_ids"] = branch
            batch["labels"] = torch.where(gold, batch["labels"], torch.full_like(targets, IGNORE_INDEX))
            batch["loss_segment_ids"] = torch.where(gold, seg, torch.zeros_like(seg))
            batch.update(_choice_gather(rows, kind, n_tgt))
        return batch

    if max_tokens is None:
        raise ConfigError(f"features: kind {kind!r} needs max_tokens")
    width = _width([r["input_ids"] for r in rows], max_tokens, pad_to, "")
    input_ids = _pad([r["input_ids"] for r in rows], width, pad_id, "")
    seg = _pad([r["segment_ids"] for r in rows], width, 0, "")
    loss_mask = _pad([r["loss_mask"] for r in rows], width, 0, "")
    # Pre-shift: the label at t is token t+1, kept only if t+1 is a target token of the same segment.
    next_ids = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], pad_id)], dim=1)
    next_seg = torch.cat([seg[:, 1:], torch.zeros_like(seg[:, :1])], dim=1)
    next_is_target = torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], dim=1) > 0
    keep = next_is_target & (next_seg == seg) & (seg > 0)
    batch = {
        "input_ids": input_ids,
        "segment_ids": seg,
        "position_ids": _pad([r["positions"] for r in rows], width, 0, ""),
        "prefix_mask": _pad([r["prefix_mask"] for r in rows], width, 0, ""),
        "labels": torch.where(keep, next_ids, torch.full_like(next_ids, IGNORE_INDEX)),
        "loss_segment_ids": torch.where(keep, seg, torch.zeros_like(seg)),
    }
    if _has_branches(rows, "branch_ids"):
        # Choices carry loss_mask 0, so the labels above are the target's alone.
        batch["branch_ids"] = _pad([r["branch_ids"] for r in rows], width, 0, "")
        batch.update(_choice_gather(rows, kind, width))
    return batch


def _has_branches(rows: Sequence[dict], key: str) -> bool:
    """Whether the rows were packed with choices; all of them or none."""
    have = [key in r for r in rows]
    if any(have) and not all(have):
        raise DataError(f"features: rows {[i for i, h in enumerate(have) if not h]} lack {key!r} while others have "
                        "it; pack every row of a batch with the same Packer(choices=...)")
    return all(have)


def _choice_gather(rows: Sequence[dict], kind: str, width: int) -> dict[str, torch.Tensor]:
    """The ``choice_*`` gather tensors of the module docstring for rows packed with choices.

    Only segments holding a wrong choice (branch >= 2) have a choice set. Its choices are, in this order,
    the target (slot 0, the gold) and the wrong choices (slots 1..). The logit that predicts token ``t``
    is ``t`` for enc-dec (labels are not shifted there); for decoders it is ``t - 1``, except for a
    branch's first token, which is predicted by the last input token of its segment.
    """
    logit_index, token_ids, token_choice, choice_example, choice_slot = [], [], [], [], []
    examples = 0
    for b, row in enumerate(rows):
        if kind == "encdec":
            ids, seg, branch = row["target_ids"], row["target_segment_ids"], row["target_branch_ids"]
        else:
            ids, seg, branch = row["input_ids"], row["segment_ids"], row["branch_ids"]
        spans: dict[int, dict[int, list[int]]] = {}  # segment -> branch -> token indices, in row order
        for t, (s, k) in enumerate(zip(seg, branch)):
            spans.setdefault(s, {}).setdefault(k, []).append(t)
        for by_branch in spans.values():
            if max(by_branch) < 2:
                continue  # no wrong choice kept: this example trains with the LM loss alone
            example, examples = examples, examples + 1
            last_input = by_branch[0][-1] if kind != "encdec" else None
            for k in sorted(k for k in by_branch if k >= 1):
                choice = len(choice_slot)
                choice_example.append(example)
                choice_slot.append(k - 1)
                for j, t in enumerate(by_branch[k]):
                    source = t if kind == "encdec" else (last_input if j == 0 else t - 1)
                    logit_index.append(b * width + source)
                    token_ids.append(ids[t])
                    token_choice.append(choice)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {"choice_logit_index": as_long(logit_index), "choice_token_ids": as_long(token_ids),
            "choice_token_choice": as_long(token_choice), "choice_example": as_long(choice_example),
            "choice_slot": as_long(choice_slot)}


# ---------------------------------------------------------------------------------------------- masks

# How a packed batch reaches each ``model.attn_implementation`` (see :func:`attention_backend`):
#   "mask"   sdpa, eager       a (batch, 1, q, k) additive float mask (:func:`segment_mask`)
#   "flex"   flex_attention    a BlockMask of the same rule (:func:`segment_block_mask`)
#   "varlen" flash_attention_2 no mask; sequence boundaries (:func:`varlen_sequences`), causal within each
ATTENTION_BACKENDS = ("mask", "flex", "varlen")


def attention_backend(model: torch.nn.Module) -> str:
    """Which of :data:`ATTENTION_BACKENDS` packed rows take for this (possibly wrapped) model's attention.

    Read from the attention the model was built with (``config._attn_implementation``); enc-dec models built
    for flex_attention run under a name that contains "flex_attention" (:mod:`train.modeling.models`).
    """
    implementation = getattr(_unwrap(model).config, "_attn_implementation", None) or "sdpa"
    if "flex_attention" in implementation:
        return "flex"
    if implementation.startswith("flash_attention"):
        return "varlen"
    return "mask"


def _segment_rule(
    query_seg: torch.Tensor,
    key_seg: torch.Tensor,
    *,
    causal: bool,
    prefix: torch.Tensor | None = None,
    query_branch: torch.Tensor | None = None,
    key_branch: torch.Tensor | None = None,
):
    """The attention rule of the module docstring as ``allowed(b, q, k) -> bool`` (arguments as :func:`segment_mask`).

    ``b``, ``q`` and ``k`` are index tensors that broadcast: :func:`segment_mask` passes a whole
    (batch, q, k) grid, :func:`segment_block_mask` hands the rule to flex_attention as its ``mask_mod``,
    which calls it with scalar indices. One rule, two encodings, so the two backends cannot disagree.
    """
    branches = query_branch is not None and key_branch is not None

    def allowed(b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q_seg, k_seg = query_seg[b, q], key_seg[b, k]
        ok = (q_seg == k_seg) & (k_seg > 0)
        if branches:
            k_branch = key_branch[b, k]
            ok = ok & ((query_branch[b, q] == k_branch) | (k_branch == 0))
        if causal:
            order = k <= q
            if prefix is not None:
                order = order | ((prefix[b, q] > 0) & (prefix[b, k] > 0))
            ok = ok & order
        return ok | (q_seg == 0)  # padding queries attend everything: no row is fully blocked

    return allowed


def segment_mask(
    query_seg: torch.Tensor,
    key_seg: torch.Tensor,
    dtype: torch.dtype,
    *,
    causal: bool,
    prefix: torch.Tensor | None = None,
    query_branch: torch.Tensor | None = None,
    key_branch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention mask that keeps attention inside each segment (sdpa and eager attention).

    Args:
        query_seg: (batch, q) segment ids of the queries, 0 = padding.
        key_seg: (batch, k) segment ids of the keys, 0 = padding.
        dtype: float dtype of the mask (the dtype the attention runs in).
        causal: also require key index <= query index (self-attention only, q == k).
        prefix: (batch, q) 1 on prefix-LM input tokens, which attend bidirectionally among themselves.
        query_branch, key_branch: (batch, q), (batch, k) branch ids of rows packed with answer choices:
            a key is attended only if it is in the query's branch or in branch 0 (a decoder's input).

    Returns:
        (batch, 1, q, k) tensor of 0 (attend) and ``finfo(dtype).min`` (blocked).
    """
    rule = _segment_rule(query_seg, key_seg, causal=causal, prefix=prefix, query_branch=query_branch,
                         key_branch=key_branch)
    (batch, q_len), k_len = query_seg.shape, key_seg.shape[1]
    index = lambda n: torch.arange(n, device=query_seg.device)  # noqa: E731
    # (batch, 1, 1), (1, q, 1), (1, 1, k) indices -> (batch, q, k)
    allowed = rule(index(batch)[:, None, None], index(q_len)[None, :, None], index(k_len)[None, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def segment_block_mask(
    query_seg: torch.Tensor,
    key_seg: torch.Tensor,
    *,
    causal: bool,
    prefix: torch.Tensor | None = None,
    query_branch: torch.Tensor | None = None,
    key_branch: torch.Tensor | None = None,
):
    """The rule of :func:`segment_mask` as a flex_attention ``BlockMask`` (``attn_implementation=flex_attention``).

    A BlockMask records, per tile of 128 queries x 128 keys, whether the tile is empty, full or partial;
    flex_attention skips empty tiles (most of them when a row packs many short examples) and applies the rule
    inside partial ones, so no (batch, q, k) float mask reaches the attention. Rows need no padding to a
    multiple of the tile (measured with rows of 32 and 40 tokens, torch 2.13). Building it evaluates the rule
    once on a dense (batch, q, k) boolean grid, which is dropped once the tiles are summarised.

    Args:
        query_seg, key_seg, causal, prefix, query_branch, key_branch: as for :func:`segment_mask`.

    Returns:
        ``torch.nn.attention.flex_attention.BlockMask`` of shape (batch, 1, q, k), on the segment ids' device.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    rule = _segment_rule(query_seg, key_seg, causal=causal, prefix=prefix, query_branch=query_branch,
                         key_branch=key_branch)
    return create_block_mask(lambda b, h, q, k: rule(b, q, k), B=query_seg.shape[0], H=None,
                             Q_LEN=query_seg.shape[1], KV_LEN=key_seg.shape[1], device=query_seg.device)


def varlen_sequences(segment_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """FlashAttention's variable-length boundaries for a packed batch (``attn_implementation=flash_attention_2``).

    The batch is read as one flattened sequence of batch * seq tokens, cut wherever a row starts or the
    segment id changes; FlashAttention's varlen kernel then runs each piece alone with a causal mask, so no
    mask exists at all. A row's padding (segment 0) becomes a piece of its own: its tokens attend only each
    other, carry no label, and no real token attends them, so they change nothing. For example::

        segment_ids   [[1, 1, 1, 2, 2, 0],     flattened token offsets 0..11
                       [1, 1, 1, 1, 1, 1]]
        cu_seq_lens   [0, 3, 5, 6, 12]          max_length 6

    Args:
        segment_ids: (batch, seq) segment ids, 0 = padding.

    Returns:
        transformers' ``FlashAttentionKwargs``: ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (pieces + 1,) int32
        offsets into the flattened tokens, and ``max_length_q`` = ``max_length_k`` (int), the longest piece.
    """
    batch, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # (batch, seq): a piece starts here
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    offsets = starts.reshape(-1).nonzero().reshape(-1)
    cu_seq_lens = torch.cat([offsets, offsets.new_tensor([batch * seq])]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())  # an int: the kernel takes it as a launch size
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


def _attention_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype attention scores are computed in: the autocast dtype if autocast is on, else the weights'."""
    param = next(model.parameters())
    device_type = param.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param.dtype


# ---------------------------------------------------------------------------------------------- models


def install_bloom_packing_adapter(bloom_model: torch.nn.Module) -> None:
    """Make a BLOOM model accept 4-D masks by building ALiBi from plain key positions 0..L-1.

    BLOOM builds ALiBi from a 2-D padding mask (``BloomModel.build_alibi_tensor``) and fails on a 4-D mask.
    This replaces that method on THIS instance (no global patch): for a 4-D mask it returns
    ``slope * arange(key_length)``, which is exact under any mask that keeps each query inside its own
    contiguous segment (softmax is shift-invariant per query row). 2-D masks use the original code.
    Idempotent.

    Args:
        bloom_model: a ``BloomForCausalLM`` or ``BloomModel``.
    """
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    base = getattr(bloom_model, "transformer", bloom_model)
    if getattr(base, "_mtf_packing_adapter", False):
        return

    def _build(self, attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        if attention_mask.ndim == 4:
            batch, _, _, key_len = attention_mask.shape  # (batch, 1, q, k)
            plain = torch.ones(batch, key_len, dtype=torch.long, device=attention_mask.device)
            return build_alibi_tensor(plain, num_heads, dtype)  # (batch * heads, 1, k)
        return build_alibi_tensor(attention_mask, num_heads, dtype)

    base.build_alibi_tensor = types.MethodType(_build, base)
    base._mtf_packing_adapter = True


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / accelerate wrappers keep the real model in .module; config and submodules live there. A peft
    # model keeps the Hugging Face model (with the adapter layers injected) behind get_base_model().
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Run a packed batch through a Hugging Face model and return logits aligned with ``batch["labels"]``.

    enc-dec (T5/mT5) uses two calls, because the single call reuses the encoder mask for cross-attention
    and fails with 4-D masks (FIELD_NOTES.md): ``model.encoder(input_ids, attention_mask=<self mask>)``,
    then ``model(encoder_outputs=..., attention_mask=<cross mask>, decoder_attention_mask=<causal mask>)``
    through the (possibly DDP-wrapped) model, so the call that produces the loss goes through the wrapper.
    The masks are 4-D float tensors, BlockMasks or absent, by the model's attention (:func:`attention_backend`).

    Args:
        model: a seq2seq LM (kind "encdec") or causal LM (kinds "decoder", "prefix_lm"), possibly wrapped.
        batch: the output of :func:`collate` (on the model's device).
        kind: "encdec", "decoder" or "prefix_lm".

    Returns:
        (batch, seq, vocab) logits; ``logits[b, t]`` predicts ``batch["labels"][b, t]``.

    Raises:
        ConfigError: unknown kind, a decoder that takes no position_ids and is not BLOOM, or what
            flash_attention_2 cannot express (:func:`~train.modeling.models.varlen_limitation`).
    """
    return _forward(model, batch, kind).logits


@dataclass
class HeadInputs:
    """What the output layer would have received, for a loss that applies it itself (``trainer.loss_chunk_tokens``).

    ``head(hidden[b, t])`` are the logits :func:`model_forward` returns at ``[b, t]``; the loss
    (:func:`train.modeling.losses.local_numerators`) applies ``head`` chunk by chunk to the positions that
    carry a label only, under ``autocast``, the autocast state of the forward pass.
    """

    hidden: torch.Tensor  # (batch, seq, hidden) as the output layer receives it (T5: already rescaled)
    head: torch.nn.Module  # the output layer, e.g. lm_head (a peft LoRA layer if the adapter wraps it)
    chunk_tokens: int  # positions per output-layer call
    autocast: tuple[str, bool, torch.dtype]  # (device type, enabled, dtype) during the forward pass


def head_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: str, *, chunk_tokens: int) -> HeadInputs:
    """:func:`model_forward` without its output layer: the same call through the same wrappers, stopped at the head.

    The forward goes through ``model`` itself (DDP, DeepSpeed, peft: their hooks fire as for
    :func:`model_forward`); only for the duration of the call, the output layer's ``forward`` returns its
    input, so the model's ``logits`` are the hidden states it would have projected, after anything the model
    does before the head (T5's ``d_model**-0.5`` rescaling of tied embeddings, a final norm). The head's
    weights are used later, by the loss, through the head module itself (so DeepSpeed ZeRO-3 gathers them
    and a LoRA on the head applies).

    Args:
        model: as for :func:`model_forward`.
        batch, kind: as for :func:`model_forward`.
        chunk_tokens: label positions per output-layer call in the loss (``trainer.loss_chunk_tokens``).

    Returns:
        The hidden states, the head, the chunk size and the autocast state.

    Raises:
        ConfigError: the model has no output layer that produces its logits unchanged (e.g. Gemma-2's logit
            softcapping or a logit scale after the head), so the loss cannot apply the head itself.
    """
    if getattr(model, "find_unused_parameters", False):
        # DDP would look for the used parameters in the model's output, which no longer reaches the head: it
        # would reduce the head's gradient as unused at once, then fail when the loss produces it.
        raise ConfigError("`trainer.loss_chunk_tokens` needs DDP's find_unused_parameters=False (accelerate's default): "
                          "the output layer runs after the wrapped forward; set `trainer.loss_chunk_tokens=null`")
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise ConfigError(f"`trainer.loss_chunk_tokens`: {type(inner).__name__} has no output layer "
                          "(get_output_embeddings() is None); set `trainer.loss_chunk_tokens=null`")
    seen: list[torch.Tensor] = []

    def passthrough(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden)
        return hidden

    own = head.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) to restore
    head.forward = passthrough
    try:
        out = _forward(model, batch, kind)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    # DDP's static-graph first step passes outputs through a sink that copies them: equal, not identical.
    if len(seen) != 1 or not (out.logits is seen[0] or torch.equal(out.logits, seen[0])):
        raise ConfigError(
            f"`trainer.loss_chunk_tokens`: {type(inner).__name__} does not return its output layer's result as its "
            "logits (it transforms them after the head, e.g. softcapping or scaling, or calls the head more than "
            "once), so the loss cannot apply the head chunk by chunk; set `trainer.loss_chunk_tokens=null`")
    device_type = out.logits.device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return HeadInputs(hidden=out.logits, head=head, chunk_tokens=chunk_tokens, autocast=autocast)


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: str):
    """The model's output for a packed batch (see :func:`model_forward`)."""
    inner = _unwrap(model)
    backend = attention_backend(inner)
    dtype = _attention_dtype(inner)

    def mask(query_seg: torch.Tensor, key_seg: torch.Tensor, **rule):
        if backend == "flex":
            return segment_block_mask(query_seg, key_seg, **rule)
        return segment_mask(query_seg, key_seg, dtype, **rule)

    if kind == "encdec":
        if backend == "varlen":
            raise ConfigError(f"`model.attn_implementation=flash_attention_2`: {type(inner).__name__} is an "
                              "encoder-decoder model, which the varlen path does not cover. Fix: use `sdpa` or "
                              "`flex_attention`.")
        enc_seg, dec_seg = batch["input_segment_ids"], batch["target_segment_ids"]
        dec_branch = batch.get("target_branch_ids")  # rows with answer choices: each choice its own branch
        encoder_outputs = inner.get_encoder()(
            input_ids=batch["input_ids"],
            attention_mask=mask(enc_seg, enc_seg, causal=False),
            return_dict=True,
        )
        return model(
            encoder_outputs=encoder_outputs,
            attention_mask=mask(dec_seg, enc_seg, causal=False),  # cross-attention only
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=mask(dec_seg, dec_seg, causal=True, query_branch=dec_branch, key_branch=dec_branch),
            use_cache=False,
            return_dict=True,
        )
    if kind not in ("decoder", "prefix_lm"):
        raise ConfigError(f"features: unknown model kind {kind!r}; expected 'encdec', 'decoder' or 'prefix_lm'")
    seg, branch = batch["segment_ids"], batch.get("branch_ids")
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False, "return_dict": True}
    if backend == "varlen":
        # No mask: attention_mask=None plus explicit boundaries make transformers call the varlen kernel.
        why = varlen_limitation(kind, choices=branch is not None)
        if why:
            raise ConfigError(f"`model.attn_implementation=flash_attention_2` with {type(inner).__name__}: {why}. Fix: "
                              "use `model.attn_implementation=flex_attention` (CUDA) or `sdpa`.")
        kwargs.update(varlen_sequences(seg))
    else:
        prefix = batch["prefix_mask"] if kind == "prefix_lm" else None
        kwargs["attention_mask"] = mask(seg, seg, causal=True, prefix=prefix, query_branch=branch, key_branch=branch)
    if getattr(inner.config, "model_type", "") == "bloom":
        check_choice_support("bloom", choices=branch is not None)
        install_bloom_packing_adapter(inner)  # ALiBi from plain positions; BLOOM takes no position_ids
    elif "position_ids" in inspect.signature(inner.forward).parameters:
        kwargs["position_ids"] = batch["position_ids"]
    else:
        raise ConfigError(
            f"features: {type(inner).__name__} takes no position_ids, so packed rows cannot restart positions "
            "per segment; use pack=False for it or add an adapter like install_bloom_packing_adapter"
        )
    return model(**kwargs)


def check_choice_support(model_type: str, *, choices: bool) -> None:
    """Refuse answer choices in packed rows for a model whose positions cannot express them exactly.

    Raises:
        ConfigError: BLOOM with choices (ALiBi is built from plain key positions, so a choice placed after
            the target would see its input farther away than when run alone).
    """
    if choices and model_type == "bloom":
        raise ConfigError(
            "the unlikelihood and rank-classification losses pack answer choices after the target, which BLOOM's "
            "ALiBi cannot keep exact (the distance from a choice to its input changes); set "
            "`trainer.loss_weights.unlikelihood=0` and `trainer.loss_weights.rank_classification=0` for BLOOM, "
            "or use a model with position ids (T5, Llama, GPT-2)."
        )


# ---------------------------------------------------------------------------------------------- reference


def reference_target_nll(
    model: torch.nn.Module, example: dict, kind: str, *, decoder_start_id: int | None = None
) -> torch.Tensor:
    """Per-token NLL of one example's target, run alone and unpacked (the reference for exactness tests).

    enc-dec and causal decoders use the model's own standard path (no custom masks, default positions),
    so they are an independent reference. prefix-LM has no standard path: it runs the example alone
    through :func:`model_forward` (one segment, no padding), which checks isolation, not the prefix mask.

    Args:
        model: the model.
        example: {"input_ids", "target_ids"}.
        kind: "encdec", "decoder" or "prefix_lm".
        decoder_start_id: enc-dec only.

    Returns:
        (len(target_ids),) fp32 NLL of each target token (differentiable).
    """
    device = next(model.parameters()).device
    inputs = torch.tensor([example["input_ids"]], device=device)
    targets = torch.tensor(example["target_ids"], device=device)
    n_in, n_tgt = len(example["input_ids"]), len(example["target_ids"])
    if kind == "encdec":
        dec_in = torch.tensor([[decoder_start_id] + example["target_ids"][:-1]], device=device)
        logits = model(input_ids=inputs, decoder_input_ids=dec_in, use_cache=False).logits[0]  # (tgt, vocab)
    elif kind == "decoder":
        ids = torch.cat([inputs, targets[None]], dim=1)
        logits = model(input_ids=ids, use_cache=False).logits[0, n_in - 1 : n_in + n_tgt - 1]
    else:
        from train.data.packing import build_row

        row = build_row([{"input_ids": example["input_ids"], "target_ids": example["target_ids"]}], kind)
        batch = collate([row], kind, pad_id=0, max_tokens=n_in + n_tgt)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model_forward(model, batch, kind)[0, n_in - 1 : n_in + n_tgt - 1]
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
