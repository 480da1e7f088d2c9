"""AMBER (Wang et al., 2023, arXiv 2311.07397): generative (CHAIR, Cover, Hal, Cog) and discriminative
(accuracy, precision, recall, F1 on existence, attribute and relation questions) hallucination scores,
computed as AMBER's own `inference.py` computes them. No model is loaded here; `mdpo.eval.suite` generates
answers and writes the outputs (`mdpo-eval amber`).

    data = load_amber("AMBER", task="all")          # AMBER's data/ folder as released (query, annotations, ...)
    report = score_amber(data, {"1": "A man on a beach.", "1005": "Yes", ...})
    report.generative      # {"chair", "cover", "hal", "cog", counts..., "printed": {...}}
    report.discriminative  # {"discriminative": {...}, "existence": {...}, "attribute": {...}, "state": ..., "relation": ...}

Files read from the folder the user downloaded (github.com/junyangwang0410/AMBER): data/query/query_<task>.json
([{"id", "image", "query"}]), data/annotations.json (entry id-1 is question id: {"type", "truth", "hallu"}),
data/relation.json (the association lists: {object: [words that count as it]}), data/safe_words.txt.
Responses are AMBER's format, [{"id", "response"}].

Discriminative (inference.py's "d"): "yes" / "no" truths; a response counts only when it is exactly
"Yes" or "No". Free-form answers are normalised to "Yes"/"No" first by the POPE rule
(`pope.parse_yes_no`), and the number that needed it is reported. Precision and recall are those of
the "no" answers, as the script computes them: precision = (truth no and answered "No") / answered
"No"; recall = the same / truth no; accuracy = correct / all. Dimensions by annotation type:
existence = discriminative-hallucination; attribute = the -state, -number and -action types (each also
reported); relation = every other type (discriminative-relation and relation).

Generative (inference.py's "g"), per description: its nouns (lemmatised), kept when they are an
association key or word (relation.json); the image's truth objects cover their own name and their
association words, likewise its "hallu" objects. A kept noun that is a safe word (safe_words.txt)
counts as a noun but never as hallucinated; one that names (or, with vectors, is similar to) a truth
object covers it and is not hallucinated; one that names or is similar to a hallu object covers that
("Cog") and, unless similar to a truth object, is hallucinated like any other kept noun. The first
matching entry is the one covered: a noun covers one truth entry, the first in [association words of
truth[0], of truth[1], ..., truth itself] (so a repeated truth object's second entry is never covered,
as in the script). CHAIR = hallucinated nouns / kept nouns; Cover = covered truth entries / truth
entries; Hal = descriptions with a hallucinated noun / descriptions; Cog = covered hallu entries / hallu
entries.

Two ways to find nouns and synonyms, chosen by what imports:
- AMBER's own: NLTK's word_tokenize + pos_tag (tags starting NN) + WordNetLemmatizer, and spaCy's
  en_core_web_lg vectors (a noun is "similar" to a word when their similarity > 0.8). Needs the NLTK
  data (punkt, averaged_perceptron_tagger, wordnet) and the spaCy model, which come from model hubs.
- ours, when they are missing: words as runs of letters/digits (hyphens kept, "e-book"), a word is a
  noun when lemminflect's dictionary has a noun reading for it (or it is a word the dictionary lacks),
  its lemma the shortest of its noun lemmas (WordNet's rule: "leaves" -> "leaf"); "similar" is "equal".
  Case is kept, as WordNet's lemmatiser keeps it: "Dogs" at a sentence start is not "dog", in the
  script too. The figures are then labelled "without vector synonyms" (README says how far they can
  differ): a noun that only a vector links to an object (e.g. "puppy" to "dog" if no association lists
  it) is hallucinated here and not there, and a verb whose form is also a noun ("people watch") is a
  noun here, not under NLTK's tagger.

Numbers: `metrics` hold plain fractions (None for an empty denominator); `printed` holds what
inference.py prints, to its quirks: every count starts at 0.001 (metrics.txt), so a ratio is
score / (n + 0.001); percentages rounded to 0.1; F1 computed from the rounded precision and recall with
+0.0001 (+0.001 for existence) in the denominator; an empty group prints 0.0.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .chair import HallucinationDataError
from .pope import parse_yes_no

AMBER_TASKS = {  # --task -> the query file; inference.py's evaluation_type a / g / d / de / da / dr
    "all": "query_all.json", "generative": "query_generative.json", "discriminative": "query_discriminative.json",
    "existence": "query_discriminative-existence.json", "attribute": "query_discriminative-attribute.json",
    "relation": "query_discriminative-relation.json",
}
ATTRIBUTE_TYPES = {"discriminative-attribute-state": "state", "discriminative-attribute-number": "number",
                   "discriminative-attribute-action": "action"}
EXISTENCE_TYPE = "discriminative-hallucination"
SIMILARITY = 0.8  # inference.py's --similarity_score
WITHOUT_VECTORS = "without vector synonyms"
_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*")
_SCRIPT_START = 0.001  # metrics.txt: every *_num starts here


class AmberDataError(HallucinationDataError):
    """AMBER files that cannot be used; the message names the file and the entry."""


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class AmberQuery:
    id: int
    image: str
    query: str
    type: str  # the annotation's type: generative, discriminative-...

    @property
    def generative(self) -> bool:
        return self.type == "generative"


@dataclass
class AmberData:
    root: Path
    task: str
    queries: list[AmberQuery]
    annotations: list[dict[str, Any]]  # entry i is question id i + 1
    association: dict[str, list[str]]
    safe_words: list[str]
    hallucination_words: frozenset[str]  # every association key and word


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise AmberDataError(f"AMBER {what} not found: {path} (give --amber-dir the folder holding AMBER's data/)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AmberDataError(f"{path}: not valid JSON ({err})") from None


def load_amber(amber_dir: str | os.PathLike, task: str = "all") -> AmberData:
    """AMBER's released files under `amber_dir` (the repository folder, or its data/ folder), with the
    queries of `task` (AMBER_TASKS). Checked: every query id has its annotation, and every truth / hallu
    object of a generative annotation has an association list (inference.py would stop on a KeyError)."""
    if task not in AMBER_TASKS:
        raise AmberDataError(f"AMBER task {task!r} must be one of {', '.join(AMBER_TASKS)}")
    root = Path(amber_dir)
    data = root / "data" if (root / "data").is_dir() else root
    annotations = _load_json(data / "annotations.json", "annotations")
    association = _load_json(data / "relation.json", "association lists (relation.json)")
    queries_raw = _load_json(data / "query" / AMBER_TASKS[task], f"queries of task {task!r}")
    safe_path = data / "safe_words.txt"
    if not safe_path.is_file():
        raise AmberDataError(f"AMBER safe words not found: {safe_path}")
    safe_words = [line.split("\n")[0] for line in safe_path.read_text(encoding="utf-8").splitlines()]
    if not isinstance(annotations, list) or not isinstance(association, dict) or not isinstance(queries_raw, list):
        raise AmberDataError(f"{data}: annotations.json and query files must be JSON lists, relation.json an object")
    for i, entry in enumerate(annotations):
        if not isinstance(entry, dict) or entry.get("id") != i + 1 or not isinstance(entry.get("type"), str):
            raise AmberDataError(f"{data / 'annotations.json'}: entry {i} must be {{'id': {i + 1}, 'type', 'truth', ...}}"
                                 " (inference.py reads question id N at position N-1)")
        if entry["type"] == "generative":
            for key in ("truth", "hallu"):
                words = entry.get(key)
                if not isinstance(words, list) or any(not isinstance(w, str) for w in words):
                    raise AmberDataError(f"{data / 'annotations.json'}: id {i + 1}: {key!r} must be a list of words")
                missing = [w for w in words if w not in association]
                if missing:
                    raise AmberDataError(f"{data / 'annotations.json'}: id {i + 1}: {key} object {missing[0]!r} has no "
                                         f"association list in {data / 'relation.json'}")
        elif entry.get("truth") not in ("yes", "no"):
            raise AmberDataError(f"{data / 'annotations.json'}: id {i + 1}: truth must be \"yes\" or \"no\", got {entry.get('truth')!r}")
    queries, seen = [], set()
    for index, raw in enumerate(queries_raw):
        qid = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(qid, bool) or not isinstance(qid, int) or not 1 <= qid <= len(annotations):
            raise AmberDataError(f"{data / 'query' / AMBER_TASKS[task]}: entry {index}: id {qid!r} has no annotation")
        if qid in seen:
            raise AmberDataError(f"{data / 'query' / AMBER_TASKS[task]}: entry {index}: id {qid} repeated")
        if not isinstance(raw.get("image"), str) or not isinstance(raw.get("query"), str):
            raise AmberDataError(f"{data / 'query' / AMBER_TASKS[task]}: entry {index} (id {qid}): needs 'image' and 'query' strings")
        seen.add(qid)
        queries.append(AmberQuery(qid, raw["image"], raw["query"], annotations[qid - 1]["type"]))
    words = set(association)
    for key, values in association.items():
        if not isinstance(values, list):
            raise AmberDataError(f"{data / 'relation.json'}: {key!r} must map to a list of words")
        words.update(values)
    return AmberData(data, task, queries, annotations, association, safe_words, frozenset(words))


# ----------------------------------------------------------------------------- nouns, synonyms
@dataclass(frozen=True)
class TextTools:
    """How nouns are found and compared: AMBER's (NLTK + spaCy vectors) or ours (module docstring)."""

    nouns: Callable[[str], list[str]]
    similar: Callable[[str, str], bool]
    nouns_by: str
    synonyms_by: str

    @property
    def label(self) -> str:
        """"" with AMBER's vectors, else WITHOUT_VECTORS (shown beside every generative figure)."""
        return "" if self.synonyms_by.startswith("spaCy") else WITHOUT_VECTORS


