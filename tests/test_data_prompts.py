"""Prompt rendering: paper-format (LLaVA / Vicuna templated) prompts on every family, the
system prompt, image-size keys and response truncation (issue 11, items 1, 6, 7)."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mdpo.config import ConfigError, load_config
from mdpo.data import BadRecordError, PreferenceCollator, load_records, make_sample
from mdpo.data.cli import main as data_main
from mdpo.data.records import split_paper_prompt
from mdpo.tiny_processors import FAMILIES, build_tiny_processor, tiny_model_facts

# LLaVA-1.5's system text (conv_vicuna_v1), as the paper's records carry it.
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return load_records(make_sample(tmp_path_factory.mktemp("sample"), n=6, seed=2)).records


@pytest.fixture(scope="module")
def processors():
    return {family: build_tiny_processor(family) for family in FAMILIES}


def paper_of(record, system=VICUNA_SYSTEM):
    """The same record in the paper's shape: a Vicuna-templated prompt."""
    prompt = f"{system} USER: <image>\n{record.question} ASSISTANT:"
    return dataclasses.replace(record, shape="paper", question=None, prompt=prompt)


# ------------------------------------------------------------------------------ recognising the template
def test_split_paper_prompt_recovers_system_and_turns():
    templated, messages = split_paper_prompt(f"{VICUNA_SYSTEM} USER: <image>\nHow many stars? ASSISTANT:")
    assert templated
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": VICUNA_SYSTEM}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many stars?"}]},
    ]
    # Several turns (LLaVA's sep2 "</s>" after an answer), the image in the first user turn.
    templated, messages = split_paper_prompt("USER: <image>\nWhat is it? ASSISTANT: A star.</s>USER: Which colour? ASSISTANT:")
    assert templated and [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [{"type": "text", "text": "A star."}]
    assert messages[2]["content"] == [{"type": "text", "text": "Which colour?"}]
    # A bare question is one user turn; the image stays where its placeholder is.
    assert split_paper_prompt("Describe it. <image>") == (
        False, [{"role": "user", "content": [{"type": "text", "text": "Describe it."}, {"type": "image"}]}])


@pytest.mark.parametrize("prompt, reason", [
    ("<|im_start|>user\n<image>What?<|im_end|>\n<|im_start|>assistant\n", "'<|im_start|>' turns.*prompt_template: verbatim"),
    ("USER: <image>\nWhat is it?", "does not end with 'ASSISTANT:'.*prompt_template: verbatim"),
    ("ASSISTANT: hi USER: <image>\nWhat? ASSISTANT:", "do not alternate"),
])
def test_a_prompt_in_another_template_is_a_bad_record_naming_verbatim(prompt, reason, sample, processors):
    record = dataclasses.replace(sample[0], shape="paper", question=None, prompt=prompt)
    with pytest.raises(BadRecordError, match=reason):
        PreferenceCollator(processors["qwen2-vl"], objective="dpo", max_length=256)([record])
    verbatim = PreferenceCollator(processors["llava"], objective="dpo", max_length=256, prompt_template="verbatim")
    assert verbatim.prompt_text(record) == prompt  # verbatim keeps any text


# ------------------------------------------------------------------------------ rendering with the model's template
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "idefics3", "paligemma"])
def test_paper_prompt_is_rendered_with_the_models_own_template(family, sample, processors):
    """A Vicuna-templated paper prompt gives exactly the rows of the same question in the plain shape
    with the paper's system text as the system prompt: the model's own template, no 'USER:'."""
    processor = processors[family]
    record = sample[0]
    collator = PreferenceCollator(processor, objective="mdpo", max_length=256)
    text = collator.prompt_text(paper_of(record))
    assert "USER:" not in text and "ASSISTANT:" not in text
    if family != "paligemma":
        assert VICUNA_SYSTEM in text
    plain = PreferenceCollator(processor, objective="mdpo", max_length=256, system_prompt=VICUNA_SYSTEM)
    assert text == plain.prompt_text(record)
    got, want = collator([paper_of(record)]), plain([record])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(got[key], want[key]), key
    if family.startswith("qwen"):
        assert text.startswith(f"<|im_start|>system\n{VICUNA_SYSTEM}<|im_end|>\n<|im_start|>user\n"
                               "<|vision_start|><|image_pad|><|vision_end|>")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    if family == "idefics3":
        assert text.startswith(f"<|im_start|>System: {VICUNA_SYSTEM}<end_of_utterance>\nUser:<image>")
    if family == "paligemma":  # no chat template: the image, then the question (no system text)
        assert text == "<image>" + record.question
    facts = tiny_model_facts(processor, family)
    assert int((got["input_ids"][0] == facts["image_token_id"]).sum()) == 16
    # Text-only rows (dpo_no_image) drop the image item the same way.
    no_image = PreferenceCollator(processor, objective="dpo_no_image", max_length=256)
    assert "image" not in no_image.prompt_text(paper_of(record), with_image=False).replace("the image", "")


