"""Object-hallucination metrics for free-text answers: CHAIR_i / CHAIR_s (Rohrbach et al., 2018), recall
(AMBER's coverage), AMBER's hallucination rate, length and per-category counts. No model is loaded.

    from mdpo.eval.chair import (ObjectVocabulary, scene_vocabulary, scene_object_name, load_annotations,
        load_coco_annotations, load_annotation_source, score_answers, score_answers_file, format_table,
        format_category_table, plot_bars)

    vocab = ObjectVocabulary.coco()                     # the 80 COCO categories (data/coco_objects.json)
    vocab = ObjectVocabulary.from_dict({"red circle": ["red disc"], "blue square": []})   # any vocabulary
    vocab = ObjectVocabulary.from_file("objects.json")  # {category: [synonyms]} or the coco_objects.json schema
    vocab = scene_vocabulary()                          # the synthetic scenes: "red circle", ... (18 categories)
    ObjectVocabulary.coco().find_mentions("Two hot dogs and a dog.")
        # [Mention(text='hot dogs', category='hot dog', start=4, end=12, hallucinated=False), Mention('dog', 'dog', 19, 22)]

    ann = load_annotations("eval.json", vocab)          # JSON list / JSONL of {id, image?, question?, objects: [category]}
    ann = load_annotations("sample_data/eval.json", scene_vocabulary(), object_name=scene_object_name)
    ann = load_coco_annotations("instances_val2014.json", image_root="val2014")   # by image id; COCO vocabulary
    ann = load_coco_annotations(..., captions_path="captions_val2014.json")       # + caption objects, as CHAIR
    ann = load_annotation_source(path, vocab, image_root=None)                    # either source, by content

    report = score_answers([{"id": "1", "answer": "A dog on a couch.", "tokens": 7}], ann)   # vocabulary: ann's
    report = score_answers_file("answers.jsonl", ann)  # JSONL of {id or image_id, answer[, tokens]}, from anywhere
    report.metrics             # {"chair_i": .., "chair_s": .., "recall": .., ...}: see "Metrics" below
    report.per_answer[0]       # AnswerScore: .mentions [Mention(text, category, start, end, hallucinated)], ...
    report.per_answer[0].marked()   # "A dog on a [[couch]]." when the image has no couch
    report.answer_records()    # one dict per answer for answers.jsonl (mentions with spans + flags, marked text)
    report.top_hallucinated(5) # [(category, answers that hallucinate it), ...]; report.per_category: all counts
    report.to_dict()           # metrics + per-category counts, for metrics.json
    format_table({"base": r0, "mdpo": r1})            # markdown, recall and length beside CHAIR (reports or metrics dicts)
    format_category_table({"base": r0, "mdpo": r1})   # markdown, the most hallucinated objects per model
    plot_bars({"base": r0, "mdpo": r1}, "chair.png")  # PNG: CHAIR_i, CHAIR_s, recall per model (matplotlib Agg)

Errors: VocabularyError (a bad vocabulary) and HallucinationDataError (answers / annotations: the message
names the file, the record index and id, and the value at fault), both MdpoError.

Mention extraction (as CHAIR). The answer is split into words (runs of letters and digits, lower-cased;
punctuation, hyphens and apostrophes separate words, so "hot-dog" reads as "hot dog"). Left to right,
the longest phrase of the vocabulary's table that starts at a word wins and its words are consumed, so
phrases beat single words: "hot dog" is food and not a dog, "teddy bear" a toy and not a bear, "baseball
bat" the bat, "computer monitor" a tv and not a laptop, "train car" a train and not a car, "toilet seat"
a toilet and not a chair. Every synonym is matched in its singular and plural forms (the last word's
noun forms from lemminflect, whose dictionary ships in its wheel): "people", "knives", "mice",
"skis"/"ski", "hot dogs". Vocabulary rules (coco_objects.json shows each):
- `qualifiers`: "<qualifier> <synonym of C>" names C only, e.g. "baby elephant" is an elephant, not a
  person (baby) and an elephant; "passenger train" is a train.
- `not_objects`: phrases consumed without a mention ("train station", "bus stop", "ski slope", "jet ski",
  "flower bed", "home plate"), so their words do not fire.
- `modifiers`: a single-word mention dropped when the next word starts another mention ("an orange cat"
  is a cat; "an orange" is an orange).
- `drop_if_mentioned`: a word dropped when the answer also mentions one of the listed categories ("seat"
  beside a toilet or a car is part of it, not a chair; the CHAIR code's toilet-seat rule, extended).
Not handled by default (as in CHAIR): negation, "there is no dog" mentions a dog (`skip_negated=True`
drops mentions right after "no"/"not"/"without"/"n't" in the same clause: a heuristic, off by default),
and word sense outside these rules ("an orange shirt" mentions an orange; "mouse" is the computer mouse
COCO labels, whichever is meant).

Metrics (`report.metrics`). M_a: the categories answer a mentions; G_a: its ground-truth objects;
H_a = M_a - G_a. Over all answers:
- chair_i: hallucinated mentions / mentions. EVERY mention counts, a repeated object each time ("a dog ...
  the dog" is 2 mentions), as the original CHAIR code (Rohrbach et al.'s utils/chair.py) and AMBER's
  inference.py count; None when no answer mentions any object.
- chair_i_unique: sum |H_a| / sum |M_a|, each object once per answer (the variant some re-implementations
  report); None when nothing is mentioned.
- chair_s: answers with |H_a| >= 1 / answers.
- hal_rate: AMBER's "Hal" (Wang et al., 2023): 1 - (answers without a hallucinated object) / answers.
  With the same extractor this is the same number as chair_s; AMBER's differs only by its noun extractor.
  Kept under AMBER's name for AMBER-style tables.
- recall: sum |M_a ∩ G_a| / sum |G_a| (AMBER's "Cover", micro-averaged over ground-truth objects);
  None when no answer has ground-truth objects.
- objects_per_answer: mean |M_a|; mentions_per_answer: mean number of mentions.
- tokens_per_answer: mean answer length in tokens: the answer's `tokens` (or `n_tokens`) field when given
  (generate.py writes the generated token count), otherwise its whitespace-separated word count;
  `report.length_source` says which ("given", "whitespace" or "mixed").
- n_answers, n_mentions, n_hallucinated_mentions, n_objects_mentioned (sum |M_a|), n_hallucinated_objects
  (sum |H_a|), n_gt_objects (sum |G_a|), n_gt_covered (sum |M_a ∩ G_a|).
An empty answer set is an error (HallucinationDataError): every rate would be 0/0, and an empty file
is almost always a wrong path. Costs: O(words × longest phrase) dictionary look-ups per answer (a
thousand answers in well under a second); building the COCO vocabulary (~500 synonyms, ~2,600 phrases)
loads lemminflect's dictionaries, about 1-2 s once per process (cached).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..errors import MdpoError

DATA_DIR = Path(__file__).resolve().parent / "data"
COCO_OBJECTS_FILE = DATA_DIR / "coco_objects.json"
_WORD = re.compile(r"[^\W_]+")  # a word: a run of letters / digits (any script)
_VOCAB_KEYS = ("name", "description", "categories", "qualifiers", "not_objects", "modifiers", "drop_if_mentioned")


class VocabularyError(MdpoError, ValueError):
    """A vocabulary that cannot be used (a phrase naming two categories, a bad file); the message names it."""


class HallucinationDataError(MdpoError, ValueError):
    """Answers or annotations that cannot be scored; the message names the file, record id or value at fault."""


def _record_error(source: str | None, index: int, record_id: Any, reason: str) -> HallucinationDataError:
    where = f"{source}: " if source else ""
    ident = f" (id {record_id!r})" if record_id is not None else ""
    return HallucinationDataError(f"{where}record {index}{ident}: {reason}")


# ---------------------------------------------------------------------------------------------------
# Words and noun forms
def tokenize(text: str) -> list[tuple[str, int, int]]:
    """-> [(lower-cased word, start, end)] with character offsets into `text`."""
    return [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]


@functools.lru_cache(maxsize=None)
def noun_forms(word: str) -> frozenset[str]:
    """The word and its other noun number, from lemminflect's dictionary: "knife" -> {knife, knives},
    "skis" -> {skis, ski}, "mice" -> {mice, mouse}, "people" -> {people, person, persons, peoples}. A
    word the dictionary lacks gets the plural from lemminflect's rules ("tv" -> tvs)."""
    try:
        import lemminflect
    except ImportError as exc:  # a dependency of mdpo (setup.py); only a broken install lacks it
        raise MdpoError("mdpo.eval.chair needs lemminflect for plural/singular forms: pip install lemminflect") from exc
    forms = {word}
    lemmas = set(lemminflect.getAllLemmas(word, upos="NOUN").get("NOUN", ())) or {word}
    for lemma in lemmas:  # a plural in the dictionary has its singular as lemma; a singular, itself
        forms.add(lemma)
        plurals = lemminflect.getAllInflections(lemma, upos="NOUN").get("NNS", ())
        forms.update(plurals or lemminflect.getInflection(lemma, tag="NNS"))
    return frozenset(f.lower() for f in forms if f and _WORD.fullmatch(f))


