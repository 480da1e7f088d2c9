"""What decides the tokens and pixels of a dataset's rows besides the records themselves: the processor
(`processor_fingerprint`) and the data settings that shape a row (`DATA_KEYS_OF_ROWS`).

The reference cache's fingerprint (`mdpo.reference_pass.run_fingerprint`) and the validation cache
(`mdpo.data.validation`: which records fit in data.max_length) are both keyed by them, so a changed chat
template, image processor or max_length invalidates both. Kept here, under mdpo.data, so the data
layer reads them without importing the trainer.
"""
from __future__ import annotations

import hashlib
import json


def canonical(fingerprint: dict) -> dict:
    """JSON round trip, so tuples and lists compare equal after a save/load."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


# DataConfig keys that change the tokens or pixels of a row (read with getattr: older configs lack some).
DATA_KEYS_OF_ROWS = ("max_length", "prompt_template", "max_pixels", "min_pixels", "truncate_response", "system_prompt")


def short_digest(value) -> str:
    """sha256 (first 16 hex digits) of a value's canonical JSON: one short, comparable string per field."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def processor_fingerprint(processor) -> dict:
    """What decides a processor's tokens and pixels, one readable field each (digests for long values).

    tokenizer.vocab: size and digest of the (token, id) table and added tokens; tokenizer.backend: digest
    of the fast tokenizer's whole definition (merges, normalizer, pre-tokenizer, post-processor);
    tokenizer.special_tokens: the special-token map and ids; processor.chat_template /
    tokenizer.chat_template: digests of the templates; image_processor: digest of its canonical
    settings (`to_dict()`: size, mean, std, patch and merge sizes, pixel limits ...); processor.settings:
    the processor's own other settings (image token, patch size ...). Costs one pass over the vocabulary.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    fields = {
        "processor.class": type(processor).__name__,
        "tokenizer.class": type(tokenizer).__name__,
        "tokenizer.vocab": f"{len(tokenizer)} tokens, {short_digest([vocab, sorted(added.items())])}",
        "tokenizer.special_tokens": {"map": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                                     "ids": sorted(int(i) for i in tokenizer.all_special_ids)},
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        fields["tokenizer.backend"] = short_digest(backend.to_str())
    for owner, name in ((processor, "processor.chat_template"), (tokenizer, "tokenizer.chat_template")):
        template = getattr(owner, "chat_template", None)
        fields[name] = None if template is None else short_digest(template)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        fields["image_processor"] = f"{type(image_processor).__name__}, {short_digest(canonical(image_processor.to_dict()))}"
    if processor is not tokenizer and hasattr(processor, "to_dict"):
        own = {k: v for k, v in processor.to_dict().items()
               if k not in ("image_processor", "video_processor", "tokenizer", "chat_template", "audio_tokenizer")}
        fields["processor.settings"] = short_digest(canonical(own))
    return fields
