"""Model families, loading, tiny presets and what gets trained (LoRA / full fine-tuning).

    loaded = load_model("tiny-qwen2-vl")                 # or a local save_pretrained folder
    policy = apply_lora(loaded.model, loaded.family)     # r=64, α=128 on the language model
    hidden = loaded.adapter.hidden_states(policy, batch) # (R, T, H), before the LM head
    weight, bias = loaded.adapter.lm_head(policy)        # (V, H), None
    logps = linear_sequence_logprobs(hidden, weight, labels)   # no (R, T, V) logits

transformers and peft are imported on first use, not at import time.
"""
from .adapters import (
    SUPPORTED_FAMILIES,
    SUPPORTED_MODEL_TYPES,
    FamilyAdapter,
    HiddenStatesModel,
    adapter_for_model_type,
    get_adapter,
)
from .loading import LoadedModel, choose_attn_implementation, inspect_model_folder, load_model, load_processor_only, resolve_dtype
from .lora import (
    apply_lora,
    enable_gradient_checkpointing,
    freeze_for_full_finetune,
    language_model_linear_names,
    trainable_parameter_counts,
)
from .presets import PRESETS, build_preset, save_preset

__all__ = [
    "SUPPORTED_FAMILIES", "SUPPORTED_MODEL_TYPES", "FamilyAdapter", "HiddenStatesModel", "adapter_for_model_type",
    "get_adapter", "LoadedModel", "choose_attn_implementation", "inspect_model_folder", "load_model",
    "load_processor_only", "resolve_dtype", "apply_lora",
    "enable_gradient_checkpointing", "freeze_for_full_finetune", "language_model_linear_names",
    "trainable_parameter_counts", "PRESETS", "build_preset", "save_preset",
]