def _phrase_forms(phrase: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Every form of a phrase with its last word inflected ("hot dog" -> hot dog, hot dogs)."""
    return {phrase[:-1] + (form,) for form in noun_forms(phrase[-1])}


def _words(phrase: str, what: str, vocab_name: str) -> tuple[str, ...]:
    if not isinstance(phrase, str):
        raise VocabularyError(f"vocabulary {vocab_name!r}: {what} {phrase!r} is not a string")
    words = tuple(w for w, _, _ in tokenize(phrase))
    if not words:
        raise VocabularyError(f"vocabulary {vocab_name!r}: {what} {phrase!r} has no words")
    return words


def _one_word(phrase: str, what: str, vocab_name: str) -> str:
    words = _words(phrase, what, vocab_name)
    if len(words) != 1:
        raise VocabularyError(f"vocabulary {vocab_name!r}: {what} {phrase!r} must be a single word")
    return words[0]


# ---------------------------------------------------------------------------------------------------
# Vocabulary
@dataclass(frozen=True)
class Mention:
    """One object mention in an answer: `text` is answer[start:end] (the words as written)."""

    text: str
    category: str
    start: int
    end: int
    hallucinated: bool = False


class ObjectVocabulary:
    """Object categories and the words and phrases that name them, compiled into one phrase table.

    `categories`: {category: [synonyms]}; the category's own name is always a synonym. Options (see the
    module docstring): `qualifiers` {word: [categories]}, `not_objects` [phrases], `modifiers` [words],
    `drop_if_mentioned` {word: [categories]}. A phrase (in any generated form) that would name two
    categories is a VocabularyError, unless one of them lists it as written: the written one wins.
    """

    def __init__(
        self,
        categories: Mapping[str, Sequence[str]],
        *,
        name: str = "custom",
        qualifiers: Mapping[str, Sequence[str]] | None = None,
        not_objects: Sequence[str] = (),
        modifiers: Sequence[str] = (),
        drop_if_mentioned: Mapping[str, Sequence[str]] | None = None,
    ):
        self.name = name
        if not isinstance(categories, Mapping) or not categories:
            raise VocabularyError(f"vocabulary {name!r}: categories must be a non-empty {{category: [synonyms]}} mapping")
        for option, value, kind in (("qualifiers", qualifiers, Mapping), ("not_objects", not_objects, Sequence),
                                    ("modifiers", modifiers, Sequence), ("drop_if_mentioned", drop_if_mentioned, Mapping)):
            if value is not None and (isinstance(value, str) or not isinstance(value, kind)):
                raise VocabularyError(f"vocabulary {name!r}: {option} must be a {'mapping' if kind is Mapping else 'list'}, got {value!r}")
        self.categories: tuple[str, ...] = tuple(categories)
        self._synonyms: dict[str, tuple[str, ...]] = {}
        # phrase (tuple of words) -> (category or None for a not-object, written as is?, where it came from)
        table: dict[tuple[str, ...], tuple[str | None, bool, str]] = {}

        def add(key, value, written, origin):
            old = table.get(key)
            if old is None or (written and not old[1]):
                table[key] = (value, written, origin)
            elif old[0] != value and old[1] == written:
                raise VocabularyError(
                    f"vocabulary {name!r}: {' '.join(key)!r} would name both {old[0] or 'no object'!r} ({old[2]}) "
                    f"and {value or 'no object'!r} ({origin}); remove it from one of them")
            elif old[0] == value and written:
                table[key] = (value, True, origin)

        for category, synonyms in categories.items():
            if not isinstance(category, str) or not category.strip():
                raise VocabularyError(f"vocabulary {name!r}: category {category!r} is not a non-empty string")
            if isinstance(synonyms, str) or not isinstance(synonyms, Sequence):
                raise VocabularyError(f"vocabulary {name!r}: the synonyms of {category!r} must be a list of strings")
            phrases = list(dict.fromkeys([category, *synonyms]))
            self._synonyms[category] = tuple(phrases)
            for phrase in phrases:
                words = _words(phrase, f"synonym of {category!r}", name)
                add(words, category, True, f"synonym of {category!r}")
                for form in _phrase_forms(words):
                    add(form, category, False, f"a form of {phrase!r}, synonym of {category!r}")
        for qualifier, targets in (qualifiers or {}).items():
            q_words = _words(qualifier, "qualifier", name)
            for category in targets:
                self._check_category(category, f"qualifier {qualifier!r}")
                for phrase in self._synonyms[category]:
                    for form in _phrase_forms(_words(phrase, "synonym", name)):
                        add(q_words + form, category, False, f"qualifier {qualifier!r} + {phrase!r}")
        for phrase in not_objects:
            words = _words(phrase, "not_objects phrase", name)
            add(words, None, True, f"not_objects {phrase!r}")
            for form in _phrase_forms(words):
                add(form, None, False, f"a form of not_objects {phrase!r}")
        self._modifiers = frozenset(_one_word(m, "modifier", name) for m in modifiers)
        self._drop: dict[str, frozenset[str]] = {}
        for word, triggers in (drop_if_mentioned or {}).items():
            for category in triggers:
                self._check_category(category, f"drop_if_mentioned {word!r}")
            for form in noun_forms(_one_word(word, "drop_if_mentioned word", name)):
                self._drop[form] = frozenset(triggers)
        self._table = {key: value for key, (value, _, _) in table.items()}
        self.max_phrase_words = max(len(key) for key in self._table)
        self.options = {"qualifiers": {k: list(v) for k, v in (qualifiers or {}).items()},
                        "not_objects": list(not_objects), "modifiers": list(modifiers),
                        "drop_if_mentioned": {k: list(v) for k, v in (drop_if_mentioned or {}).items()}}

    def _check_category(self, category, what):
        if category not in self._synonyms:
            raise VocabularyError(f"vocabulary {self.name!r}: {what} refers to unknown category {category!r}")

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "custom") -> "ObjectVocabulary":
        """{category: [synonyms]}, or the full schema {"categories": {...}, "qualifiers": ..., ...}."""
        if isinstance(data, Mapping) and isinstance(data.get("categories"), Mapping):
            unknown = sorted(set(data) - set(_VOCAB_KEYS))
            if unknown:
                raise VocabularyError(f"vocabulary {data.get('name', name)!r}: unknown keys {unknown}; expected {list(_VOCAB_KEYS)}")
            return cls(data["categories"], name=data.get("name", name), qualifiers=data.get("qualifiers"),
                       not_objects=data.get("not_objects", ()), modifiers=data.get("modifiers", ()),
                       drop_if_mentioned=data.get("drop_if_mentioned"))
        return cls(data, name=name)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ObjectVocabulary":
        """A JSON file holding what `from_dict` takes; the name defaults to the file's stem."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabularyError(f"vocabulary file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise VocabularyError(f"vocabulary file {path} is not valid JSON ({err})") from None
        return cls.from_dict(data, name=path.stem)

    @classmethod
    def coco(cls) -> "ObjectVocabulary":
        """The 80 COCO categories, from the shipped data/coco_objects.json (built once per process)."""
        return _coco_vocabulary()

    # -- use ---------------------------------------------------------------------------------------
    def __contains__(self, category: object) -> bool:
        return category in self._synonyms

    def __len__(self) -> int:
        return len(self.categories)

    def __repr__(self) -> str:
        return f"ObjectVocabulary({self.name!r}, {len(self.categories)} categories, {len(self._table)} phrases)"

    def synonyms(self, category: str) -> tuple[str, ...]:
        """The phrases written for a category (its name first), before inflection."""
        return self._synonyms[category]

    def lookup(self, phrase: str) -> str | None:
        """The category a whole phrase names ("Hot Dogs" -> "hot dog"), or None."""
        return self._table.get(tuple(w for w, _, _ in tokenize(phrase)))

    def find_mentions(self, text: str, *, skip_negated: bool = False) -> list[Mention]:
        """Every object mention in `text`, left to right (hallucinated=False: no ground truth here).

        skip_negated (off by default, as in CHAIR): leave out a mention with a negation word (NEGATION_WORDS:
        "no", "not", "without", "n't", ...) among the NEGATION_WINDOW words before it in the same clause
        (no . , ; : ! ? between): "there is no blue square" then mentions nothing. A heuristic: "not only
        a dog but a cat" loses the dog."""
        tokens = tokenize(text)
        words = [w for w, _, _ in tokens]
        found: list[tuple[str, int, int]] = []  # (category, first word, one past the last word)
        i, n = 0, len(words)
        while i < n:
            for length in range(min(self.max_phrase_words, n - i), 0, -1):
                key = tuple(words[i : i + length])
                if key in self._table:
                    if self._table[key] is not None:
                        found.append((self._table[key], i, i + length))
                    i += length
                    break
            else:
                i += 1
        kept = [m for j, m in enumerate(found)
                if not (m[2] - m[1] == 1 and words[m[1]] in self._modifiers
                        and j + 1 < len(found) and found[j + 1][1] == m[2])]
        present = {category for category, _, _ in kept}
        kept = [m for m in kept
                if not (m[2] - m[1] == 1 and words[m[1]] in self._drop and (self._drop[words[m[1]]] & (present - {m[0]})))]
        if skip_negated:
            kept = [m for m in kept if not _negated(text, tokens, m[1])]
        return [Mention(text[tokens[a][1] : tokens[b - 1][2]], category, tokens[a][1], tokens[b - 1][2])
                for category, a, b in kept]