def _nltk_nouns() -> Callable[[str], list[str]] | None:
    """inference.py's extract_nouns, when NLTK and its data load; else None."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer

        lemmatizer = WordNetLemmatizer()

        def nouns(text: str) -> list[str]:
            tagged = nltk.pos_tag(nltk.word_tokenize(text))
            return [lemmatizer.lemmatize(word) for word, pos in tagged if pos.startswith("NN")]

        nouns("A dog sits.")  # raises LookupError without the data
        return nouns
    except Exception:  # noqa: BLE001 — ImportError, LookupError: fall back to ours
        return None


def _spacy_similar(threshold: float) -> Callable[[str, str], bool] | None:
    """inference.py's check_synonyms_word (en_core_web_lg vectors), docs cached; None when it does not load."""
    try:
        import spacy

        nlp = spacy.load("en_core_web_lg")
    except Exception:  # noqa: BLE001 — no spaCy, or no model
        return None
    doc = functools.lru_cache(maxsize=None)(nlp)

    def similar(a: str, b: str) -> bool:
        import warnings

        with warnings.catch_warnings():  # "empty vector" warnings, as inference.py silences them
            warnings.simplefilter("ignore", UserWarning)
            return doc(a).similarity(doc(b)) > threshold
    return similar


@functools.lru_cache(maxsize=None)
def _noun_lemma(word: str) -> str | None:
    """Our noun lemma of a word, or None when it is not a noun (module docstring)."""
    import lemminflect

    lemmas = lemminflect.getAllLemmas(word, upos="NOUN").get("NOUN")
    if not lemmas:
        if lemminflect.getAllLemmas(word):  # the dictionary knows it, as another part of speech only
            return None
        lemmas = lemminflect.getAllLemmasOOV(word, upos="NOUN").get("NOUN") or (word,)
    return min(lemmas, key=len)