def test_llava_model_mode_renders_the_paper_text_again(sample, processors):
    """For LLaVA-1.5 the model's own (llava-hf) template reproduces the paper's Vicuna prompt
    character for character, so `model` and `verbatim` give the same rows."""
    processor = processors["llava"]
    record = paper_of(sample[1])
    model = PreferenceCollator(processor, objective="mdpo", max_length=256)
    verbatim = PreferenceCollator(processor, objective="mdpo", max_length=256, prompt_template="verbatim")
    assert model.prompt_text(record) == verbatim.prompt_text(record) == record.prompt
    a, b = model([record]), verbatim([record])
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "attention_mask", "pixel_values"))
    bare = dataclasses.replace(record, prompt=f"USER: <image>\n{sample[1].question} ASSISTANT:")  # no system text
    assert model.prompt_text(bare) == bare.prompt


def test_verbatim_keeps_the_vicuna_text_on_qwen(sample, processors):
    record = paper_of(sample[0])
    collator = PreferenceCollator(processors["qwen2-vl"], objective="dpo", max_length=256, prompt_template="verbatim")
    assert collator.prompt_text(record) == record.prompt.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    assert "data.prompt_template: verbatim" in collator.describe_prompts([record])


def test_describe_prompts_says_which_mode(sample, processors):
    collator = PreferenceCollator(processors["qwen2-vl"], objective="dpo", max_length=256, system_prompt="Be brief.")
    line = collator.describe_prompts([paper_of(sample[0]), sample[1]])
    assert line.startswith("prompts (data.prompt_template: model): 1 paper-shape record(s) re-rendered")
    assert "Be brief." in line and "\n" not in line