NEGATION_WORDS = frozenset({"no", "not", "without", "nor", "neither", "never", "none", "t"})  # "t": isn't, aren't
NEGATION_WINDOW = 3  # words before a mention searched for a negation (skip_negated=True)
_CLAUSE_END = re.compile(r"[.,;:!?]")


def _negated(text: str, tokens: list[tuple[str, int, int]], first: int) -> bool:
    for j in range(max(0, first - NEGATION_WINDOW), first):
        if tokens[j][0] in NEGATION_WORDS and not _CLAUSE_END.search(text, tokens[j][2], tokens[first][1]):
            return True
    return False


@functools.lru_cache(maxsize=1)
def _coco_vocabulary() -> ObjectVocabulary:
    return ObjectVocabulary.from_file(COCO_OBJECTS_FILE)


def scene_vocabulary() -> ObjectVocabulary:
    """The synthetic scenes' vocabulary (`mdpo-data make-sample`): one category per colour + shape ("red
    circle", ...), so "a blue circle" beside a red one is a hallucination and "two circles" no mention.
    Their records keep objects as {shape, colour, ...} dicts: load them with object_name=scene_object_name."""
    from ..data.sample import COLOURS, SHAPES

    return ObjectVocabulary({f"{c} {s}": [] for c in COLOURS for s in SHAPES}, name="scenes")