def lemminflect_nouns(text: str) -> list[str]:
    """Our nouns of a text, lemmatised, in order (module docstring)."""
    return [lemma for lemma in (_noun_lemma(w) for w in _WORD.findall(text)) if lemma is not None]


def text_tools(prefer_amber: bool = True, threshold: float = SIMILARITY) -> TextTools:
    """AMBER's NLTK nouns and spaCy vectors where they load (each on its own), else ours."""
    nouns = _nltk_nouns() if prefer_amber else None
    similar = _spacy_similar(threshold) if prefer_amber else None
    return TextTools(
        nouns=nouns or lemminflect_nouns,
        similar=similar or (lambda a, b: a == b),
        nouns_by="NLTK word_tokenize + pos_tag + WordNetLemmatizer" if nouns else "lemminflect (no tagger)",
        synonyms_by=f"spaCy en_core_web_lg vectors (similarity > {threshold})" if similar else "exact words only",
    )


# ---------------------------------------------------------------------------------- generative
@dataclass
class DescriptionScore:
    nouns: list[str]  # the kept nouns (association words), in order
    hallucinated: list[bool]  # one flag per kept noun
    truth_covered: list[bool]  # one flag per truth entry
    hallu_covered: list[bool]  # one flag per hallu entry


def _owners(objects: Sequence[str], association: Mapping[str, Sequence[str]]) -> tuple[list[str], list[int]]:
    """inference.py's word list of some objects: every object's association words, in object order,
    then the objects themselves; and for each word the index of the object it stands for."""
    words, owner = [], []
    for i, name in enumerate(objects):
        words += association[name]
        owner += [i] * len(association[name])
    return words + list(objects), owner + list(range(len(objects)))


