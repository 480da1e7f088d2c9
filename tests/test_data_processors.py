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


# A whole conversation (system, user with an image, the answer) as the families' real templates render it
# (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct, HuggingFaceTB/SmolVLM-Instruct).
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
]
REAL_RENDERINGS = {
    # llava-hf: a system message is its bare text; every text item is followed by a space; no </s>.
    "llava": "Be brief. USER: <image>\nWhat colour is it? ASSISTANT: Red. ",
    "qwen2-vl": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                "What colour is it?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n",
    "idefics3": "<|im_start|>System: Be brief.<end_of_utterance>\nUser:<image>What colour is it?<end_of_utterance>\n"
                "Assistant: Red.<end_of_utterance>\n",
}


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "qwen2.5-vl", "idefics3"])
def test_chat_templates_are_the_real_ones(family):
    processor = build_tiny_processor(family)
    key = "qwen2-vl" if family.startswith("qwen") else family
    assert processor.apply_chat_template(CONVERSATION, tokenize=False) == REAL_RENDERINGS[key]
    if key == "qwen2-vl":  # without a system message Qwen's template writes its default one
        rendered = processor.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True, tokenize=False)
        assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert processor.apply_chat_template(CONVERSATION[1:2], add_vision_id=True, tokenize=False).count("Picture 1: ") == 1
    assert build_tiny_processor("paligemma").chat_template is None


@pytest.mark.parametrize("family, bos, eos, pad, adds_bos, more", [
    ("llava", "<s>", "</s>", "<pad>", True, {"<unk>", "<image>"}),
    ("qwen2-vl", None, "<|im_end|>", "<|endoftext|>", False,
     {"<|im_start|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
      "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"}),
    ("idefics3", "<|im_start|>", "<end_of_utterance>", "<|im_end|>", False,
     {"<|endoftext|>", "<fake_token_around_image>", "<image>", "<global-img>", "<row_1_col_1>"}),
    ("paligemma", "<bos>", "<eos>", "<pad>", False, {"<unk>", "<image>"}),
])
def test_special_token_layout_is_the_real_one(family, bos, eos, pad, adds_bos, more):
    tok = build_tiny_processor(family).tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    assert more <= set(tok.get_added_vocab())
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in more)  # never split
    ids = tok("hello")["input_ids"]
    assert (ids[0] == tok.bos_token_id) is adds_bos  # LLaMA's tokenizer adds BOS; the others' templates write it
    if family == "qwen2-vl":  # Qwen's ids in Qwen's order: <|endoftext|> < <|im_start|> < <|im_end|> < … < <|video_pad|>
        order = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]
        assert [tok.convert_tokens_to_ids(t) for t in order] == sorted(tok.convert_tokens_to_ids(t) for t in order)


def _as_a_real_qwen_folder(folder, family):
    """Make a saved tiny Qwen folder look like a real checkpoint's: the real processor class and a
    video preprocessor config, so AutoProcessor wants the video processor (and torchvision)."""
    import json

    real = {"qwen2-vl": "Qwen2VLProcessor", "qwen2.5-vl": "Qwen2_5_VLProcessor"}[family]
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        path.write_text(path.read_text().replace(real.replace("Processor", "ImageOnlyProcessor"), real))
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": real, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2, "size": {"shortest_edge": 12544, "longest_edge": 12544}}))
    assert real in (folder / "processor_config.json").read_text()


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_a_real_qwen_folder_loads_without_torchvision(family, tmp_path):
    import torch

    from mdpo.data import load_processor
    from mdpo.data.collate import _torchvision_loads

    original = build_tiny_processor(family, tmp_path)
    _as_a_real_qwen_folder(tmp_path, family)
    loaded = load_processor(tmp_path)
    if not _torchvision_loads():
        assert type(loaded).__name__.endswith("ImageOnlyProcessor")
    assert loaded.chat_template == original.chat_template
    a, b = _encode(original, family), _encode(loaded, family)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
