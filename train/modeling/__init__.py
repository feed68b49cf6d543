"""Stage 2, modeling: packed rows in; model tensors, forward passes and losses out.

Takes packed rows from :mod:`train.data` and a model config. Gives the model and tokenizer (hub name,
local directory, or a random init from ``configs/models/*.json``), the architecture's tensors (4-D
segment masks for T5, block-causal for decoders, prefix-LM, or their flex BlockMasks / FlashAttention varlen
boundaries; labels; per-segment positions), the forward
pass that keeps packed examples apart, per-token NLL with global loss denominators and T-Few's choice
losses; with ``peft.method`` set, the model wrapped with a peft adapter ((IA)^3 or LoRA).

Modules, in data-flow order: models, adapters, features, losses.
"""

from train import lazy_exports

_EXPORTS = {
    "KINDS": "models", "ModelInfo": "models", "load_model_config": "models", "infer_kind": "models",
    "load_tokenizer": "models", "model_info": "models", "build_model": "models",
    "check_attn_implementation": "models",
    "IGNORE_INDEX": "features", "collate": "features", "segment_mask": "features",
    "segment_block_mask": "features", "varlen_sequences": "features", "attention_backend": "features",
    "model_forward": "features", "reference_target_nll": "features",
    "build_run_model": "adapters", "wrap_with_adapter": "adapters", "export_adapter": "adapters",
    "load_adapter_for_eval": "adapters", "parameter_counts": "adapters",
    "choice_scores": "losses", "unlikelihood_numerator": "losses", "rank_classification_numerator": "losses",
    "MODES": "losses", "token_nll": "losses", "local_numerator": "losses", "local_denominator": "losses",
    "scaled_loss": "losses", "per_example_losses": "losses",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