def score_description(response: str, truth: Sequence[str], hallu: Sequence[str], data: AmberData,
                      tools: TextTools) -> DescriptionScore:
    """One description scored as inference.py's generative branch (module docstring)."""
    kept = [n for n in tools.nouns(response) if n in data.hallucination_words]
    safe_words, safe_owner = _owners(truth, data.association)
    hallu_words, hallu_owner = _owners(hallu, data.association)
    truth_covered, hallu_covered = [False] * len(truth), [False] * len(hallu)
    global_safe = set(data.safe_words)
    flags = []
    for noun in kept:
        if noun in global_safe:
            flags.append(False)
            continue
        if noun in safe_words:
            truth_covered[safe_owner[safe_words.index(noun)]] = True
            flags.append(False)
            continue
        if noun in hallu_words:
            hallu_covered[hallu_owner[hallu_words.index(noun)]] = True
        j = next((j for j, w in enumerate(hallu_words) if tools.similar(noun, w)), None)
        if j is not None:
            hallu_covered[hallu_owner[j]] = True
        j = next((j for j, w in enumerate(safe_words) if tools.similar(noun, w)), None)
        if j is not None:
            truth_covered[safe_owner[j]] = True
            flags.append(False)
            continue
        flags.append(True)
    return DescriptionScore(kept, flags, truth_covered, hallu_covered)


# ------------------------------------------------------------------------------------ numbers
def _script_num(n: int) -> float:
    """A metrics.txt counter that counted n: 0.001 + n (the script adds 1, or a list's length, at a time:
    the same number to the last bits of a float, far below the printed 0.1)."""
    return _SCRIPT_START + n


def _pct(score: float, num: float) -> float:
    return round(score / num * 100, 1)


def _script_f1(precision: float, recall: float, eps: float) -> float:
    return round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + eps) * 100, 1)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _counts_metrics(c: Mapping[str, int], eps: float, script_nums: Mapping[str, float]) -> dict[str, Any]:
    """Fractions + inference.py's printed percentages of one discriminative group."""
    precision, recall = _ratio(c["correct_no"], c["answered_no"]), _ratio(c["correct_no"], c["truth_no"])
    f1 = 2 * precision * recall / (precision + recall) if precision is not None and recall is not None and precision + recall else None
    p_print = _pct(c["correct_no"], script_nums["answered_no"])
    r_print = _pct(c["correct_no"], script_nums["truth_no"])
    return {
        "accuracy": _ratio(c["correct"], c["n"]), "precision": precision, "recall": recall, "f1": f1, **c,
        "printed": {"accuracy": _pct(c["correct"], script_nums["n"]), "precision": p_print, "recall": r_print,
                    "f1": _script_f1(p_print, r_print, eps)},
    }


def _new_counts() -> dict[str, int]:
    return {"n": 0, "correct": 0, "truth_no": 0, "answered_no": 0, "correct_no": 0}


