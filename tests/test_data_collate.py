"""One [chosen | rejected | corrupted] batch: label masks per model family, layouts, truncation."""
import json

import pytest
import torch

from mdpo.data import BadRecordError, CorruptionConfig, PreferenceCollator, load_processor, load_records, make_sample
from mdpo.tiny_processors import FAMILIES, build_tiny_processor, tiny_model_facts

PIXEL_KEYS = {
    "llava": ["pixel_values"],
    "qwen2-vl": ["pixel_values", "image_grid_thw"],
    "qwen2.5-vl": ["pixel_values", "image_grid_thw"],
    "idefics3": ["pixel_values", "pixel_attention_mask"],
    "smolvlm": ["pixel_values", "pixel_attention_mask"],
    "paligemma": ["pixel_values"],
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = make_sample(tmp_path_factory.mktemp("sample"), n=12, seed=1)
    return load_records(path).records


@pytest.fixture(scope="module")
def processors():
    return {family: build_tiny_processor(family) for family in FAMILIES}


def decode(processor, ids):
    return processor.tokenizer.decode([int(i) for i in ids])


@pytest.mark.parametrize("family", FAMILIES)
def test_label_masks_for_each_family(family, sample, processors):
    processor = processors[family]
    facts = tiny_model_facts(processor, family)
    records = sample[:3]
    batch = PreferenceCollator(processor, objective="mdpo", max_length=256)(records)
    B = len(records)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == labels.shape[0] == mask.shape[0] == 3 * B
    assert batch["sample_ids"] == [r.sample_id for r in records] and batch["num_pairs"] == B
    responses = [r.chosen for r in records] + [r.rejected for r in records] + [r.chosen for r in records]
    for row in range(3 * B):
        n_real = int(mask[row].sum())
        assert mask[row, :n_real].all() and not mask[row, n_real:].any()  # right padding
        assert (labels[row, n_real:] == -100).all() and (ids[row, n_real:] == facts["pad_token_id"]).all()
        image_positions = ids[row] == facts["image_token_id"]
        assert int(image_positions.sum()) == 16
        assert (labels[row][image_positions] == -100).all()
        supervised = (labels[row] != -100).nonzero().flatten()
        first, last = int(supervised[0]), int(supervised[-1])
        # One contiguous response span at the end of the real tokens, ending with EOS.
        assert supervised.tolist() == list(range(first, n_real)) and last == n_real - 1
        assert int(labels[row, last]) == facts["eos_token_id"]
        assert torch.equal(labels[row, first:n_real], ids[row, first:n_real])
        assert int(image_positions[first:].sum()) == 0  # every image token is in the prompt
        assert decode(processor, ids[row, first:last]).strip() == responses[row]
    for key in PIXEL_KEYS[family]:
        assert key in batch, key
    if family.startswith("qwen"):
        assert tuple(batch["pixel_values"].shape) == (3 * B * 64, 1176)
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * (3 * B)
        mm = batch["mm_token_type_ids"]
        assert torch.equal(mm.bool(), ids == facts["image_token_id"])
    else:
        assert batch["pixel_values"].shape[0] == 3 * B
    if family == "paligemma":  # token_type_ids: 1 exactly on the response (suffix), 0 on prefix and padding
        assert torch.equal(batch["token_type_ids"].bool(), labels != -100)
        assert (ids[:, :16] == facts["image_token_id"]).all()


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_mdpo_layout_chosen_rejected_corrupted(family, sample, processors):
    records = sample[:2]
    B = len(records)
    batch = PreferenceCollator(processors[family], objective="mdpo", max_length=256)(records)
    ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixel_values"]
    c, r, k = slice(0, B), slice(B, 2 * B), slice(2 * B, 3 * B)
    # The corrupted rows are the chosen rows with another image: same tokens, same labels ...
    assert torch.equal(ids[k], ids[c]) and torch.equal(labels[k], labels[c])
    # ... rejected rows share the prompt but not the response.
    for i in range(B):
        n_prompt = int((labels[i] == -100).long().cumprod(0).sum())
        assert torch.equal(ids[B + i, :n_prompt], ids[i, :n_prompt])
        assert not torch.equal(labels[B + i], labels[i])
    per_row = pixels.shape[0] // (3 * B)
    chunks = pixels.view(3 * B, per_row, *pixels.shape[1:])
    assert torch.equal(chunks[r], chunks[c])  # same original image for chosen and rejected
    for i in range(B):
        assert not torch.equal(chunks[2 * B + i], chunks[i])  # the corrupted image differs


@pytest.mark.parametrize("objective", ["dpo", "mdpo_no_conditional"])
def test_two_branch_objectives_have_2b_rows(objective, sample, processors):
    records = sample[:3]
    full = PreferenceCollator(processors["llava"], objective="mdpo", max_length=256)(records)
    two = PreferenceCollator(processors["llava"], objective=objective, max_length=256)(records)
    assert two["input_ids"].shape[0] == two["pixel_values"].shape[0] == 6 and two["num_pairs"] == 3
    width = two["input_ids"].shape[1]
    assert torch.equal(two["input_ids"], full["input_ids"][:6, :width])
    assert torch.equal(two["labels"], full["labels"][:6, :width])


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_no_image_rows_are_text_only(family, sample, processors):
    processor = processors[family]
    facts = tiny_model_facts(processor, family)
    records = sample[:3]
    with_image = PreferenceCollator(processor, objective="dpo", max_length=256)(records)
    text_only = PreferenceCollator(processor, objective="dpo_no_image", max_length=256)(records)
    assert text_only["input_ids"].shape[0] == 6
    assert not any(k in text_only for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask"))
    special_image_ids = {facts["image_token_id"], facts.get("vision_start_token_id"), facts.get("fake_image_token_id")}
    assert not any(int(t) in special_image_ids for t in text_only["input_ids"].flatten())
    for row in range(6):  # the same supervised response tokens as with the image
        a = with_image["labels"][row][with_image["labels"][row] != -100]
        b = text_only["labels"][row][text_only["labels"][row] != -100]
        assert torch.equal(a, b)
        prompt = decode(processor, text_only["input_ids"][row][text_only["labels"][row] == -100])
        assert records[row % 3].question in prompt


def test_corrupted_images_follow_the_epoch(sample, processors):
    records = sample[:2]
    collator = PreferenceCollator(processors["llava"], objective="mdpo", max_length=256, corruption=CorruptionConfig(seed=5))
    first = collator(records)["pixel_values"]
    assert torch.equal(collator(records)["pixel_values"], first)  # same epoch: same batch
    collator.set_epoch(1)
    second = collator(records)["pixel_values"]
    assert torch.equal(second[:4], first[:4]) and not torch.equal(second[4:], first[4:])
    fixed = PreferenceCollator(processors["llava"], max_length=256, corruption=CorruptionConfig(seed=5, same_every_epoch=True))
    a = fixed(records)["pixel_values"]
    fixed.set_epoch(3)
    assert torch.equal(fixed(records)["pixel_values"], a)


def test_truncation_cuts_prompt_text_only(sample, processors):
    processor = processors["qwen2-vl"]
    facts = tiny_model_facts(processor, "qwen2-vl")
    record = sample[0]
    full = PreferenceCollator(processor, objective="dpo", max_length=512)([record])
    n_full = int(full["attention_mask"][0].sum())
    limit = n_full - 7  # "system\nYou are a helpful" is 7 tokens
    cut = PreferenceCollator(processor, objective="dpo", max_length=limit)([record])
    ids, labels = cut["input_ids"][0], cut["labels"][0]
    n = int(cut["attention_mask"][0].sum())
    assert n == limit
    assert int((ids == facts["image_token_id"]).sum()) == 16  # no image token cut
    full_ids = full["input_ids"][0][:n_full]
    assert torch.equal(labels[labels != -100], full["labels"][0][full["labels"][0] != -100])  # response whole
    specials = set(processor.tokenizer.all_special_ids)
    assert [int(t) for t in full_ids if int(t) in specials] == [int(t) for t in ids[:n] if int(t) in specials]
    # The oldest text goes first: the system prompt's words.
    assert "helpful" in decode(processor, full_ids) and "helpful" not in decode(processor, ids[:n])
    assert record.question in decode(processor, ids[:n])


def test_a_record_that_cannot_fit_is_bad(sample, processors):
    record = sample[0]
    collator = PreferenceCollator(processors["llava"], objective="mdpo", max_length=20)
    with pytest.raises(BadRecordError, match=rf"bad record {record.index} \(id '{record.sample_id}'\): too long for max_length=20"):
        collator([record])
    with pytest.raises(BadRecordError, match="at least"):
        collator.check_fits(record)


def test_load_records_finds_too_long_records_up_front(tmp_path, processors):
    path = make_sample(tmp_path, n=4, seed=0)
    rows = json.loads(path.read_text())
    rows[2]["chosen"] = " ".join(["red circle"] * 60)
    path.write_text(json.dumps(rows))
    with pytest.raises(BadRecordError, match="bad record 2 .*too long for max_length=80"):
        load_records(path, processor=processors["llava"], max_length=80)
    result = load_records(path, on_bad_record="skip", processor=processors["llava"], max_length=80)
    assert [s.index for s in result.skipped] == [2] and len(result.records) == 3
    assert "too long" in result.skipped[0].reason


def _record_of_shape(sample, shape):
    base = sample[0]
    import dataclasses

    if shape == "paper":
        return dataclasses.replace(base, shape="paper", question=None,
                                   prompt=f"A chat. USER: <image>\n{base.question} ASSISTANT:")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": base.question}]}]
    return dataclasses.replace(base, shape="trl", prompt=messages)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "idefics3", "paligemma"])
