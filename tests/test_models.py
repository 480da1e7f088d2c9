"""Model adapters, tiny presets, LoRA placement, loading — for every supported family.

The central check: `linear_sequence_logprobs_ref(adapter.hidden_states(…), *adapter.lm_head(…))`
gives the same numbers as `sequence_logprobs_ref(model(**batch).logits)`, so the trainer can run the
loss on hidden states and never build logits.
"""
import json

import pytest
import torch
from PIL import Image

from mdpo.models import (
    PRESETS,
    SUPPORTED_FAMILIES,
    HiddenStatesModel,
    apply_lora,
    build_preset,
    choose_attn_implementation,
    enable_gradient_checkpointing,
    freeze_for_full_finetune,
    get_adapter,
    language_model_linear_names,
    load_model,
    resolve_dtype,
    save_preset,
    trainable_parameter_counts,
)
from mdpo_kernels.reference import linear_sequence_logprobs_ref, sequence_logprobs_ref

NAMES = list(PRESETS)
# A prompt with the family's image placeholder, in the shape of the family's chat template.
PROMPTS = {
    "llava": "USER: <image>\nWhat is in the image? ASSISTANT:",
    "qwen2-vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
                "<|im_start|>assistant\n",
    "idefics3": "<|im_start|>User:<image>What is in the image?<end_of_utterance>\nAssistant:",
    "paligemma": "<image>What is in the image?",
}
PROMPTS["qwen2.5-vl"] = PROMPTS["qwen2-vl"]
ANSWERS = ["There is a red circle.", "Two blue squares at the top left.", "No."]
RESPONSE_TOKENS = 5  # the last few real tokens of each row are supervised


def make_batch(loaded, rows=3):
    """A collator-like batch straight from the processor: R rows, right padding, labels, extra keys."""
    family = loaded.family
    images = [Image.new("RGB", (48 + 16 * i, 64), (60 * i, 200 - 50 * i, 90)) for i in range(rows)]
    answers = ANSWERS[:rows]
    kwargs = {}
    if family == "paligemma":  # the processor appends the suffix and marks it in token_type_ids
        texts, kwargs["suffix"] = [PROMPTS[family]] * rows, answers
    else:
        texts = [PROMPTS[family] + " " + a for a in answers]
    if family == "idefics3":
        images = [[im] for im in images]
    batch = dict(loaded.processor(text=texts, images=images, return_tensors="pt", padding=True, **kwargs))
    labels = batch["input_ids"].clone()
    real = batch["attention_mask"].bool()
    last = real.long().cumsum(-1)  # 1..n over real tokens
    supervised = real & (last > real.sum(-1, keepdim=True) - RESPONSE_TOKENS)
    labels[~supervised] = -100
    batch.update(labels=labels, sample_ids=[f"s{i}" for i in range(rows)], num_pairs=rows)
    return batch


def full_model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "sample_ids", "num_pairs")}