@dataclass
class AmberReport:
    generative: dict[str, Any] | None
    discriminative: dict[str, dict[str, Any]]
    normalised: int  # discriminative responses that were not exactly "Yes" / "No"
    per_answer: list[dict[str, Any]]
    method: dict[str, str]
    responses: list[dict[str, Any]] = field(default_factory=list)  # AMBER's format, yes/no normalised

    def to_dict(self) -> dict[str, Any]:
        return {"generative": self.generative, "discriminative": self.discriminative,
                "normalised_yes_no": self.normalised, "method": self.method}


def score_amber(data: AmberData, answers: Mapping[str, str], tools: TextTools | None = None) -> AmberReport:
    """Score `answers` ({str(query id): response}, checked by answers.read_answers_file) on `data`'s
    queries that have one, as inference.py does (module docstring)."""
    tools = tools or text_tools()
    per_answer, responses = [], []
    gen = {"kept": 0, "hallucinated": 0, "truth": 0, "truth_covered": 0, "hallu": 0, "hallu_covered": 0,
           "descriptions": 0, "with_hallucination": 0}
    groups: dict[str, dict[str, int]] = {}
    normalised = 0
    for q in data.queries:
        if str(q.id) not in answers:
            continue
        response = answers[str(q.id)]
        entry = data.annotations[q.id - 1]
        if q.generative:
            s = score_description(response, entry["truth"], entry["hallu"], data, tools)
            gen["descriptions"] += 1
            gen["kept"] += len(s.nouns)
            gen["hallucinated"] += sum(s.hallucinated)
            gen["truth"] += len(s.truth_covered)
            gen["truth_covered"] += sum(s.truth_covered)
            gen["hallu"] += len(s.hallu_covered)
            gen["hallu_covered"] += sum(s.hallu_covered)
            gen["with_hallucination"] += any(s.hallucinated)
            per_answer.append({"id": q.id, "type": q.type, "response": response, "nouns": s.nouns,
                               "hallucinated": [n for n, h in zip(s.nouns, s.hallucinated) if h],
                               "truth_covered": [w for w, c in zip(entry["truth"], s.truth_covered) if c],
                               "hallu_covered": [w for w, c in zip(entry["hallu"], s.hallu_covered) if c]})
            responses.append({"id": q.id, "response": response})
            continue
        answer = response if response in ("Yes", "No") else ("No" if parse_yes_no(response) == "no" else "Yes")
        normalised += answer != response
        truth = entry["truth"]
        names = ["discriminative", "existence" if q.type == EXISTENCE_TYPE else
                 "attribute" if q.type in ATTRIBUTE_TYPES else "relation"]
        if q.type in ATTRIBUTE_TYPES:
            names.append(ATTRIBUTE_TYPES[q.type])
        for name in names:
            c = groups.setdefault(name, _new_counts())
            c["n"] += 1
            c["correct"] += (truth == "yes" and answer == "Yes") or (truth == "no" and answer == "No")
            c["truth_no"] += truth == "no"
            c["answered_no"] += answer == "No"
            c["correct_no"] += truth == "no" and answer == "No"
        per_answer.append({"id": q.id, "type": q.type, "response": response, "answer": answer, "truth": truth,
                           "correct": (answer == "Yes") == (truth == "yes")})
        responses.append({"id": q.id, "response": answer})
    discriminative = {}
    order = ("discriminative", "existence", "attribute", "state", "number", "action", "relation")
    for name in (n for n in order if n in groups):
        c = groups[name]
        if name == "attribute":  # inference.py sums the three sub-counters, each starting at 0.001
            nums = {k: sum(_script_num(groups[s][k]) if s in groups else _SCRIPT_START for s in ("state", "number", "action"))
                    for k in ("n", "truth_no", "answered_no")}
        else:
            nums = {k: _script_num(c[k]) for k in ("n", "truth_no", "answered_no")}
        discriminative[name] = _counts_metrics(c, 0.001 if name == "existence" else 0.0001, nums)
    generative = None
    if gen["descriptions"]:
        generative = {
            "chair": _ratio(gen["hallucinated"], gen["kept"]), "cover": _ratio(gen["truth_covered"], gen["truth"]),
            "hal": gen["with_hallucination"] / gen["descriptions"], "cog": _ratio(gen["hallu_covered"], gen["hallu"]),
            **gen,
            "printed": {"chair": _pct(gen["hallucinated"], _script_num(gen["kept"])),
                        "cover": _pct(gen["truth_covered"], _script_num(gen["truth"])),
                        "hal": round(100 - (gen["descriptions"] - gen["with_hallucination"]) / _script_num(gen["descriptions"]) * 100, 1),
                        "cog": _pct(gen["hallu_covered"], _script_num(gen["hallu"]))},
        }
    method = {"nouns": tools.nouns_by, "synonyms": tools.synonyms_by, "label": tools.label}
    return AmberReport(generative, discriminative, normalised, per_answer, method, responses)