# ------------------------------------------------------------------------------ system prompt
def test_system_prompt_reaches_the_template_where_a_record_has_none(sample, processors):
    processor = processors["qwen2-vl"]
    collator = PreferenceCollator(processor, objective="dpo", max_length=256, system_prompt="Be brief.")
    text = collator.prompt_text(sample[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "You are a helpful assistant." not in text
    # A record's own system text wins (a paper prompt's, a TRL system message).
    assert VICUNA_SYSTEM in collator.prompt_text(paper_of(sample[0])) and "Be brief." not in collator.prompt_text(paper_of(sample[0]))
    default = PreferenceCollator(processor, objective="dpo", max_length=256).prompt_text(sample[0])
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")  # the template's own default


def test_make_collator_passes_the_data_keys(sample, processors):
    from mdpo.components import make_collator, make_corruption

    cfg = load_config(None, ["model.preset=tiny-qwen2-vl", "data.system_prompt=Be brief.", "data.prompt_template=verbatim",
                             "data.max_pixels=3136", "data.min_pixels=784", "data.truncate_response=true"])
    loaded = SimpleNamespace(processor=processors["qwen2-vl"], family="qwen2-vl")
    collator = make_collator(cfg, loaded, make_corruption(cfg), sample)
    assert collator.system_prompt == "Be brief." and collator.prompt_template == "verbatim"
    assert collator.truncate_response is True
    assert collator.image_kwargs == {"size": {"shortest_edge": 784, "longest_edge": 3136}}


@pytest.mark.parametrize("override, message", [
    ("data.prompt_template=vicuna", r"data.prompt_template='vicuna' is not one of \['model', 'verbatim'\]"),
    ("data.max_pixels=0", "data.max_pixels must be ≥ 1"),
    ("data.min_pixels=5000", "data.min_pixels=5000 is larger than data.max_pixels=4000"),
])
def test_data_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.preset=tiny-qwen2-vl", "data.max_pixels=4000", override]
                    if "min_pixels" in override else ["model.preset=tiny-qwen2-vl", override])


# ------------------------------------------------------------------------------ mdpo-data check
def test_check_shows_the_first_records_rendered_prompt(tmp_path, sample, capsys):
    rows = [{"id": f"r{i}", "img_path": r.image_path, "prompt": paper_of(r).prompt, "chosen": r.chosen,
             "rejected": r.rejected} for i, r in enumerate(sample[:3])]
    data = tmp_path / "paper.json"
    data.write_text(json.dumps(rows))
    build_tiny_processor("qwen2-vl", tmp_path / "qwen")
    assert data_main(["check", str(data), "--processor", str(tmp_path / "qwen")]) == 0
    out = capsys.readouterr().out
    assert "prompt of record 0 (id 'r0', paper shape) as the model sees it (prompts (data.prompt_template: model)" in out
    shown = [line[4:] for line in out.splitlines() if line.startswith("  | ")]
    assert shown[0] == "<|im_start|>system" and f"<|im_start|>user" in shown and "USER:" not in "\n".join(shown)
    assert data_main(["check", str(data), "--processor", str(tmp_path / "qwen"), "--prompt-template", "verbatim"]) == 0
    shown = [line[4:] for line in capsys.readouterr().out.splitlines() if line.startswith("  | ")]
    assert shown[0].startswith(VICUNA_SYSTEM + " USER: <|vision_start|>")
    assert data_main(["check", str(data)]) == 0  # without a processor: the prompt as written, and how to see more
    out = capsys.readouterr().out
    assert "prompt of record 0 as written (give --processor DIR" in out and f"  | {VICUNA_SYSTEM} USER: <image>" in out


# ------------------------------------------------------------------------------ image size (Qwen dynamic resolution)
def test_max_pixels_sets_the_number_of_qwen_image_tokens(tmp_path, sample, processors):
    big = dataclasses.replace(sample[0], image_path=str(tmp_path / "big.png"))
    Image.new("RGB", (224, 168), (200, 30, 30)).save(big.image_path)
    processor = processors["qwen2.5-vl"]
    facts = tiny_model_facts(processor, "qwen2.5-vl")

    def image_tokens(**kw):
        """(image tokens in the row, pixels the image was resized to) under a pixel budget."""
        batch = PreferenceCollator(processor, objective="mdpo", max_length=512, **kw)([big])
        _, h, w = batch["image_grid_thw"][0].tolist()
        n = int((batch["input_ids"][0] == facts["image_token_id"]).sum())
        assert n == h * w // 4  # one token per 2×2 merged patches of 14 px
        return n, h * w * 14 * 14

    own_n, own_pixels = image_tokens()
    assert own_pixels <= 112 * 112  # the tiny processor's own budget
    small_n, small_pixels = image_tokens(max_pixels=56 * 56, min_pixels=28 * 28)
    assert 28 * 28 <= small_pixels <= 56 * 56 and small_n < own_n
    assert image_tokens(max_pixels=56 * 56)[0] == small_n  # a min above the new max follows it
    large_n, large_pixels = image_tokens(min_pixels=224 * 168, max_pixels=224 * 168)
    assert large_pixels == 224 * 168 and large_n == 48 > own_n  # the whole image: 16×12 patches
    measured = PreferenceCollator(processor, objective="dpo", max_length=512, max_pixels=56 * 56).measure(big)
    assert measured["protected"] < PreferenceCollator(processor, objective="dpo", max_length=512).measure(big)["protected"]


@pytest.mark.parametrize("family", ["llava", "idefics3", "paligemma"])
def test_max_pixels_is_refused_where_it_does_not_apply(family, processors):
    with pytest.raises(ConfigError, match=f"data.max_pixels / data.min_pixels apply to .*qwen2-vl.*the {family} image processor"):
        PreferenceCollator(processors[family], objective="dpo", max_length=256, max_pixels=4096)


# ------------------------------------------------------------------------------ responses longer than the budget
def long_record(record):
    return dataclasses.replace(record, chosen=" ".join(["red circle"] * 40), rejected="A blue star.")


def test_too_long_message_names_the_keys_that_fix_it(sample, processors):
    collator = PreferenceCollator(processors["llava"], objective="mdpo", max_length=60)
    with pytest.raises(BadRecordError) as info:
        collator.check_fits(long_record(sample[0]))
    for key in ("data.max_length", "data.max_pixels", "data.truncate_response: true", "data.on_bad_record: skip"):
        assert key in info.value.reason


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_truncate_response_cuts_the_response_end_without_eos(family, sample, processors):
    processor = processors[family]
    record = long_record(sample[0])
    limit = 60
    full = PreferenceCollator(processor, objective="mdpo", max_length=1024)([record])
    cut = PreferenceCollator(processor, objective="mdpo", max_length=limit, truncate_response=True)([record])
    eos = processor.tokenizer.eos_token_id
    n_prompt = int((full["labels"][0] == -100).sum() - (full["attention_mask"][0] == 0).sum())
    chosen_full = full["labels"][0][full["labels"][0] != -100]
    chosen_cut = cut["labels"][0][cut["labels"][0] != -100]
    assert int(cut["attention_mask"][0].sum()) == limit  # filled to the budget
    assert torch.equal(cut["input_ids"][0][:n_prompt], full["input_ids"][0][:n_prompt])  # prompt kept whole
    assert torch.equal(chosen_cut, chosen_full[: limit - n_prompt])  # the response's start
    assert int(chosen_full[-1]) == eos and int(chosen_cut[-1]) != eos  # a cut response has no EOS
    assert torch.equal(cut["labels"][2], cut["labels"][0])  # the corrupted row: the same cut of y_w
    rejected = cut["labels"][1][cut["labels"][1] != -100]
    assert int(rejected[-1]) == eos  # a response that fits keeps its EOS
    with pytest.raises(BadRecordError, match="truncate_response"):
        PreferenceCollator(processor, objective="mdpo", max_length=limit)([record])


def test_load_records_measures_with_the_runs_options(tmp_path, processors):
    path = make_sample(tmp_path, n=3, seed=0)
    rows = json.loads(path.read_text())
    rows[1]["chosen"] = " ".join(["red circle"] * 60)
    path.write_text(json.dumps(rows))
    with pytest.raises(BadRecordError, match="bad record 1 .*data.truncate_response: true"):
        load_records(path, processor=processors["llava"], max_length=80)
    kept = load_records(path, processor=processors["llava"], max_length=80, collator_options={"truncate_response": True})
    assert len(kept.records) == 3 and kept.skipped == []
    with pytest.raises(BadRecordError, match="no room for one response token"):  # even cut it cannot fit
        load_records(path, processor=processors["llava"], max_length=16, collator_options={"truncate_response": True})
