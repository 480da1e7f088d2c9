"""Tiny Hugging Face processors for tests and demos, built fully offline in milliseconds.

`build_tiny_processor(family, save_dir=None)` returns a real `transformers` processor of the family's
own class (LlavaProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor, Idefics3Processor,
PaliGemmaProcessor) around a byte-level BPE tokenizer trained on a small built-in corpus (the
words of `mdpo-data make-sample`, the chat templates and the tests), and the family's image processor
sized so that one square image becomes 16 image tokens. With `save_dir` it is also written there and
`AutoProcessor.from_pretrained(save_dir)` reloads it (Qwen: see below).

Facts a tiny-model builder needs (`tiny_model_facts(processor, family)` returns them as a dict, read
from the processor itself, so use that rather than these numbers):

| family      | image tokens | vision tower input                                 | pixel inputs                                   |
|-------------|--------------|----------------------------------------------------|------------------------------------------------|
| llava       | 16           | CLIP 56 px, patch 14 (16 patches + CLS; strategy "default" drops CLS) | pixel_values (B, 3, 56, 56) |
| qwen2-vl    | 16           | 112 px → 8×8 patches of 14 px, temporal patch 2, merge 2 | pixel_values (B·64, 1176), image_grid_thw [[1, 8, 8]] per image, mm_token_type_ids |
| qwen2.5-vl  | 16           | same as qwen2-vl                                   | same as qwen2-vl                              |
| idefics3    | 16           | 64 px, patch 8, scale_factor 2, no image splitting | pixel_values (B, 1, 3, 64, 64), pixel_attention_mask (B, 1, 64, 64) |
| smolvlm     | alias of idefics3 (SmolVLM-1 is an Idefics3 model with the Idefics3 processor) |
| paligemma   | 16           | SigLIP 56 px, patch 14; image tokens first, then BOS | pixel_values (B, 3, 56, 56), token_type_ids (0 prefix, 1 suffix) |

Vocabulary: `len(processor.tokenizer)`: 640 (byte-level BPE, special tokens included) for every
family but PaliGemma, whose processor always adds its 1024 `<locXXXX>` and 128 `<segXXX>` tokens
(1,792 in all). Special tokens take the first ids. Special tokens:

| family      | image token      | bos  | eos                | pad     | other specials |
|-------------|------------------|------|--------------------|---------|----------------|
| llava       | `<image>`        | `<s>` (added by the tokenizer) | `</s>` | `<pad>` | `<unk>` |
| qwen2-vl(.5)| `<|image_pad|>`  | none | `<|im_end|>`       | `<|endoftext|>` | Qwen2-VL-Instruct's 14 (`<|im_start|>`, `<|vision_start|>`, `<|vision_end|>`, `<|video_pad|>`, box/quad/ref …) |
| idefics3    | `<image>`        | `<|im_start|>` (written by the chat template, not the tokenizer) | `<end_of_utterance>` | `<|im_end|>` | `<|endoftext|>` (unk), `<fake_token_around_image>`, `<global-img>`, `<row_i_col_j>` |
| paligemma   | `<image>`        | `<bos>` (inserted by the processor after the image tokens) | `<eos>` | `<pad>` | `<unk>`, loc/seg tokens |

Qwen2-VL / Qwen2.5-VL: transformers 5.x wants a video processor for these, and its video processors
need torchvision (whose CUDA wheels do not load beside a CPU-only torch). Where it cannot be built,
`Qwen2VLImageOnlyProcessor` / `Qwen2_5_VLImageOnlyProcessor` (subclasses without the video part, same
outputs for images and text) are used and registered with AutoProcessor: load a saved one with
`mdpo.data.load_processor(dir)`, or call `register_auto_classes()` before `AutoProcessor.from_pretrained`.

Chat templates are the families' real ones, character for character: llava-hf/llava-1.5-*-hf's
("USER: <image>\\n… ASSISTANT:", a system message as its bare text, no `</s>` after an answer),
Qwen2-VL-Instruct's (`<|im_start|>` turns, default system "You are a helpful assistant.",
`<|vision_start|><|image_pad|><|vision_end|>`), SmolVLM-Instruct's
("<|im_start|>User:<image>…<end_of_utterance>\\nAssistant:"); PaliGemma has none (prompt = question).
Special tokens follow the real tokenizers' layout (which token is BOS / EOS / pad, whether the
tokenizer adds BOS), as in the table above.
"""
from __future__ import annotations

import functools
import os
from typing import Any

FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "idefics3", "smolvlm", "paligemma")
_ALIASES = {"smolvlm": "idefics3", "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen2.5_vl": "qwen2.5-vl"}