# ------------------------------------------------------------------------------------- reporting
GENERATIVE_COLUMNS = (("chair", "CHAIR ↓"), ("cover", "Cover ↑"), ("hal", "Hal ↓"), ("cog", "Cog ↓"))
DISCRIMINATIVE_COLUMNS = (("accuracy", "accuracy ↑"), ("precision", "precision ↑"), ("recall", "recall ↑"), ("f1", "F1 ↑"))


def format_amber_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown, inference.py's printed figures (%): the generative table (labelled "without vector
    synonyms" when so scored), then one row per (model, discriminative group)."""
    parts = []
    gen_rows = [(name, e) for name, e in results.items() if e.get("generative")]
    if gen_rows:
        label = {e["method"]["label"] for _, e in gen_rows} - {""}
        parts.append("AMBER generative" + (f" ({WITHOUT_VECTORS})" if label else "") + "\n")
        parts.append("| model | " + " | ".join(h for _, h in GENERATIVE_COLUMNS) + " | descriptions |")
        parts.append("|---|" + "|".join("---:" for _ in GENERATIVE_COLUMNS) + "|---:|")
        for name, e in gen_rows:
            g = e["generative"]
            parts.append(f"| {name} | " + " | ".join(f"{g['printed'][k]:.1f}" for k, _ in GENERATIVE_COLUMNS)
                         + f" | {g['descriptions']} |")
    disc_rows = [(name, e) for name, e in results.items() if e.get("discriminative")]
    if disc_rows:
        parts.append(("\n" if parts else "") + "AMBER discriminative (precision and recall of the \"No\" answers, as AMBER's script)\n")
        parts.append("| model | dimension | " + " | ".join(h for _, h in DISCRIMINATIVE_COLUMNS) + " | questions | normalised to Yes/No |")
        parts.append("|---|---|" + "|".join("---:" for _ in DISCRIMINATIVE_COLUMNS) + "|---:|---:|")
        for name, e in disc_rows:
            for group, m in e["discriminative"].items():
                norm = str(e["normalised_yes_no"]) if group == "discriminative" or len(e["discriminative"]) == 1 else ""
                parts.append(f"| {name} | {group} | " + " | ".join(f"{m['printed'][k]:.1f}" for k, _ in DISCRIMINATIVE_COLUMNS)
                             + f" | {m['n']} | {norm} |")
    return "\n".join(parts) + "\n"


def plot_amber(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """PNG: generative CHAIR, Cover, Hal, Cog and discriminative accuracy and F1 (%), one bar per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [("generative", k, h.split(" ")[0]) for k, h in GENERATIVE_COLUMNS]
    groups += [("discriminative", k, f"disc. {k}") for k in ("accuracy", "f1")]

    def value(entry, section, key):
        part = entry.get(section) or {}
        part = part.get("discriminative", {}) if section == "discriminative" else part
        return (part.get("printed") or {}).get(key)

    names = list(results)
    fig = Figure(figsize=(max(5.0, 1.2 + 0.4 * len(names) * len(groups)), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        values = [value(results[name], s, k) for s, k, _ in groups]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label for _, _, label in groups], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 120)
    ax.legend(fontsize=8, frameon=False, loc="upper center", ncol=min(len(names), 4))
    labelled = any((e.get("method") or {}).get("label") for e in results.values() if e.get("generative"))
    ax.set_title("AMBER" + (f" (generative {WITHOUT_VECTORS})" if labelled else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
