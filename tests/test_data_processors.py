"""Tiny offline processors: image-token counts, special tokens and the save / reload round trip."""
import subprocess
import sys

import pytest
from PIL import Image

from mdpo.tiny_processors import FAMILIES, build_tiny_processor, tiny_model_facts

PROMPTS = {
    "llava": "USER: <image>\nHow many red circles are there? ASSISTANT:",
    "qwen2-vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n",
    "qwen2.5-vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n",
    "idefics3": "<|im_start|>User:<image>How many?<end_of_utterance>\nAssistant:",
    "smolvlm": "<|im_start|>User:<image>How many?<end_of_utterance>\nAssistant:",
    "paligemma": "<image>How many red circles are there?",
}
PIXEL_KEYS = {
    "llava": {"pixel_values": (1, 3, 56, 56)},
    "qwen2-vl": {"pixel_values": (64, 1176), "image_grid_thw": (1, 3)},
    "qwen2.5-vl": {"pixel_values": (64, 1176), "image_grid_thw": (1, 3)},
    "idefics3": {"pixel_values": (1, 1, 3, 64, 64), "pixel_attention_mask": (1, 1, 64, 64)},
    "smolvlm": {"pixel_values": (1, 1, 3, 64, 64), "pixel_attention_mask": (1, 1, 64, 64)},
    "paligemma": {"pixel_values": (1, 3, 56, 56), "token_type_ids": None},
}


def _encode(processor, family, size=(80, 80)):
    image = Image.new("RGB", size, (200, 30, 30))
    return processor(text=[PROMPTS[family]], images=[image], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_sixteen_image_tokens_and_pixel_inputs(family):
    processor = build_tiny_processor(family)
    facts = tiny_model_facts(processor, family)
    out = _encode(processor, family)
    ids = out["input_ids"][0]
    assert int((ids == facts["image_token_id"]).sum()) == 16 == facts["num_image_tokens"]
    for key, shape in PIXEL_KEYS[family].items():
        assert key in out, f"{family}: {key} missing from {sorted(out)}"
        if shape is not None:
            assert tuple(out[key].shape) == shape
    if family.startswith("qwen"):
        assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
        assert "mm_token_type_ids" in out
        assert int(out["mm_token_type_ids"].sum()) == 16
    if family == "paligemma":  # image tokens first, then BOS, all in the prefix (type 0)
        assert ids[:16].tolist() == [facts["image_token_id"]] * 16
        assert int(ids[16]) == facts["bos_token_id"]
        assert int(out["token_type_ids"].sum()) == 0
    # Ids inside the vocabulary, and the special ids distinct.
    assert int(ids.max()) < facts["vocab_size"] == len(processor.tokenizer)
    specials = [facts["image_token_id"], facts["eos_token_id"], facts["pad_token_id"]]
    assert len(set(specials)) == 3 and None not in specials
    assert facts["vocab_size"] <= (2000 if family == "paligemma" else 1000)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_with_auto_processor(family, tmp_path):
    from transformers import AutoProcessor

    processor = build_tiny_processor(family, save_dir=tmp_path)
    reloaded = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(reloaded).__name__ == type(processor).__name__
    assert tiny_model_facts(reloaded, family) == tiny_model_facts(processor, family)
    a, b = _encode(processor, family), _encode(reloaded, family)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].tolist() == b[key].tolist(), key
    if processor.chat_template is not None:
        assert reloaded.chat_template == processor.chat_template


def test_reload_in_a_fresh_process_and_same_vocab(tmp_path):
    """A processor saved here loads in another process through mdpo.data.load_processor, and the
    BPE trained there is the same (deterministic training)."""
    for family in ("llava", "qwen2-vl"):
        build_tiny_processor(family, save_dir=tmp_path / family)
    code = (
        "import sys, json\n"
        "from mdpo.data import load_processor\n"
        "from mdpo.tiny_processors import build_tiny_processor\n"
        "for fam in ('llava', 'qwen2-vl'):\n"
        "    p = load_processor(sys.argv[1] + '/' + fam)\n"
        "    q = build_tiny_processor(fam)\n"
        "    assert p.tokenizer.get_vocab() == q.tokenizer.get_vocab(), fam\n"
        "    print(fam, type(p).__name__, len(p.tokenizer))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "llava LlavaProcessor" in out.stdout and "qwen2-vl Qwen2VL" in out.stdout


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="family='blip'"):
        build_tiny_processor("blip")


def test_chat_templates_place_the_image_placeholder():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    expected = {
        "llava": "USER: <image>\nWhat colour is it? ASSISTANT:",
        "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>What colour is it?<|im_end|>\n<|im_start|>assistant\n",
        "idefics3": "<|im_start|>User:<image>What colour is it?<end_of_utterance>\nAssistant:",
    }
    for family, text in expected.items():
        rendered = build_tiny_processor(family).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered.endswith(text), (family, rendered)