# Size of the trained BPE vocabulary: special tokens + 256 byte symbols + merges.
_BPE_VOCAB_SIZE = 640
IMAGE_TOKENS_PER_IMAGE = 16

_WORDS = """
a an the is are was were there in on of to and or with without at by for from what which how many
where who does do did this that these those it its image picture photo scene shows show see can you
yes no not none any some all both only one two three four five six seven eight nine ten zero
0 1 2 3 4 5 6 7 8 9 10 11 12 colour color colours colors shape shapes object objects count number
red green blue yellow purple orange white black gray grey pink brown cyan magenta
circle circles square squares triangle triangles star stars rectangle rectangles diamond diamonds
ellipse ellipses cross crosses hexagon hexagons disc discs dot dots box boxes
left right top bottom center centre middle upper lower corner side above below next beside near
far half row column large small big tiny medium size sizes position positions located background
foreground answer question describe description briefly detail details list every each also but
USER ASSISTANT SYSTEM User Assistant System user assistant system You are a helpful assistant
A chat between a curious user and an artificial intelligence assistant The assistant gives helpful
detailed and polite answers to the user's questions Please look carefully
I it's there's there are cat dog car tree house sky grass table chair person man woman
hello world test tests record records sample chosen rejected prompt faithful hallucinated true false
corrupted crop random cropped region area
"""


def _corpus() -> list[str]:
    """Sentences the BPE is trained on: the word list plus sample-data-like phrases, repeated so
    frequent words become single tokens."""
    words = _WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    colours = "red green blue yellow purple orange white black gray pink brown cyan".split()
    shapes = "circle square triangle star rectangle diamond".split()
    places = "left right top bottom center upper lower middle".split()
    numbers = "zero one two three four five six seven eight nine ten".split()
    for i, c in enumerate(colours):
        s = shapes[i % len(shapes)]
        p = places[i % len(places)]
        n = numbers[i % len(numbers)]
        lines.append(f"There is a {c} {s} in the {p} of the image.")
        lines.append(f"How many {s}s are there in the image? There are {n} {s}s.")
        lines.append(f"What colour is the {s}? The {s} is {c}.")
        lines.append(f"Is there a {c} {s} in the image? Yes, there is a {c} {s}. No, there is no {c} {s}.")
        lines.append(f"Where is the {c} {s}? The {c} {s} is at the {p}.")
        lines.append(f"Describe the image. The image shows {n} objects: a {c} {s} at the {p}.")
    templates = [
        "USER: How many objects are there? ASSISTANT: There are three objects.",
        "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
        "system You are a helpful assistant. user assistant",
        "User: Assistant: User:What is in the image? Assistant: The image shows a circle.",
    ]
    return (lines + templates * 4) * 3