def scene_object_name(obj: Mapping[str, Any]) -> str:
    """A synthetic scene object {shape, colour, ...} -> its scene_vocabulary category "colour shape"."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("colour"), str) or not isinstance(obj.get("shape"), str):
        raise ValueError(f"object {obj!r} has no 'colour' and 'shape' strings")
    return f"{obj['colour']} {obj['shape']}"


# ---------------------------------------------------------------------------------------------------
# Annotations
@dataclass(frozen=True)
class Annotation:
    """The ground truth of one answer's image: its object categories (and where the image is)."""

    id: str
    objects: frozenset[str]
    image: str | None = None
    question: str | None = None


class Annotations(Mapping):
    """{id (str): Annotation} plus the vocabulary the objects belong to and the source it was read from."""

    def __init__(self, items: Mapping[str, Annotation], vocabulary: ObjectVocabulary, source: str = "<memory>"):
        self._items = dict(items)
        self.vocabulary = vocabulary
        self.source = source

    def __getitem__(self, key) -> Annotation:
        return self._items[str(key)]

    def __contains__(self, key) -> bool:
        return str(key) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Annotations({len(self)} images, vocabulary {self.vocabulary.name!r}, from {self.source})"


def _default_object_name(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        for key in ("category", "name"):
            if isinstance(obj.get(key), str):
                return obj[key]
        raise ValueError(f"object {obj!r} is neither a category name nor a dict with a 'category' or 'name' string"
                         " (pass object_name= to map it)")
    return obj


def _iter_json_records(path: Path, refuse_coco: bool = False) -> Iterator[tuple[int, Any]]:
    """(index, record) of a JSON list or JSONL file; a bad JSONL line is an error naming its number."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):  # JSONL, or one JSON object (fails fast at JSONL's second line)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if refuse_coco and isinstance(data, dict) and "images" in data and "annotations" in data:
            raise HallucinationDataError(
                f"{path} is a COCO instances file, not {{id, objects}} records: load it with load_coco_annotations"
                " (mdpo-eval: --coco-annotations) or load_annotation_source")
        if isinstance(data, dict) and "\n" in text.strip():
            raise HallucinationDataError(f"{path} holds one JSON object over several lines; expected a JSON list of"
                                         " records or JSONL (one record a line)")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise HallucinationDataError(f"{path}: not valid JSON ({err})") from None
        yield from enumerate(data)
        return
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise HallucinationDataError(f"{path}: line {line_number} is not valid JSON ({err.msg} at column {err.colno})") from None
        yield index, record
        index += 1


def annotations_from_records(
    records: Iterable[Mapping[str, Any]],
    vocabulary: ObjectVocabulary | None = None,
    *,
    object_name: Callable[[Any], str] | None = None,
    source: str = "<memory>",
) -> Annotations:
    """Annotations from `{id, image?, question?, objects: [category, ...]}` dicts (see load_annotations)."""
    vocabulary = ObjectVocabulary.coco() if vocabulary is None else vocabulary
    name_of = object_name or _default_object_name
    items: dict[str, Annotation] = {}
    for index, record in enumerate(records):
        _add_record(items, index, record, vocabulary, name_of, source)
    return Annotations(items, vocabulary, source)


def _add_record(items, index, record, vocabulary, name_of, source):
    record_id = record.get("id", record.get("image_id")) if isinstance(record, Mapping) else None
    if not isinstance(record, Mapping):
        raise _record_error(source, index, None, f"not a JSON object but {type(record).__name__}")
    if record_id is None:
        raise _record_error(source, index, None, "missing 'id'")
    key = str(record_id)
    if key in items:
        raise _record_error(source, index, record_id, "duplicate id")
    objects = record.get("objects")
    if not isinstance(objects, (list, tuple)):
        raise _record_error(source, index, record_id, f"'objects' must be a list of category names, got {objects!r}")
    names = set()
    for obj in objects:
        try:
            category = name_of(obj)
        except (ValueError, KeyError, TypeError) as exc:
            raise _record_error(source, index, record_id, str(exc)) from None
        if not isinstance(category, str) or category not in vocabulary:
            raise _record_error(source, index, record_id,
                                f"unknown object category {category!r} (not in vocabulary {vocabulary.name!r})")
        names.add(category)
    image, question = record.get("image"), record.get("question")
    items[key] = Annotation(key, frozenset(names), image if isinstance(image, str) else None,
                            question if isinstance(question, str) else None)


def load_annotations(
    path: str | os.PathLike,
    vocabulary: ObjectVocabulary | None = None,
    *,
    object_name: Callable[[Any], str] | None = None,
) -> Annotations:
    """A JSON list or JSONL of `{id, image, question, objects: [category, ...]}` (source (a)).

    Every object must be a category of `vocabulary` (default: COCO); an unknown one, a missing id or
    objects list, or a duplicate id is a HallucinationDataError naming the record and its id. Objects may
    also be dicts with a "category" or "name" key, or anything `object_name(obj) -> category` maps.
    """
    path = Path(path)
    if not path.is_file():
        raise HallucinationDataError(f"annotations file not found: {path}")
    vocabulary = ObjectVocabulary.coco() if vocabulary is None else vocabulary
    name_of = object_name or _default_object_name
    items: dict[str, Annotation] = {}
    for index, record in _iter_json_records(path, refuse_coco=True):
        _add_record(items, index, record, vocabulary, name_of, str(path))
    return Annotations(items, vocabulary, str(path))


def coco_annotations_from_dict(
    data: Mapping[str, Any],
    vocabulary: ObjectVocabulary | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    source: str = "<memory>",
) -> Annotations:
    """Annotations from a parsed COCO instances file: {"images", "annotations", "categories"}.

    Keyed by image id (as a string); objects = the categories of the image's instances (an image with no
    instance has none); image = image_root/file_name. A category missing from `vocabulary` (default
    COCO), an instance of an unknown image or category id is a HallucinationDataError naming it.
    """
    vocabulary = ObjectVocabulary.coco() if vocabulary is None else vocabulary
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise HallucinationDataError(f"{source}: not a COCO instances file (no '{key}' list)")
    names: dict[Any, str] = {}
    for cat in data["categories"]:
        if cat.get("name") not in vocabulary:
            raise HallucinationDataError(
                f"{source}: COCO category {cat.get('name')!r} (id {cat.get('id')}) is not in vocabulary {vocabulary.name!r}")
        names[cat["id"]] = cat["name"]
    objects: dict[Any, set[str]] = {}
    files: dict[Any, str] = {}
    for image in data["images"]:
        if "id" not in image or not isinstance(image.get("file_name"), str):
            raise HallucinationDataError(f"{source}: image entry {image!r} has no 'id' or 'file_name'")
        objects[image["id"]] = set()
        files[image["id"]] = str(Path(image_root) / image["file_name"]) if image_root is not None else image["file_name"]
    for index, inst in enumerate(data["annotations"]):
        if inst.get("image_id") not in objects:
            raise HallucinationDataError(f"{source}: annotation {index} refers to image id {inst.get('image_id')!r}, not in 'images'")
        if inst.get("category_id") not in names:
            raise HallucinationDataError(f"{source}: annotation {index} has unknown category id {inst.get('category_id')!r}")
        objects[inst["image_id"]].add(names[inst["category_id"]])
    items = {str(i): Annotation(str(i), frozenset(objs), files[i]) for i, objs in objects.items()}
    return Annotations(items, vocabulary, source)


def _read_json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        raise HallucinationDataError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HallucinationDataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise HallucinationDataError(f"{path}: not a {what} file (a JSON object with an 'annotations' list)")
    return data


def load_coco_annotations(
    instances_path: str | os.PathLike,
    vocabulary: ObjectVocabulary | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    captions_path: str | os.PathLike | None = None,
) -> Annotations:
    """COCO instances annotations (e.g. instances_val2014.json) + an image folder (source (b)); see
    `coco_annotations_from_dict`. The whole file is parsed once (val2014: ~160 MB, a few seconds).

    `captions_path` (e.g. captions_val2014.json) adds to each image the objects its reference captions
    mention, as the original CHAIR code does (instances ∪ caption objects); captions of images that are
    not in the instances file are ignored, and a captions file that matches none of them is an error."""
    path = Path(instances_path)
    data = _read_json_object(path, "COCO instances")
    ann = coco_annotations_from_dict(data, vocabulary, image_root=image_root, source=str(path))
    if captions_path is None:
        return ann
    captions = _read_json_object(Path(captions_path), "COCO captions")
    extra: dict[str, set[str]] = {key: set() for key in ann}
    matched = 0
    for index, cap in enumerate(captions["annotations"]):
        key = str(cap.get("image_id"))
        if key in extra:
            if not isinstance(cap.get("caption"), str):
                raise HallucinationDataError(f"{captions_path}: annotation {index} has no 'caption' string")
            extra[key].update(m.category for m in ann.vocabulary.find_mentions(cap["caption"]))
            matched += 1
    if not matched and len(ann):
        raise HallucinationDataError(f"{captions_path}: no caption belongs to an image of {path} (another split?)")
    items = {key: Annotation(key, a.objects | extra[key], a.image, a.question) for key, a in ann.items()}
    return Annotations(items, ann.vocabulary, f"{path} + {captions_path}")


def load_annotation_source(
    path: str | os.PathLike,
    vocabulary: ObjectVocabulary | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    object_name: Callable[[Any], str] | None = None,
) -> Annotations:
    """Either source, told apart by content: a JSON object with an "images" list is COCO instances
    (vocabulary default COCO), anything else is records (`load_annotations`)."""
    path = Path(path)
    if not path.is_file():
        raise HallucinationDataError(f"annotations file not found: {path}")
    if path.suffix.lower() != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # JSONL: several objects, one a line
                data = None
            if isinstance(data, dict) and "images" in data:
                return coco_annotations_from_dict(data, vocabulary, image_root=image_root, source=str(path))
    return load_annotations(path, vocabulary, object_name=object_name)


# ---------------------------------------------------------------------------------------------------
# Scoring
@dataclass
class AnswerScore:
    """One answer scored against its image's objects. Sets are category names."""

    id: str
    answer: str
    mentions: list[Mention]
    ground_truth: frozenset[str]
    n_tokens: int
    image: str | None = None
    question: str | None = None

    @property
    def mentioned(self) -> frozenset[str]:
        return frozenset(m.category for m in self.mentions)

    @property
    def hallucinated(self) -> frozenset[str]:
        return self.mentioned - self.ground_truth

    @property
    def covered(self) -> frozenset[str]:
        return self.mentioned & self.ground_truth

    @property
    def chair_i(self) -> float | None:
        """Hallucinated mentions / mentions in this answer; None without mentions."""
        return sum(m.hallucinated for m in self.mentions) / len(self.mentions) if self.mentions else None

    def marked(self, open: str = "[[", close: str = "]]") -> str:
        """The answer with every hallucinated mention wrapped: "a [[cat]] on a couch"."""
        out, last = [], 0
        for m in self.mentions:
            if m.hallucinated:
                out += [self.answer[last : m.start], open, self.answer[m.start : m.end], close]
                last = m.end
        return "".join(out) + self.answer[last:]

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for answers.jsonl."""
        return {
            "id": self.id, "image": self.image, "question": self.question, "answer": self.answer,
            "marked_answer": self.marked(), "tokens": self.n_tokens,
            "mentions": [asdict(m) for m in self.mentions],
            "hallucinated": sorted(self.hallucinated), "covered": sorted(self.covered),
            "ground_truth": sorted(self.ground_truth), "chair_i": self.chair_i,
        }


@dataclass
class CategoryCounts:
    """How one category fared over an answer set."""

    mentions: int = 0               # mentions of it (repeats counted)
    hallucinated_mentions: int = 0  # ... of which in answers whose image does not have it
    answers_mentioning: int = 0     # answers that mention it at least once
    answers_hallucinating: int = 0  # ... whose image does not have it
    in_ground_truth: int = 0        # answers whose image has it
    covered: int = 0                # ... and that mention it


@dataclass
class HallucinationReport:
    """The result of `score_answers`: `metrics` (see the module docstring), `per_answer`, `per_category`."""

    metrics: dict[str, float | int | None]
    per_answer: list[AnswerScore]
    per_category: dict[str, CategoryCounts]
    vocabulary: str
    length_source: str  # "given" (the answers' token counts), "whitespace" (word counts) or "mixed"

    def top_hallucinated(self, k: int | None = 10) -> list[tuple[str, int]]:
        """[(category, answers that hallucinate it)], most first (ties: more mentions, then by name)."""
        rows = [(name, c) for name, c in self.per_category.items() if c.answers_hallucinating]
        rows.sort(key=lambda r: (-r[1].answers_hallucinating, -r[1].hallucinated_mentions, r[0]))
        return [(name, c.answers_hallucinating) for name, c in rows[:k]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics, length source, vocabulary, top hallucinated and every category's counts."""
        return {
            "metrics": dict(self.metrics), "length_source": self.length_source, "vocabulary": self.vocabulary,
            "top_hallucinated": [list(row) for row in self.top_hallucinated(None)],
            "per_category": {name: asdict(c) for name, c in self.per_category.items()
                             if c.mentions or c.in_ground_truth},
        }

    def answer_records(self) -> list[dict[str, Any]]:
        return [a.to_record() for a in self.per_answer]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _answer_fields(index, raw, source, id_key, answer_key):
    if not isinstance(raw, Mapping):
        raise _record_error(source, index, None, f"not a JSON object but {type(raw).__name__}")
    keys = (id_key,) if id_key else ("id", "image_id")
    record_id = next((raw[k] for k in keys if raw.get(k) is not None), None)
    if record_id is None:
        raise _record_error(source, index, None, f"no {' or '.join(map(repr, keys))} (keys: {sorted(raw)})")
    text = raw.get(answer_key)
    if not isinstance(text, str):
        raise _record_error(source, index, record_id, f"{answer_key!r} must be a string, got {text!r}")
    n_tokens = next((raw[k] for k in ("tokens", "n_tokens") if raw.get(k) is not None), None)
    if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0):
        raise _record_error(source, index, record_id, f"token count must be a non-negative integer, got {n_tokens!r}")
    return str(record_id), text, n_tokens


