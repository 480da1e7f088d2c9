"""Tiny random-weight models, one per family, built from config objects with an offline processor.

For the demo and the tests: vocab ≈ 1000, text hidden 64, 2 layers, a 2-layer vision tower of width 32,
16 image tokens per image. The token ids (vocab size, image token, pad/eos …) and the image geometry
come from the tiny processor (mdpo.tiny_processors), so the model and the processor agree.
Forward + backward at a few rows × ~100 tokens takes milliseconds on a CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ModelLoadError
from .adapters import get_adapter
from .loaded import LoadedModel, resolve_dtype

# Shared text-model geometry: head_dim = 64 / 4 = 16; Qwen's M-RoPE sections must sum to head_dim / 2.
_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _token_ids(f: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vocab_size=f["vocab_size"], pad_token_id=f.get("pad_token_id"),
        bos_token_id=f.get("bos_token_id"), eos_token_id=f.get("eos_token_id"),
    )


def _llava_config(f):
    from transformers import LlavaConfig

    # "default" feature selection drops CLIP's CLS token: (image_size / patch_size)² image tokens.
    v = f["vision"]
    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=v["image_size"], patch_size=v["patch_size"],
                           projection_dim=32, **_VISION),
        text_config=dict(model_type="llama", **_TEXT, **_token_ids(f)),
        image_token_id=f["image_token_id"], projector_hidden_act="gelu",
        vision_feature_layer=v.get("vision_feature_layer", -2),
        vision_feature_select_strategy=v.get("vision_feature_select_strategy", "default"),
        tie_word_embeddings=False,
    )


def _qwen_text(f):
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])  # 2+3+3 = head_dim / 2
    return dict(**_TEXT, **_token_ids(f), rope_parameters=rope)


def _qwen_ids(f):
    return dict(image_token_id=f["image_token_id"], video_token_id=f["video_token_id"],
                vision_start_token_id=f["vision_start_token_id"], vision_end_token_id=f["vision_end_token_id"])


def _qwen_patches(v):
    # pixel_values rows are C·T·P·P values; spatial_merge_size² patches merge into one token
    return dict(patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                spatial_merge_size=v["spatial_merge_size"], in_channels=v.get("in_chans", 3))


def _qwen2_vl_config(f):
    from transformers import Qwen2VLConfig

    vision = dict(depth=2, embed_dim=32, hidden_size=_TEXT["hidden_size"], num_heads=2, mlp_ratio=2,
                  **_qwen_patches(f["vision"]))
    return Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(f), **_qwen_ids(f), tie_word_embeddings=False)


def _qwen2_5_vl_config(f):
    from transformers import Qwen2_5_VLConfig

    patches = _qwen_patches(f["vision"])
    # window attention over 2×2 merged units in block 0, full attention in block 1
    window = patches["patch_size"] * patches["spatial_merge_size"] * 2
    vision = dict(depth=2, hidden_size=32, out_hidden_size=_TEXT["hidden_size"], intermediate_size=64, num_heads=2,
                  window_size=window, fullatt_block_indexes=[1], **patches)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(f), **_qwen_ids(f), tie_word_embeddings=False)


def _idefics3_config(f):
    from transformers import Idefics3Config

    # (image_size / patch_size)² patches, pixel-shuffled by scale_factor² → image_seq_len tokens per tile.
    v = f["vision"]
    return Idefics3Config(
        vision_config=dict(image_size=v["image_size"], patch_size=v["patch_size"], **_VISION),
        text_config=dict(model_type="llama", **_TEXT, **_token_ids(f)),
        image_token_id=f["image_token_id"], scale_factor=v["scale_factor"], tie_word_embeddings=False,
    )


def _paligemma_config(f):
    from transformers import PaliGemmaConfig

    hidden, v = _TEXT["hidden_size"], f["vision"]
    return PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=v["image_size"], patch_size=v["patch_size"],
                           projection_dim=hidden, **_VISION),
        text_config=dict(model_type="gemma", **_TEXT, head_dim=hidden // _TEXT["num_attention_heads"], **_token_ids(f)),
        image_token_id=f["image_token_id"], projection_dim=hidden,
    )


# preset name -> (family, config builder, transformers class)
PRESETS: dict[str, tuple[str, Callable, str]] = {
    "tiny-llava": ("llava", _llava_config, "LlavaForConditionalGeneration"),
    "tiny-qwen2-vl": ("qwen2-vl", _qwen2_vl_config, "Qwen2VLForConditionalGeneration"),
    "tiny-qwen2.5-vl": ("qwen2.5-vl", _qwen2_5_vl_config, "Qwen2_5_VLForConditionalGeneration"),
    "tiny-idefics3": ("idefics3", _idefics3_config, "Idefics3ForConditionalGeneration"),
    "tiny-paligemma": ("paligemma", _paligemma_config, "PaliGemmaForConditionalGeneration"),
}


def _preset_entry(name: str):
    if name not in PRESETS:
        raise ModelLoadError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_preset(
    name: str,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """A tiny random model + offline processor. Same `seed` → same weights; the global RNG is untouched."""
    import transformers

    from mdpo.tiny_processors import build_tiny_processor, tiny_model_facts

    family, make_config, class_name = _preset_entry(name)
    processor = build_tiny_processor(family)
    config = make_config(tiny_model_facts(processor, family))
    model_cls = getattr(transformers, class_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation,
                                       dtype=resolve_dtype(dtype))
    model.eval()  # dropout off until the trainer says otherwise
    adapter = get_adapter(family)
    adapter.check_fused_head(model)
    return LoadedModel(model=model, processor=processor, adapter=adapter, family=adapter.family, source=name)


def save_preset(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a preset's model and processor with save_pretrained, so `load_model(out_dir)` reloads it."""
    loaded = build_preset(name, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    return out