def test_paper_shape_prompt_is_mapped_to_the_family_placeholder(family, sample, processors):
    """prompt_template="verbatim": the paper text as written, only the placeholder mapped (the
    default, "model", is tested in test_data_prompts.py)."""
    processor = processors[family]
    facts = tiny_model_facts(processor, family)
    record = _record_of_shape(sample, "paper")
    collator = PreferenceCollator(processor, objective="mdpo", max_length=256, prompt_template="verbatim")
    text = collator.prompt_text(record)
    expected = {
        "llava": "A chat. USER: <image>\n",
        "qwen2-vl": "A chat. USER: <|vision_start|><|image_pad|><|vision_end|>\n",
        "idefics3": "A chat. USER: <image>\n",
        "paligemma": "<image>A chat. USER: ",
    }[family]
    assert text.startswith(expected)
    batch = collator([record])
    assert int((batch["input_ids"][0] == facts["image_token_id"]).sum()) == 16
    no_image = collator.prompt_text(record, with_image=False)
    assert no_image == f"A chat. USER: {sample[0].question} ASSISTANT:"


def test_trl_shape_matches_the_plain_shape(sample, processors):
    processor = processors["qwen2.5-vl"]
    plain = PreferenceCollator(processor, max_length=256)([sample[0]])
    trl = PreferenceCollator(processor, max_length=256)([_record_of_shape(sample, "trl")])
    for key in ("input_ids", "labels", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(plain[key], trl[key]), key


def test_random_image_needs_the_pool(sample, processors):
    collator = PreferenceCollator(processors["llava"], max_length=256, corruption=CorruptionConfig(strategy="random_image"))
    with pytest.raises(ValueError, match="needs image_pool="):
        collator(sample[:2])
    collator.set_image_pool(sample)
    batch = collator(sample[:2])
    assert batch["input_ids"].shape[0] == 6
    assert not torch.equal(batch["pixel_values"][4], batch["pixel_values"][0])


def test_bad_collator_arguments_are_named(processors):
    with pytest.raises(ValueError, match="objective='ipo'"):
        PreferenceCollator(processors["llava"], objective="ipo")
    with pytest.raises(ValueError, match="max_length=0"):
        PreferenceCollator(processors["llava"], max_length=0)
    with pytest.raises(ValueError, match="family='blip'"):
        PreferenceCollator(processors["llava"], family="blip")


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_from_a_folder_or_a_tiny_name(tmp_path, sample, family):
    """A saved tiny processor reloads as the same class and gives the same batch, pixels included
    (transformers chooses an image backend on load; the tiny builder must choose the same one)."""
    built = build_tiny_processor(family, save_dir=tmp_path)
    a = PreferenceCollator(str(tmp_path), max_length=256)([sample[0]])
    b = PreferenceCollator(f"tiny:{family}", max_length=256)([sample[0]])
    reloaded = load_processor(str(tmp_path))
    assert type(reloaded) is type(built)
    assert type(reloaded.image_processor) is type(built.image_processor)
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