def score_answers(
    answers: Iterable[Mapping[str, Any]],
    annotations: Annotations | Mapping[str, Annotation],
    vocabulary: ObjectVocabulary | None = None,
    *,
    id_key: str | None = None,
    answer_key: str = "answer",
    source: str | None = None,
    skip_negated: bool = False,
) -> HallucinationReport:
    """Score answers `{id or image_id, answer[, tokens]}` against their images' objects.

    `vocabulary` defaults to the annotations' own. An answer whose id has no annotation, a missing id or
    answer, or an empty answer set is a HallucinationDataError naming it (and `source`, the file).
    Several answers may share an id (e.g. several prompts per image); each is scored on its own.
    skip_negated: see `ObjectVocabulary.find_mentions` (off: CHAIR counts "no dog" as a dog mention).
    """
    if vocabulary is None:
        vocabulary = getattr(annotations, "vocabulary", None)
        vocabulary = ObjectVocabulary.coco() if vocabulary is None else vocabulary
    ann_source = getattr(annotations, "source", "the annotations")
    per_answer: list[AnswerScore] = []
    per_category = {name: CategoryCounts() for name in vocabulary.categories}
    given = whitespace = 0
    for index, raw in enumerate(answers):
        key, text, n_tokens = _answer_fields(index, raw, source, id_key, answer_key)
        if key not in annotations:
            raise _record_error(source, index, key, f"no annotation for id {key!r} in {ann_source}")
        truth = annotations[key]
        if n_tokens is None:
            n_tokens, whitespace = len(text.split()), whitespace + 1
        else:
            given += 1
        mentions = [Mention(m.text, m.category, m.start, m.end, m.category not in truth.objects)
                    for m in vocabulary.find_mentions(text, skip_negated=skip_negated)]
        scored = AnswerScore(key, text, mentions, truth.objects, n_tokens, truth.image, truth.question)
        per_answer.append(scored)
        for m in mentions:
            per_category[m.category].mentions += 1
            per_category[m.category].hallucinated_mentions += m.hallucinated
        for name in scored.mentioned:
            per_category[name].answers_mentioning += 1
            per_category[name].answers_hallucinating += name not in truth.objects
        for name in truth.objects:
            counts = per_category.setdefault(name, CategoryCounts())
            counts.in_ground_truth += 1
            counts.covered += name in scored.mentioned
    n = len(per_answer)
    if n == 0:
        raise HallucinationDataError(f"{source or 'score_answers'}: no answers to score (an empty answer set has no CHAIR)")
    n_mentions = sum(len(a.mentions) for a in per_answer)
    n_hal_mentions = sum(m.hallucinated for a in per_answer for m in a.mentions)
    n_objects = sum(len(a.mentioned) for a in per_answer)
    n_hal_objects = sum(len(a.hallucinated) for a in per_answer)
    n_gt = sum(len(a.ground_truth) for a in per_answer)
    n_covered = sum(len(a.covered) for a in per_answer)
    n_hal_answers = sum(bool(a.hallucinated) for a in per_answer)
    metrics = {
        "chair_i": _ratio(n_hal_mentions, n_mentions),
        "chair_i_unique": _ratio(n_hal_objects, n_objects),
        "chair_s": n_hal_answers / n,
        "hal_rate": n_hal_answers / n,  # AMBER's 1 - (answers without one) / answers, the same number
        "recall": _ratio(n_covered, n_gt),
        "objects_per_answer": n_objects / n,
        "mentions_per_answer": n_mentions / n,
        "tokens_per_answer": sum(a.n_tokens for a in per_answer) / n,
        "n_answers": n,
        "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_hal_mentions,
        "n_objects_mentioned": n_objects,
        "n_hallucinated_objects": n_hal_objects,
        "n_gt_objects": n_gt,
        "n_gt_covered": n_covered,
    }
    length_source = "given" if not whitespace else "whitespace" if not given else "mixed"
    return HallucinationReport(metrics, per_answer, per_category, vocabulary.name, length_source)