@functools.lru_cache(maxsize=None)
def _bpe_tokenizer_json(special_tokens: tuple[str, ...]) -> str:
    """Train a byte-level BPE on the built-in corpus (milliseconds, deterministic); return its JSON.

    `special_tokens` get the first ids (0, 1, …, in the order given) and are never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


# The families' real chat templates, character for character (chat_template.json of llava-hf/llava-1.5-7b-hf,
# Qwen/Qwen2-VL-7B-Instruct (Qwen2.5-VL-Instruct ships the same one) and HuggingFaceTB/SmolVLM-Instruct).
# llava-hf's writes no `</s>` after an answer and renders a system message as its bare text; Qwen's writes
# its default system message when the conversation has none; SmolVLM's starts with its BOS, <|im_start|>.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _family(family: str) -> str:
    key = family.lower()
    key = _ALIASES.get(key, key)
    if key not in ("llava", "qwen2-vl", "qwen2.5-vl", "idefics3", "paligemma"):
        raise ValueError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
    return key


def _fast_tokenizer(special: dict[str, str], extra_special: list[str], model_input_names: list[str], bos_template: bool):
    from tokenizers import processors
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    named = [special[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token") if k in special]
    # `extra_special` naming every named token too gives the real tokenizer's id order (Qwen).
    all_special = tuple(dict.fromkeys(extra_special if set(named) <= set(extra_special) else named + extra_special))
    backend = Tokenizer.from_str(_bpe_tokenizer_json(all_special))
    if bos_template:  # LLaMA-style tokenizers put BOS in front of every encoded text
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[t for t in extra_special if t not in named],
        model_input_names=model_input_names,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **special,
    )
    return tokenizer


def _image_processor_class(name: str):
    """The image-processor class that `AutoImageProcessor.from_pretrained` picks for `name` here.

    transformers 5.x has a torchvision and a Pillow backend per image processor and chooses between
    them on load (per-model defaults, whether torchvision imports). Building with that same choice
    makes a tiny processor give the same pixels in memory ("tiny:FAMILY") and reloaded from the folder
    it was saved to. The chooser is private to transformers: where it is missing, Pillow when there
    is no torchvision, else the plain class.
    """
    import importlib.util

    import transformers

    try:
        from transformers.models.auto.image_processing_auto import _load_backend_class, _resolve_backend

        chosen = _load_backend_class(name, _resolve_backend(None, None, name))
        if chosen is not None:
            return chosen
    except (ImportError, TypeError, ValueError, KeyError):  # another transformers: fall through
        pass
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    return getattr(transformers, name)


@functools.lru_cache(maxsize=None)
def _image_only_qwen_classes() -> dict[str, type]:
    """Qwen2-VL / Qwen2.5-VL processors without the video processor, registered with AutoProcessor.

    transformers 5.x requires a video processor for these families, and its video processors need
    torchvision, whose CUDA wheels do not load beside a CPU-only torch. When the real class cannot be
    built, these subclasses (same `__call__`, same chat template, same outputs for images and text)
    stand in. `AutoProcessor.from_pretrained(dir)` finds them once this module has been imported
    (`mdpo.data.load_processor` does that).
    """
    import transformers
    from transformers import AutoProcessor, PretrainedConfig
    from transformers.processing_utils import ProcessorMixin

    classes = {}
    for key, base in (("qwen2-vl", transformers.Qwen2VLProcessor), ("qwen2.5-vl", transformers.Qwen2_5_VLProcessor)):

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        name = base.__name__.replace("Processor", "ImageOnlyProcessor")
        cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__doc__": base.__doc__})
        config = type(name + "Config", (PretrainedConfig,), {"model_type": "mdpo_" + name.lower(), "__module__": __name__})
        AutoProcessor.register(config, cls, exist_ok=True)
        classes[key] = cls
    return classes


def image_only_qwen_processor_class(family: str) -> type:
    """`Qwen2VLImageOnlyProcessor` ("qwen2-vl") or `Qwen2_5_VLImageOnlyProcessor` ("qwen2.5-vl"):
    `.from_pretrained(folder)` loads any Qwen2(.5)-VL processor folder without its video processor."""
    return _image_only_qwen_classes()[_family(family)]


def register_auto_classes() -> None:
    """Make `AutoProcessor.from_pretrained` able to load every processor this module saves."""
    _image_only_qwen_classes()


def _qwen_processor(key: str, image_processor, tokenizer):
    """The real Qwen2(.5)-VL processor when its video processor can be built, else the image-only one."""
    import transformers

    base = transformers.Qwen2VLProcessor if key == "qwen2-vl" else transformers.Qwen2_5_VLProcessor
    try:
        video_processor = transformers.Qwen2VLVideoProcessor(size={"shortest_edge": 112 * 112, "longest_edge": 112 * 112})
        return base(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                    chat_template=_QWEN_TEMPLATE)
    except Exception:  # no torchvision here: transformers' video processors need it
        cls = _image_only_qwen_classes()[key]
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN_TEMPLATE)


def build_tiny_processor(family: str, save_dir: str | os.PathLike | None = None):
    """Build the tiny processor of `family` (see the module docstring); save it to `save_dir` if given.

    family: "llava" | "qwen2-vl" | "qwen2.5-vl" | "idefics3" | "smolvlm" (alias of idefics3) | "paligemma".
    returns: the family's `transformers` processor object; one square image → 16 image tokens.
    """
    key = _family(family)
    n = IMAGE_TOKENS_PER_IMAGE
    if key == "llava":
        from transformers import LlavaProcessor

        tokenizer = _fast_tokenizer(
            {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
            ["<image>"],
            ["input_ids", "attention_mask"],
            bos_template=True,
        )
        image_processor = _image_processor_class("CLIPImageProcessor")(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=_LLAVA_TEMPLATE,
        )
    elif key in ("qwen2-vl", "qwen2.5-vl"):
        tokenizer = _fast_tokenizer(  # Qwen2-VL-Instruct's special tokens, in its order; no BOS
            {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
             "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
             "<|image_pad|>", "<|video_pad|>"],
            ["input_ids", "attention_mask"],
            bos_template=False,
        )
        # 112×112 px → 8×8 patches of 14 px → 64 rows of 3·2·14·14 = 1176 values; merge 2×2 → 16 tokens.
        pixels = 112 * 112
        image_processor = _image_processor_class("Qwen2VLImageProcessor")(
            size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, temporal_patch_size=2, merge_size=2
        )
        processor = _qwen_processor(key, image_processor, tokenizer)
    elif key == "idefics3":
        from transformers import Idefics3Processor

        row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tokenizer = _fast_tokenizer(  # SmolVLM-Instruct's layout: BOS <|im_start|> (written by the template)
            {"unk_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
             "pad_token": "<|im_end|>"},
            ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + row_col,
            ["input_ids", "attention_mask"],
            bos_template=False,
        )
        # 64 px, patch 8 → 8×8 patches; pixel shuffle with scale_factor 2 → 16 tokens; no splitting.
        image_processor = _image_processor_class("Idefics3ImageProcessor")(
            size={"longest_edge": 64}, max_image_size={"longest_edge": 64}, do_image_splitting=False
        )
        processor = Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=n, chat_template=_IDEFICS3_TEMPLATE
        )
    else:  # paligemma
        from transformers import PaliGemmaProcessor

        tokenizer = _fast_tokenizer(
            {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
            ["<image>"],
            ["input_ids", "attention_mask"],
            bos_template=False,
        )
        image_processor = _image_processor_class("SiglipImageProcessor")(size={"height": 56, "width": 56})
        image_processor.image_seq_length = n  # SigLIP 56 px / patch 14 → 16 tokens
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        processor.save_pretrained(str(save_dir))
    return processor


def tiny_model_facts(processor: Any, family: str) -> dict[str, Any]:
    """Numbers a tiny model of `family` must agree with, read from `processor` (tiny or not).

    returns: {"family", "vocab_size" (len(tokenizer)), "image_token", "image_token_id", "pad_token_id",
    "eos_token_id", "bos_token_id" (None where the family has none), "num_image_tokens" (per square
    image), "vision": {...}} where "vision" holds image_size / patch_size and the family's extras
    (LLaVA: vision_feature_select_strategy, vision_feature_layer; Qwen: temporal_patch_size,
    spatial_merge_size, in_chans, patch rows per image; Idefics3: scale_factor; PaliGemma:
    projection of image_seq_length), plus family-specific token ids (Qwen's vision_start/end and
    video ids, Idefics3's fake/global image ids).
    """
    from PIL import Image

    key = _family(family)
    tok = processor.tokenizer
    image_token = processor.image_token
    facts: dict[str, Any] = {
        "family": key,
        "vocab_size": len(tok),
        "image_token": image_token,
        "image_token_id": tok.convert_tokens_to_ids(image_token),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    # Count the image tokens the processor really inserts for one square image.
    image = Image.new("RGB", (64, 64), (128, 64, 32))
    text = {"llava": "<image>\nhi", "idefics3": "<image>hi", "paligemma": "<image>hi"}.get(
        key, "<|vision_start|><|image_pad|><|vision_end|>hi"
    )
    out = processor(text=[text], images=[image], return_tensors="pt")
    facts["num_image_tokens"] = int((out["input_ids"] == facts["image_token_id"]).sum())
    ip = processor.image_processor
    if key == "llava":
        facts["vision"] = {
            "image_size": ip.crop_size["height"],
            "patch_size": processor.patch_size,
            "vision_feature_select_strategy": processor.vision_feature_select_strategy,
            "vision_feature_layer": -2,
        }
    elif key in ("qwen2-vl", "qwen2.5-vl"):
        patch_rows, values = (int(s) for s in out["pixel_values"].shape)
        facts["vision"] = {
            "patch_size": ip.patch_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "spatial_merge_size": ip.merge_size,
            "in_chans": 3,
            "image_size": int(round((ip.size["longest_edge"]) ** 0.5)),
            "patch_rows_per_image": patch_rows,
            "patch_dim": values,
            "image_grid_thw": out["image_grid_thw"][0].tolist(),
        }
        facts["vision_start_token_id"] = tok.convert_tokens_to_ids("<|vision_start|>")
        facts["vision_end_token_id"] = tok.convert_tokens_to_ids("<|vision_end|>")
        facts["video_token_id"] = tok.convert_tokens_to_ids("<|video_pad|>")
    elif key == "idefics3":
        image_size = ip.max_image_size["longest_edge"]
        patch = 8
        facts["vision"] = {
            "image_size": image_size,
            "patch_size": patch,
            "scale_factor": int(round(((image_size // patch) ** 2 / processor.image_seq_len) ** 0.5)),
        }
        facts["fake_image_token_id"] = tok.convert_tokens_to_ids("<fake_token_around_image>")
        facts["global_image_token_id"] = tok.convert_tokens_to_ids("<global-img>")
    else:
        image_size = ip.size["height"]
        facts["vision"] = {"image_size": image_size, "patch_size": 14, "image_seq_length": processor.image_seq_length}
    return facts


__all__ = ["FAMILIES", "IMAGE_TOKENS_PER_IMAGE", "build_tiny_processor", "image_only_qwen_processor_class",
           "register_auto_classes", "tiny_model_facts"]