def randomize_lora(model, seed=1):
    """LoRA B starts at zero (the adapted model equals the base); give it weights so it differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def fused_logps(adapter, model, batch):
    weight, bias = adapter.lm_head(model)
    return linear_sequence_logprobs_ref(adapter.hidden_states(model, batch), weight, batch["labels"], bias)


@pytest.mark.parametrize("name", NAMES)
def test_preset_agrees_with_its_processor_and_seed(name):
    loaded = build_preset(name)
    config, tok = loaded.model.config, loaded.processor.tokenizer
    assert loaded.adapter is get_adapter(loaded.family)
    assert config.get_text_config().vocab_size == len(tok)
    assert config.image_token_id == tok.convert_tokens_to_ids(loaded.processor.image_token)
    assert not loaded.model.training
    same = build_preset(name, seed=0).model.state_dict()
    other = build_preset(name, seed=1).model.state_dict()
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state)


@pytest.mark.parametrize("name", NAMES)
def test_hidden_states_through_lm_head_equal_full_logits(name):
    loaded = build_preset(name)
    model, adapter = loaded.model, loaded.adapter
    batch = make_batch(loaded)
    R, T = batch["input_ids"].shape
    with torch.no_grad():
        hidden = adapter.hidden_states(model, batch)  # labels / sample_ids / num_pairs ignored
        logits = model(**full_model_inputs(batch)).logits
        weight, bias = adapter.lm_head(model)
        assert hidden.shape == (R, T, model.config.get_text_config().hidden_size)
        assert weight.shape == (logits.shape[-1], hidden.shape[-1])
        assert weight is model.lm_head.weight
        expected = sequence_logprobs_ref(logits, batch["labels"])
        got = linear_sequence_logprobs_ref(hidden, weight, batch["labels"], bias)
    assert torch.isfinite(expected).all() and (expected < 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the wrapper handed to DDP / accelerate gives the same hidden states
    with torch.no_grad():
        torch.testing.assert_close(HiddenStatesModel(model, adapter)(**batch), hidden, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_lora_only_on_language_model_linears(name):
    loaded = build_preset(name)
    adapter = loaded.adapter
    lm_linears = language_model_linear_names(loaded.model, adapter)
    peft_model = apply_lora(loaded.model, loaded.family, r=4, alpha=8)
    base = peft_model.get_base_model()
    adapted = sorted(n for n, m in base.named_modules() if hasattr(m, "lora_A"))
    assert adapted == sorted(lm_linears) and len(adapted) >= 2 * 4  # every LM linear, 2 layers
    assert all(n.startswith(adapter.language_model_prefix + ".") for n in adapted)
    assert not any(n.startswith(adapter.frozen_prefixes) for n in adapted)
    assert not hasattr(base.lm_head, "lora_A")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    counts = trainable_parameter_counts(peft_model, loaded.family)
    assert counts["trainable"] == counts["lora"] == counts["language_model"] > 0
    assert counts["vision"] == counts["lm_head"] == 0 and counts["total"] > counts["trainable"]


@pytest.mark.parametrize("name", NAMES)
def test_disable_adapter_reproduces_base_model(name):
    loaded = build_preset(name)
    batch = make_batch(loaded)
    inputs = full_model_inputs(batch)
    with torch.no_grad():
        base_logits = loaded.model(**inputs).logits
        base_logps = fused_logps(loaded.adapter, loaded.model, batch)
    peft_model = apply_lora(loaded.model, loaded.family, r=4, alpha=8, dropout=0.0)
    randomize_lora(peft_model)
    with torch.no_grad():
        adapted = fused_logps(loaded.adapter, peft_model, batch)
        with peft_model.disable_adapter():
            reference_logits = peft_model(**inputs).logits
            reference_logps = fused_logps(loaded.adapter, peft_model, batch)
    assert not torch.allclose(adapted, base_logps, atol=1e-3)  # the adapters do change the policy
    torch.testing.assert_close(reference_logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(reference_logps, base_logps, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_only_lora_and_checkpointing_keeps_grads(name):
    loaded = build_preset(name)
    batch = make_batch(loaded)
    peft_model = apply_lora(loaded.model, loaded.family, r=4, alpha=8, dropout=0.0)
    randomize_lora(peft_model)
    peft_model.train()
    g = torch.randn(batch["input_ids"].shape[0])  # random upstream gradient

    def grads():
        peft_model.zero_grad(set_to_none=True)
        (fused_logps(loaded.adapter, peft_model, batch) * g).sum().backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    plain = grads()
    lora_params = {n for n, p in peft_model.named_parameters() if "lora_" in n}
    assert set(plain) == lora_params
    assert all(plain[n].abs().sum() > 0 for n in plain if "lora_B" in n)
    enable_gradient_checkpointing(peft_model)
    base = peft_model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    # The frozen vision tower and projector run no backward: their outputs do not require grad
    # (transformers' checkpointing hooks every sub-model's input embeddings, the patch embedding too).
    frozen_outputs = watch_outputs(loaded.adapter.inner_model(peft_model), loaded.adapter.frozen_module_attrs)
    checkpointed = grads()
    assert set(frozen_outputs) == set(loaded.adapter.frozen_module_attrs)
    assert not any(frozen_outputs.values()), frozen_outputs
    assert set(checkpointed) == set(plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6)


def watch_outputs(inner, attrs):
    """{attr: whether any tensor output of inner.<attr> required grad}, filled in by forward hooks."""
    seen = {}

    def tensors(out):
        if torch.is_tensor(out):
            return [out]
        values = out.values() if hasattr(out, "values") else out if isinstance(out, (list, tuple)) else []
        return [t for v in values for t in tensors(v)]

    for attr in attrs:
        def hook(module, inputs, out, attr=attr):
            seen[attr] = seen.get(attr, False) or any(t.requires_grad for t in tensors(out))
        getattr(inner, attr).register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_checkpointed_full_finetune_skips_the_vision_backward(name):
    loaded = build_preset(name)
    freeze_for_full_finetune(loaded.model, loaded.family)
    enable_gradient_checkpointing(loaded.model)
    loaded.model.train()
    seen = watch_outputs(loaded.adapter.inner_model(loaded.model), loaded.adapter.frozen_module_attrs)
    fused_logps(loaded.adapter, loaded.model, make_batch(loaded)).sum().backward()
    assert seen and not any(seen.values()), seen
    assert loaded.model.lm_head.weight.grad is not None
    assert all(p.grad is None for n, p in loaded.model.named_parameters() if n.startswith(loaded.adapter.frozen_prefixes))


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-idefics3"])
def test_lora_target_modules_are_name_suffixes(name):
    loaded = build_preset(name)
    lm_linears = language_model_linear_names(loaded.model, loaded.adapter)
    peft_model = apply_lora(loaded.model, loaded.family, r=4, alpha=8, target=["q_proj", "mlp.down_proj"])
    adapted = sorted(n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A"))
    assert adapted == sorted(n for n in lm_linears if n.endswith((".q_proj", ".mlp.down_proj")))
    assert len(adapted) == 2 * 2  # 2 layers


def test_lora_target_module_matching_nothing_is_named():
    from mdpo.config import ConfigError

    loaded = build_preset("tiny-llava")
    with pytest.raises(ConfigError, match=r"lora_target_modules: 'qproj' .*no linear layer.*'q_proj'"):
        apply_lora(loaded.model, loaded.family, target=["q_proj", "qproj"])
    with pytest.raises(ConfigError, match="'proj'"):  # a suffix matches whole name parts only
        apply_lora(build_preset("tiny-llava").model, "llava", target=["proj"])
    with pytest.raises(ConfigError, match="'multi_modal_projector.linear_1'"):  # outside the language model
        apply_lora(build_preset("tiny-llava").model, "llava", target=["multi_modal_projector.linear_1"])


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-paligemma"])
def test_full_finetune_trains_language_model_only(name):
    loaded = build_preset(name)
    adapter = loaded.adapter
    freeze_for_full_finetune(loaded.model, loaded.family)
    batch = make_batch(loaded)
    fused_logps(adapter, loaded.model, batch).sum().backward()
    for n, p in loaded.model.named_parameters():
        in_lm = n.startswith((adapter.language_model_prefix + ".", "lm_head."))
        assert p.requires_grad == in_lm, n
        if n.startswith(adapter.frozen_prefixes):
            assert p.grad is None, n
    assert loaded.model.lm_head.weight.grad is not None
    counts = trainable_parameter_counts(loaded.model, loaded.family)
    assert counts["vision"] == 0 and counts["language_model"] > 0 and counts["lora"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_save_preset_then_load_model_round_trip(name, tmp_path):
    save_preset(name, tmp_path / "model")
    loaded = load_model(tmp_path / "model")  # family detected from config.model_type
    built = build_preset(name)
    assert loaded.family == built.family and loaded.source == str(tmp_path / "model")
    assert type(loaded.model) is type(built.model) and type(loaded.processor) is type(built.processor)
    state, reference = loaded.model.state_dict(), built.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    batch = make_batch(loaded)
    torch.testing.assert_close(batch["input_ids"], make_batch(built)["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(fused_logps(loaded.adapter, loaded.model, batch),
                                   fused_logps(built.adapter, built.model, batch), rtol=0, atol=0)


def test_load_model_by_preset_name_and_family_checks(tmp_path):
    loaded = load_model("tiny-idefics3", family="smolvlm", dtype="bf16")
    assert loaded.family == "idefics3" and loaded.model.dtype == torch.bfloat16
    with torch.no_grad():  # fp32 pixel values from the processor into a bf16 model
        assert loaded.adapter.hidden_states(loaded.model, make_batch(loaded)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not match preset"):
        load_model("tiny-idefics3", family="llava")
    save_preset("tiny-llava", tmp_path)
    with pytest.raises(ValueError, match="does not serve model_type 'llava'"):
        load_model(tmp_path, family="qwen2-vl")


def test_unsupported_family_and_model_type_are_named(tmp_path):
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'") as err:
        get_adapter("gpt2")
    assert all(f in str(err.value) for f in SUPPORTED_FAMILIES)
    with pytest.raises(ValueError, match="unsupported model family"):
        apply_lora(torch.nn.Linear(2, 2), "blip2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'") as err:
        load_model(tmp_path)
    assert "qwen2_vl" in str(err.value) and "paligemma" in str(err.value) and "config.json" in str(err.value)
    with pytest.raises(ValueError, match="unknown model preset 'tiny-gpt'"):
        build_preset("tiny-gpt")


def test_missing_model_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="presets: tiny-llava"):
        load_model("tiny-typo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")


def test_qwen_rebuilds_missing_mm_token_type_ids():
    loaded = build_preset("tiny-qwen2.5-vl")
    batch = make_batch(loaded)
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter.hidden_states(loaded.model, without),
                                   loaded.adapter.hidden_states(loaded.model, batch), rtol=0, atol=0)


def test_softcapped_logits_are_refused():
    loaded = build_preset("tiny-paligemma")
    loaded.model.config.get_text_config().final_logit_softcapping = 30.0  # as PaliGemma 2 (Gemma-2)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        loaded.adapter.check_fused_head(loaded.model)


def test_llava_next_goes_through_the_llava_adapter():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    image_token = 299
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=56, patch_size=14, projection_dim=32,
                           hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=image_token, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    adapter = get_adapter("llava-next")
    pixel_values, image_sizes = torch.randn(2, 5, 3, 56, 56), torch.tensor([[112, 112], [100, 90]])
    with torch.no_grad():
        per_image = [f.shape[0] for f in model.model.get_image_features(pixel_values, image_sizes).pooler_output]
    T = max(per_image) + 12
    input_ids = torch.randint(3, 290, (2, T))
    attention_mask = torch.ones_like(input_ids)
    for row, n in enumerate(per_image):
        input_ids[row, 1:1 + n] = image_token
        attention_mask[row, 1 + n + 8:] = 0  # right padding on the shorter row
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[:, : max(per_image) + 1] = -100
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                 image_sizes=image_sizes, labels=labels)
    with torch.no_grad():
        logits = model(**full_model_inputs(batch)).logits
        torch.testing.assert_close(fused_logps(adapter, model, batch), sequence_logprobs_ref(logits, labels),
                                   rtol=1e-5, atol=1e-5)
    peft_model = apply_lora(model, adapter, r=4, alpha=8)
    adapted = [n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(n.startswith("model.language_model.") for n in adapted)


def test_attention_and_dtype_choices(monkeypatch):
    import importlib.util

    assert choose_attn_implementation("cpu") == "sdpa"
    assert choose_attn_implementation(None) == "sdpa"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real_find_spec(n, *a))
    assert choose_attn_implementation("cuda") == "sdpa"  # flash-attn absent: never required
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("bf16") == resolve_dtype("torch.bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8' not understood"):
        resolve_dtype("int8")