def read_answers(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of an answers file (JSONL, or a JSON list), for `score_answers`."""
    path = Path(path)
    if not path.is_file():
        raise HallucinationDataError(f"answers file not found: {path}")
    return [record for _, record in _iter_json_records(path)]


def score_answers_file(
    answers_path: str | os.PathLike,
    annotations: Annotations | str | os.PathLike,
    vocabulary: ObjectVocabulary | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    id_key: str | None = None,
    answer_key: str = "answer",
    skip_negated: bool = False,
) -> HallucinationReport:
    """Score a JSONL of `{id or image_id, answer[, tokens]}` written elsewhere (lmms-eval, another
    trainer, generate.py) with no model loaded. `annotations` is loaded Annotations or a path to either
    source (`load_annotation_source`, with `image_root` for COCO). Errors name the answers file."""
    if not isinstance(annotations, Mapping):
        annotations = load_annotation_source(annotations, vocabulary, image_root=image_root)
    return score_answers(read_answers(answers_path), annotations, vocabulary, id_key=id_key,
                         answer_key=answer_key, source=str(answers_path), skip_negated=skip_negated)


# ---------------------------------------------------------------------------------------------------
# Reporting
TABLE_COLUMNS = (  # (metric, header, as a percentage?)
    ("chair_s", "CHAIR_s ↓", True), ("chair_i", "CHAIR_i ↓", True), ("recall", "recall ↑", True),
    ("tokens_per_answer", "tokens/answer", False), ("objects_per_answer", "objects/answer", False),
    ("n_answers", "answers", False),
)
BAR_METRICS = (("chair_i", "CHAIR_i ↓"), ("chair_s", "CHAIR_s ↓"), ("recall", "recall ↑"))


def _metrics_of(report: HallucinationReport | Mapping[str, Any]) -> Mapping[str, Any]:
    """A report's metrics; also takes a metrics dict, or to_dict()'s output (e.g. read back from metrics.json)."""
    if isinstance(report, HallucinationReport):
        return report.metrics
    if isinstance(report, Mapping):
        return report["metrics"] if isinstance(report.get("metrics"), Mapping) else report
    raise TypeError(f"expected a HallucinationReport or a metrics dict, got {type(report).__name__}")


def _cell(value, percent: bool) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def format_table(reports: Mapping[str, HallucinationReport | Mapping[str, Any]]) -> str:
    """A markdown table, one row per model (in the mapping's order): CHAIR_s, CHAIR_i and recall in %,
    tokens and objects per answer, the number of answers. Recall and length always sit beside CHAIR: a
    model can lower CHAIR by saying less. Undefined values read "n/a". Reports or metrics dicts."""
    if not reports:
        raise HallucinationDataError("format_table: no reports")
    header = "| model | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|"
    rows = [f"| {name} | " + " | ".join(_cell(_metrics_of(r).get(k), pct) for k, _, pct in TABLE_COLUMNS) + " |"
            for name, r in reports.items()]
    return "\n".join([header, rule, *rows]) + "\n"


def format_category_table(reports: Mapping[str, HallucinationReport], k: int = 10) -> str:
    """A markdown table of the categories hallucinated most: answers that hallucinate each, per model;
    the rows are the union of every model's top k, ordered by their total."""
    if not reports:
        raise HallucinationDataError("format_category_table: no reports")
    names = list(reports)
    top = {name for r in reports.values() for name, _ in r.top_hallucinated(k)}
    counts = {c: [reports[m].per_category.get(c, CategoryCounts()).answers_hallucinating for m in names] for c in top}
    order = sorted(top, key=lambda c: (-sum(counts[c]), c))
    header = "| hallucinated object | " + " | ".join(names) + " |"
    rule = "|---|" + "|".join("---:" for _ in names) + "|"
    rows = [f"| {c} | " + " | ".join(str(v) for v in counts[c]) + " |" for c in order]
    if not rows:
        rows = ["| (none) | " + " | ".join("0" for _ in names) + " |"]
    return "\n".join([header, rule, *rows]) + "\n"


def plot_bars(reports: Mapping[str, HallucinationReport | Mapping[str, Any]], path: str | os.PathLike,
              *, title: str = "Object hallucination") -> Path:
    """A PNG bar chart of CHAIR_i, CHAIR_s and recall (%), one bar per model in each group; returns the
    path. Uses matplotlib's Agg canvas directly (no global backend switch, no display needed). An
    undefined value is drawn as a 0 bar labelled "n/a". Reports or metrics dicts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not reports:
        raise HallucinationDataError("plot_bars: no reports")
    names = list(reports)
    fig = Figure(figsize=(max(5.0, 1.5 + 0.45 * len(names) * len(BAR_METRICS)), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [_metrics_of(reports[name]).get(key) for key, _ in BAR_METRICS]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(BAR_METRICS))]
        bars = ax.bar(xs, [100 * v if v is not None else 0.0 for v in values], width, label=name)
        for bar, value in zip(bars, values):
            ax.annotate("n/a" if value is None else f"{100 * value:.1f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(BAR_METRICS)))
    ax.set_xticklabels([label for _, label in BAR_METRICS])
    ax.set_ylabel("%")
    ax.set_ylim(0, 120)
    ax.legend(fontsize=8, frameon=False, loc="upper center", ncol=min(len(names), 4))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
