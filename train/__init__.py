"""mtf-train: multitask prompted finetuning with exact packing and zero-shot evaluation.

Data flow (one module per arrow, nothing flows backwards)::

    data_mixtures/*.yaml -> tasks (load -> preprocess -> render template) -> {inputs, targets, answer_choices}
      -> tokenization (cached) -> mixtures (rates, seeded, resumable) -> packing (segment ids)
      -> features (enc-dec | decoder | prefix-lm) -> trainer -> hooks (eval, checkpoint, log)
"""

__version__ = "0.1.0"
