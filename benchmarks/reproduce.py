"""The paper's claims at toy scale on a CPU: DPO vs DPO (no image) vs mDPO and its two ablations,
trained in several *worlds*, each with its own scenes, SFT model that can see and has a language prior
to fall into (`mdpo.data.scenes`), and on-policy pairs; the claims are decided over worlds.

    python -m benchmarks.reproduce              # 3 worlds x 3 run seeds x 5 objectives (about 24 min of 2 idle cores)
    python -m benchmarks.reproduce --worlds 4   # more worlds: a narrower interval over worlds, ~8 min more per world
    python -m benchmarks.reproduce --quick      # 2 worlds x 2 run seeds, fewer steps and scenes (a smoke run)
    python -m benchmarks.reproduce --seed 7     # other worlds: seeds 7, 8, 9

Pipeline (every number below is a function of the world's seed; nothing is tuned on the test split).
Worlds are seeds S, S+1, ..., S+K-1 (S = --seed). In each world:
1. scenes (`scenes.write_split`): SFT scenes and a pair pool with the co-occurrence prior, and the
   TEST split: balanced scenes + trap scenes (cue without partner, partner without cue), written
   before any model is trained. (The development split the design was chosen on is not used here.)
2. a random LLaVA-shaped model (`scenes.build_scene_model`), trained with `mdpo-train
   configs/tiny-cpu-sft.yaml` (objective sft, every weight trainable) on the faithful answers; a model
   that does not use the image (pool scenes) is replaced by another random start (the sight guard);
3. on-policy pairs: 4 answers per pool scene sampled from the SFT model (T = 0.7, top-k 20), labelled
   exactly from the object lists (`scenes.build_pairs`); a text-only learner's accuracy on them;
4. from the SFT model's folder (`model.path`), `mdpo-train configs/tiny-cpu.yaml` with objective dpo,
   dpo_no_image, mdpo, mdpo_no_conditional, mdpo_no_anchor: same lr, steps and data for all, one run
   per run seed (world seed + 0, 1, 2: data order and corruption);
5. greedy answers on the world's test split, with the image and with a blank image, scored exactly
   (`scenes.score`, cross-checked against `mdpo.eval.chair.score_answers`): CHAIR_s, CHAIR_i, recall,
   objects per answer, the prior rate on trap scenes, blank-image recall.
Then per world the mean over its run seeds, and over worlds the mean of the world means with a 95 %
t-interval over the K world means; one line per claim of the paper, decided by the rules in
`CLAIM_RULES` on that interval (`benchmarks/_claims.py` says why a t-interval over world means and not a
bootstrap), each world's own verdict beside it.

Scheduling: `--jobs` subprocesses at a time, one torch thread each; a world's preparation (1-3) is one
job, and its preference runs are queued as soon as it is done, so the two cores stay busy.
Writes OUT/reproduce-cpu-worlds.{json,md,png} (--quick: reproduce-cpu-worlds-quick.*; another --seed
or --worlds adds -s<S> / -w<K>); work files under --work, one folder per world.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks._claims import CLAIM_RULES, claims, mean_ci, t975

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("sft", "dpo", "dpo_no_image", "mdpo", "mdpo_no_conditional", "mdpo_no_anchor")
LABELS = {"sft": "SFT (start)", "dpo": "DPO", "dpo_no_image": "DPO (no image)", "mdpo": "mDPO",
          "mdpo_no_conditional": "mDPO − conditional", "mdpo_no_anchor": "mDPO − anchor"}
# The paper's Table 2 (Object HalBench CHAIR_s / CHAIR_i, Bunny-3B); DPO (no image) is only in its Fig. 1.
PAPER = {"mdpo": (27.0, 4.6), "mdpo_no_anchor": (34.3, 5.7), "mdpo_no_conditional": (40.3, 7.1), "dpo": (44.3, 7.6)}
METRICS = ("chair_s", "chair_i", "recall", "objects_per_answer", "prior_rate", "blank_recall")
SIGHT_CHECK_SCENES = 200  # pool scenes of that check (greedy, with the image and with a blank one)
SIGHT_MARGIN = 0.10  # recall with the image minus recall with a blank image, at least


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark run (FULL, QUICK; tests use smaller ones)."""

    name: str
    sft_scenes: int = 2000
    sft_steps: int = 600
    pool_scenes: int = 1500
    samples_per_scene: int = 4
    test_counts: dict = field(default_factory=lambda: {"balanced": 300, "cue_only": 120, "partner_only": 120})
    pref_steps: int = 150
    seeds: int = 3  # run seeds per objective in each world
    worlds: int = 3  # worlds (scenes, SFT model, pairs) by default
    model: dict = field(default_factory=dict)  # build_scene_model widths (default: the full model)
    sft_batch: int = 32
    pref_batch: int = 16
    sft_attempts: int = 3  # random starts tried for an SFT model that uses the image


FULL = Scale("full")
QUICK = Scale("quick", sft_scenes=1000, sft_steps=300, pool_scenes=300,
              test_counts={"balanced": 60, "cue_only": 30, "partner_only": 30}, pref_steps=25, seeds=2, worlds=2)


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


IN_PROCESS = {"on": False}  # tests: train and evaluate in this process (no subprocesses)


def _train(config: str, overrides: list[str], log: Path) -> None:
    """One `mdpo-train CONFIG key=value ...` in a subprocess (the user's own entry point)."""
    from mdpo.config import TrainConfig

    # overwrite_output_dir: this script owns its work folder and retrains every run in it (an SFT retry, a rerun)
    overrides = [*overrides, "progress_bar=false", "tensorboard=false", "plots=false", "overwrite_output_dir=true"]
    if hasattr(TrainConfig(), "eval_generate_every"):
        overrides.append("eval_generate_every=0")
    if IN_PROCESS["on"]:
        from mdpo.config import load_config
        from mdpo.train import train

        with open(log, "w") as f, contextlib.redirect_stdout(f):
            train(load_config(REPO / config, overrides))
        return
    cmd = [sys.executable, "-m", "mdpo.train", str(REPO / config), *overrides]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log}")


def evaluate_model(model_dir: Path, test_path: Path) -> dict:
    """Greedy answers on the test split with the image and with a blank image, scored exactly."""
    from mdpo.data import scenes

    records = json.loads(test_path.read_text())
    from mdpo.models import load_model

    loaded = load_model(model_dir)
    answers = [a[0] for a in scenes.sample_answers(model_dir, records, test_path.parent, model=loaded)]
    result = scenes.score(answers, records)
    by_kind = {k: scenes.score([a for a, r in zip(answers, records) if r["kind"] == k], [r for r in records if r["kind"] == k])
               for k in sorted({r["kind"] for r in records})}
    # greedy on a blank image: one prompt for every record, so one answer, scored against each scene
    blank = scenes.sample_answers(model_dir, records[:1], test_path.parent, model=loaded, blank=True)[0][0]
    result["blank_recall"] = scenes.score([blank] * len(records), records)["recall"]
    result["blank_answer"] = blank
    result["chair_check"] = _chair_check(answers, records)
    return {"metrics": result, "by_kind": by_kind, "examples": answers[:5]}


def _chair_check(answers: list[str], records: list[dict]) -> dict | None:
    """The same answers scored by `mdpo.eval.chair` (when present): CHAIR_s / CHAIR_i / recall."""
    try:
        from mdpo.data import scenes
        from mdpo.eval import chair
    except ImportError:
        return None
    vocab = chair.ObjectVocabulary.from_dict(scenes.vocabulary(), name="scenes")
    ann = chair.annotations_from_records(records, vocab) if hasattr(chair, "annotations_from_records") else None
    if ann is None:
        return None
    report = chair.score_answers([{"id": r["id"], "answer": a} for a, r in zip(answers, records)], ann)
    m = report.metrics
    return {k: None if m.get(k) is None else m[k] * (1 if k == "recall" else 100) for k in ("chair_s", "chair_i", "recall")}


def _curve(metrics_path: Path) -> dict:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    out = {}
    for key in ("loss/conditional", "rewards/conditional_accuracies", "logps/chosen", "rewards/accuracies", "loss/dpo"):
        values = [r[key] for r in rows if key in r]
        if values:
            tail = values[-max(1, len(values) // 10):]
            out[key] = {"first10": sum(values[:10]) / len(values[:10]), "last10pct": sum(tail) / len(tail)}
    return out


def prepare_world(scale: Scale, seed: int, work: Path, log=print) -> dict:
    """Stages 1-3 of one world in `work`: its scenes (the test split first), an SFT model that uses the
    image (or the last of `scale.sft_attempts` random starts), and its on-policy pairs. Returns (and
    writes to work/world.json) what the report says about the world."""
    from mdpo.data import scenes

    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    # 1. scenes; the test split is written (and so fixed) before any model exists
    scenes.write_split(work, "sft", {"train": scale.sft_scenes}, seed=seed)
    pool_path = scenes.write_split(work, "pool", {"train": scale.pool_scenes}, seed=seed)
    scenes.write_split(work, "test", scale.test_counts, seed=seed)  # read back by path at evaluation
    # 2. SFT through mdpo-train's normal model.path. Learning to see is a jump that a random start may
    # not make within the budget (the loss sits on the prior's plateau): an SFT model that does not use
    # the image (pool scenes, not the test split) is replaced by one from another random start, up to
    # scale.sft_attempts times; the attempts are reported.
    pool = json.loads(pool_path.read_text())
    attempts = []
    for attempt in range(scale.sft_attempts):
        init = seed + 1000 * attempt
        scenes.build_scene_model(work / "scene-model", seed=init, **scale.model)
        _train("configs/tiny-cpu-sft.yaml", [f"data.path={work / 'sft.json'}", f"model.path={work / 'scene-model'}",
                                             f"output_dir={work / 'sft'}", f"seed={init}", f"max_steps={scale.sft_steps}",
                                             f"micro_batch_size={scale.sft_batch}", f"effective_batch_size={scale.sft_batch}",
                                             f"epochs={math.ceil(scale.sft_steps * scale.sft_batch / scale.sft_scenes)}"], work / "sft.log")
        check = pool[:SIGHT_CHECK_SCENES]
        seen = scenes.score([a[0] for a in scenes.sample_answers(work / "sft" / "final", check, work)], check)["recall"]
        blind = scenes.score([scenes.sample_answers(work / "sft" / "final", check[:1], work, blank=True)[0][0]] * len(check), check)["recall"]
        attempts.append({"model_seed": init, "pool_recall": seen, "pool_blank_recall": blind})
        log(f"[{time.perf_counter() - started:6.0f} s] world {seed}: SFT (model seed {init}): pool recall {seen:.3f}, with a blank image {blind:.3f}")
        if seen - blind >= SIGHT_MARGIN:
            break
    # 3. on-policy pairs
    samples = scenes.sample_answers(work / "sft" / "final", pool, work, n_samples=scale.samples_per_scene,
                                    temperature=0.7, top_k=20, seed=seed)
    pairs, pair_stats = scenes.build_pairs(pool, samples, seed=seed)
    # An SFT model that names no object gives no pair (tiny test sizes): top up with the scenes' offline
    # pairs (faithful answer vs. it plus the missing partner), counted, so any seed gives a table.
    paired = {p["id"] for p in pairs}
    extra = [r for r in pool if r["id"] not in paired][: max(0, 2 * scale.pref_batch - len(pairs))]
    pairs += [{**r, "rejected_hallucinated": scenes.label_answer(r["rejected"], r["objects"])["hallucinated"]} for r in extra]
    pair_stats["offline_pairs"] = len(extra)
    scenes.write_records(work / "pairs.json", pairs)
    text_acc = scenes.text_only_accuracy(pairs, seed=seed, folds=min(5, len(pairs)))
    log(f"[{time.perf_counter() - started:6.0f} s] world {seed}: {len(pairs)} pairs, text-only accuracy {text_acc:.3f}")
    info = {"seed": seed, "work": str(work), "sft_attempts": attempts,
            "sees": attempts[-1]["pool_recall"] - attempts[-1]["pool_blank_recall"] >= SIGHT_MARGIN,
            "pairs": pair_stats, "text_only_accuracy": text_acc,
            "epochs": max(1, math.ceil(scale.pref_steps * scale.pref_batch / len(pairs))),
            "seconds": round(time.perf_counter() - started, 1)}
    (work / "world.json").write_text(json.dumps(info, indent=1))
    return info


def _worker(spec: dict) -> dict:
    """One job: a world's preparation (spec stage "world"), or one preference run (none for the SFT
    row) trained and evaluated on the world's test split; returns its result."""
    if spec.get("stage") == "world":
        return prepare_world(Scale(**spec["scale"]), spec["seed"], Path(spec["work"]))
    work = Path(spec["work"])
    out = work / "runs" / f"{spec['variant']}-s{spec['seed']}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    curve = {}
    if spec["variant"] == "sft":
        model_dir = work / "sft" / "final"
    else:
        _train("configs/tiny-cpu.yaml", [
            f"objective={spec['variant']}", f"data.path={work / 'pairs.json'}", "data.eval_path=null", f"model.path={work / 'sft' / 'final'}",
            f"output_dir={out}", f"seed={spec['seed']}", f"data.corruption_seed={spec['seed']}", f"max_steps={spec['pref_steps']}",
            f"epochs={spec['epochs']}", f"micro_batch_size={spec['pref_batch']}", f"effective_batch_size={spec['pref_batch']}",
            "save_every=0", "eval_every=0",
        ], out / "train.log")
        model_dir = out / "final"
        curve = _curve(out / "metrics.jsonl")
    result = evaluate_model(model_dir, work / "test.json")
    row = {"world": spec["world"], "variant": spec["variant"], "seed": spec["seed"], **result, "curve": curve,
           "seconds": round(time.perf_counter() - started, 1)}
    (out / "result.json").write_text(json.dumps(row, indent=1))
    return row


def _job_files(spec: dict) -> tuple[Path, Path]:
    """(the spec file a subprocess job reads, the result file it writes)."""
    work = Path(spec["work"])
    if spec.get("stage") == "world":
        return work / "world.spec.json", work / "world.json"
    name = f"{spec['variant']}-s{spec['seed']}"
    return work / "runs" / f"{name}.spec.json", work / "runs" / name / "result.json"


def _run_worker(spec: dict) -> dict:
    """`_worker(spec)` in a subprocess with one torch thread (in this process under IN_PROCESS)."""
    if IN_PROCESS["on"]:
        return _worker(spec)
    path, result = _job_files(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)  # never read a previous run's result back
    path.write_text(json.dumps(spec))
    log = path.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--worker", str(path)], cwd=REPO, env=_env(),
                            stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        what = f"world {spec['seed']} preparation" if spec.get("stage") == "world" else f"{spec['variant']} seed {spec['seed']}"
        raise RuntimeError(f"worker ({what}) failed (exit {rc}); see {log}")
    return json.loads(result.read_text())


def _run_specs(scale: Scale, info: dict) -> list[dict]:
    """The jobs of one prepared world: its SFT row, then every objective for every run seed."""
    seed, work = info["seed"], info["work"]
    specs = [{"world": seed, "variant": "sft", "seed": seed, "work": work}]
    specs += [{"world": seed, "variant": v, "seed": seed + k, "work": work, "pref_steps": scale.pref_steps,
               "epochs": info["epochs"], "pref_batch": scale.pref_batch} for k in range(scale.seeds) for v in VARIANTS[1:]]
    return specs


class LoadSampler:
    """The 1-minute load average every `every` seconds in a background thread (the machine may be shared)."""

    def __init__(self, every: float = 15.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)

    def _loop(self, every: float) -> None:
        while True:
            if hasattr(os, "getloadavg"):
                self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(every):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict | None:
        s = self.samples
        return {"start": s[0], "mean": round(sum(s) / len(s), 2), "max": max(s), "samples": len(s)} if s else None


@contextlib.contextmanager
def _one_torch_thread(enabled: bool):
    """One torch thread in this process while it trains and evaluates itself (jobs 0), as every subprocess
    job has; restored after. (Two threads on a shared, busy 2-core machine spin: the tiny test run took
    185 s instead of 19 s at a load average of 3.)"""
    if not enabled:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (waited-for) descendants."""
    import resource

    return sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for k in ("ru_utime", "ru_stime"))


# ------------------------------------------------------------------------------------ aggregation
def aggregate(rows: list[dict], infos: list[dict]) -> dict:
    """Per-world tables (mean ± 95 % t over the world's run seeds), the table over worlds (mean of the
    world means ± 95 % t over worlds), per-kind means, and the claims decided over worlds.

    rows: one result row per (world, variant, run seed); infos: `prepare_world`'s dicts, in world order.
    """
    seeds = [i["seed"] for i in infos]
    per_world = {w: {v: {m: [r["metrics"][m] for r in rows if r["world"] == w and r["variant"] == v] for m in METRICS}
                     for v in VARIANTS} for w in seeds}
    worlds = []
    for info in infos:
        w = info["seed"]
        cond = [r["curve"]["loss/conditional"] for r in rows
                if r["world"] == w and r["variant"] == "mdpo" and "loss/conditional" in r["curve"]]
        worlds.append({**info, "table": {v: {m: mean_ci(per_world[w][v][m]) for m in METRICS} for v in VARIANTS},
                       "conditional": {k: sum(c[k] for c in cond) / len(cond) for k in ("first10", "last10pct")}
                       if cond else {"first10": float("nan"), "last10pct": float("nan")}})
    table = {v: {m: mean_ci([wt["table"][v][m]["mean"] for wt in worlds]) for m in METRICS} for v in VARIANTS}
    by_kind = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        by_kind[v] = {kind: {k: sum(r["by_kind"][kind][k] for r in mine) / len(mine) for k in ("chair_s", "chair_i", "recall", "prior_rate")}
                      for kind in mine[0]["by_kind"]}
    return {"worlds": worlds, "table": table, "by_kind": by_kind, "claims": claims(per_world)}


# ----------------------------------------------------------------------------------------- report
def _fmt(stat: dict, digits: int = 1) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    ci = "" if math.isnan(stat["ci"]) else f" ± {stat['ci']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{ci}"


def _fmt_diff(x: dict, digits: int = 1) -> str:
    if math.isnan(x["low"]):
        return f"{x['diff']:+.{digits}f}"
    return f"{x['diff']:+.{digits}f} [{x['low']:+.{digits}f}, {x['high']:+.{digits}f}]"


def _num(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1f}"


def _label(v: str) -> str:
    return f"({LABELS[v]})" if " − " in LABELS[v] else LABELS[v]


MARK = {"supported": "✓", "contradicted": "✗", "open": "?", None: ""}
METRIC_NAMES = {"chair_s": "CHAIR_s", "chair_i": "CHAIR_i", "recall": "recall"}


def _claim_rows(c: dict, seeds: list[int]) -> list[str]:
    """Markdown rows of one claim: each difference over worlds and per world, then the verdicts."""
    rows = []
    for name, x in c["numbers"].items():
        a, b, metric = x["a"], x["b"], x["metric"]
        digits = 3 if metric == "recall" else 1
        over = _fmt_diff(x, digits) + (f" {MARK[x['decision']]}" if x["part"] else " (shown)")
        cells = [_fmt_diff(x["per_world"][w], digits) + (f" {MARK[x['per_world'][w]['decision']]}" if x["part"] else "") for w in seeds]
        rows.append(f"| {c['key']} | {METRIC_NAMES[metric]}: {_label(a)} − {_label(b)} | {over} | " + " | ".join(cells) + " |")
    rows.append(f"| {c['key']} | **verdict** | **{c['verdict']}** | " + " | ".join(c["world_verdicts"][w] for w in seeds) + " |")
    return rows


def write_report(summary: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table, worlds = summary["table"], summary["worlds"]
    seeds = [w["seed"] for w in worlds]
    k, n = len(worlds), summary["scale"]["seeds"]
    head = " | ".join(f"world {s}" for s in seeds)
    lines = [f"# Toy reproduction of mDPO on a CPU ({summary['scale']['name']}, {k} world(s): seeds {', '.join(map(str, seeds))})", "",
             f"A world is one draw of the scenes, the SFT model and the on-policy pairs; inside each, every objective is "
             f"trained with {n} run seed(s). Over worlds: mean of the {k} world means ± 95 % t-interval over the world means "
             f"(t({k - 1}) = {t975(k - 1):.2f}). Test split per world: {summary['test_scenes']} scenes ({summary['test_counts']}); "
             "greedy answers. CHAIR in %, recall in [0, 1]. Prior rate: trap scenes whose missing partner is named. "
             "Paper: Table 2 (Object HalBench, CHAIR_s / CHAIR_i).", "",
             "| objective | CHAIR_s | CHAIR_i | recall | objects/answer | prior rate | blank-image recall | paper CHAIR_s / CHAIR_i |",
             "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        t = table[v]
        paper = "{} / {}".format(*PAPER[v]) if v in PAPER else "–"
        lines.append(f"| {LABELS[v]} | {_fmt(t['chair_s'])} | {_fmt(t['chair_i'])} | {_fmt(t['recall'], 3)} | "
                     f"{_fmt(t['objects_per_answer'], 2)} | {_fmt(t['prior_rate'])} | {_fmt(t['blank_recall'], 3)} | {paper} |")
    order = sorted(PAPER, key=lambda v: table[v]["chair_s"]["mean"])
    ours = LABELS[order[0]] + f" ({table[order[0]]['chair_s']['mean']:.1f})"
    for a, b in zip(order, order[1:]):
        same = table[a]["chair_s"]["mean"] == table[b]["chair_s"]["mean"]
        ours += (" = " if same else " < ") + LABELS[b] + f" ({table[b]['chair_s']['mean']:.1f})"
    lines += ["", "Ordering by CHAIR_s over worlds (lowest first): ours " + ours + "; paper "
              + " < ".join(f"{LABELS[v]} ({PAPER[v][0]})" for v in sorted(PAPER, key=lambda v: PAPER[v][0])) + "."]
    lines += ["", "## Per world", "", f"CHAIR_s ± 95 % t-interval over the world's {n} run seeds (recall in brackets):", "",
              f"| objective | {head} |", "|---|" + "---|" * k]
    for v in VARIANTS:
        lines.append(f"| {LABELS[v]} | " + " | ".join(f"{_fmt(w['table'][v]['chair_s'])} ({w['table'][v]['recall']['mean']:.3f})"
                                                      for w in worlds) + " |")
    lines += ["", "Does each world's SFT model use the image (test split; the guard checks pool scenes)?", ""]
    for w in worlds:
        sft = w["table"]["sft"]
        sees = sft["recall"]["mean"] - sft["blank_recall"]["mean"]
        tried = "; ".join(f"model seed {a['model_seed']}: pool recall {a['pool_recall']:.3f}, blank {a['pool_blank_recall']:.3f}"
                          for a in w["sft_attempts"])
        lines.append(f"- world {w['seed']}: test recall {sft['recall']['mean']:.3f} with the image, {sft['blank_recall']['mean']:.3f} "
                     f"with a blank one ({'yes' if sees > 0.05 else 'NO: this world’s comparisons are vacuous'}); SFT starts tried: {tried}"
                     + ("" if w["sees"] else f" (the last one kept although its margin is < {SIGHT_MARGIN})") + ".")
    lines += ["", "## Claims", "",
              f"Each difference: over worlds, mean [95 % t-interval over the {k} world means]; per world, mean over its run seeds "
              "[95 % Welch interval]. ✓ the interval supports the claim, ✗ it contradicts it, ? open.", "",
              f"| claim | difference | over {k} worlds | {head} |", "|---|---|---|" + "---|" * k]
    for c in summary["claims"]:
        lines += _claim_rows(c, seeds)
    lines += [""]
    for c in summary["claims"]:
        lines.append(f"- **{c['verdict']}** — {c['claim']} (worlds alone: "
                     + ", ".join(f"{c['world_verdicts'][w]}" for w in seeds) + ")")
    lines += ["", "```", CLAIM_RULES, "```", "", "## Data and training", "",
              f"- SFT: {summary['scale']['sft_steps']} steps on {summary['scale']['sft_scenes']} co-occurrence scenes (objective sft, every weight).",
              f"- Pairs: from {summary['scale']['pool_scenes']} pool scenes × {summary['scale']['samples_per_scene']} samples (T 0.7, top-k 20).",
              f"- Preference runs: configs/tiny-cpu.yaml, {summary['scale']['pref_steps']} steps of {summary['scale']['pref_batch']} pairs, "
              "same lr for all."]
    for w in worlds:
        p = w["pairs"]
        lines.append(f"- world {w['seed']}: {p['pairs']} pairs ({p['gold_chosen']} with the reference answer as chosen; rejected answers "
                     f"naming the partner of a present object: {p['rejected_names_partner']}; offline pairs added: {p['offline_pairs']}); "
                     f"text-only learner accuracy {w['text_only_accuracy']:.3f}; mDPO's conditional loss {w['conditional']['first10']:.3f} "
                     f"over the first 10 steps, {w['conditional']['last10pct']:.3f} over the last 10 % (log 2 = 0.693 at step 0).")
    load = summary.get("load") or {}
    lines += [f"- Wall time {summary['seconds']:.0f} s with {summary['jobs']} job(s) at a time, one torch thread each; CPU time "
              f"{summary['cpu_seconds']:.0f} s (≈ {summary['cpu_seconds'] / max(1, summary['jobs']):.0f} s of wall time on "
              f"{max(1, summary['jobs'])} idle cores)"
              + (f"; 1-minute load average {load['start']} at the start, mean {load['mean']}, max {load['max']} "
                 f"({load['samples']} samples)" if load else "") + ".",
              "", "Per trap kind (mean over every world's runs):", "",
              "| objective | kind | CHAIR_s | CHAIR_i | recall | prior rate |", "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        for kind, t in summary["by_kind"][v].items():
            lines.append(f"| {LABELS[v]} | {kind} | {t['chair_s']:.1f} | {t['chair_i']:.1f} | {t['recall']:.3f} | {_num(t['prior_rate'])} |")
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(summary, indent=1, default=lambda x: None))
    written = [md, js]
    try:
        written.append(_plot(summary, out_dir / f"{stem}.png"))
    except ImportError:
        pass
    return written


def _plot(summary: dict, path: Path) -> Path:
    """Bars: the mean over worlds with its 95 % t-interval; dots: each world's mean; paper's Table 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, worlds = summary["table"], summary["worlds"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.1))
    markers = "os^Dv<>p*h"
    for ax, (metric, title) in zip(axes, [("chair_s", "CHAIR_s (%)"), ("chair_i", "CHAIR_i (%)"),
                                          ("recall", "recall"), ("prior_rate", "prior rate on traps (%)")]):
        means = [table[v][metric]["mean"] for v in VARIANTS]
        errs = [0 if math.isnan(table[v][metric]["ci"]) else table[v][metric]["ci"] for v in VARIANTS]
        ax.bar(range(len(VARIANTS)), means, yerr=errs, capsize=3, color="#4c72b0", alpha=0.75, label="mean over worlds")
        for j, w in enumerate(worlds):
            ax.scatter([i + 0.2 * (j - (len(worlds) - 1) / 2) for i in range(len(VARIANTS))],
                       [w["table"][v][metric]["mean"] for v in VARIANTS], s=14, color="black",
                       marker=markers[j % len(markers)], zorder=3, label=f"world {w['seed']}")
        if metric in ("chair_s", "chair_i"):
            k = 0 if metric == "chair_s" else 1
            xs = [i for i, v in enumerate(VARIANTS) if v in PAPER]
            ax.scatter(xs, [PAPER[VARIANTS[i]][k] for i in xs], color="#dd8452", zorder=4, label="paper Table 2")
        ax.set_xticks(range(len(VARIANTS)))
        ax.set_xticklabels([LABELS[v] for v in VARIANTS], rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(f"toy reproduction ({summary['scale']['name']}, {len(worlds)} worlds × {summary['scale']['seeds']} run seeds; "
                 "bars: mean over worlds, 95 % t-interval over world means)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- run
def run(scale: Scale, seed: int, work: Path, out_dir: Path, stem: str, jobs: int = 2, worlds: int | None = None,
        log=print) -> dict:
    """K worlds (seeds seed .. seed+K-1, K = worlds or scale.worlds) prepared and trained `jobs` at a time;
    writes the report to out_dir/stem.{md,json,png} and returns the summary."""
    worlds = scale.worlds if worlds is None else worlds
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    IN_PROCESS["on"] = jobs == 0
    world_seeds = [seed + i for i in range(worlds)]
    infos: dict[int, dict] = {}
    rows: list[dict] = []
    with LoadSampler() as load, _one_torch_thread(IN_PROCESS["on"]), ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        try:
            # every world's preparation first; a world's runs are queued when it is ready (FIFO behind the
            # other preparations), so preparations overlap each other and the first world's runs
            prepared = {ex.submit(_run_worker, {"stage": "world", "scale": asdict(scale), "seed": s,
                                                "work": str(work / f"world-{s}")}): s for s in world_seeds}
            pending = set(prepared)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    if f in prepared:
                        info = infos.setdefault(prepared[f], f.result())
                        a = info["sft_attempts"][-1]
                        log(f"[{time.perf_counter() - started:6.0f} s] world {info['seed']} ready: {len(info['sft_attempts'])} SFT "
                            f"start(s), pool recall {a['pool_recall']:.3f} (blank {a['pool_blank_recall']:.3f}), "
                            f"{info['pairs']['pairs']} pairs, text-only accuracy {info['text_only_accuracy']:.3f}")
                        pending |= {ex.submit(_run_worker, spec) for spec in _run_specs(scale, info)}
                        continue
                    row = f.result()
                    rows.append(row)
                    m = row["metrics"]
                    log(f"[{time.perf_counter() - started:6.0f} s] world {row['world']} {row['variant']:<20} seed {row['seed']}: "
                        f"CHAIR_s {m['chair_s']:.1f} CHAIR_i {m['chair_i']:.1f} recall {m['recall']:.3f} "
                        f"objects {m['objects_per_answer']:.2f} ({row['seconds']} s)")
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)  # the running jobs finish; nothing queued starts
            raise
    rows.sort(key=lambda r: (world_seeds.index(r["world"]), VARIANTS.index(r["variant"]), r["seed"]))
    summary = {"scale": asdict(scale), "seed": seed, "jobs": jobs, "test_scenes": sum(scale.test_counts.values()),
               "test_counts": scale.test_counts, **aggregate(rows, [infos[s] for s in world_seeds]), "runs": rows,
               "seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu_started, "load": load.summary()}
    written = write_report(summary, out_dir, stem)
    log(f"[{time.perf_counter() - started:6.0f} s] wrote {', '.join(map(str, written))}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 worlds x 2 run seeds, fewer scenes and steps (a smoke run)")
    parser.add_argument("--worlds", type=int, default=None, help="worlds (scenes, SFT model, pairs): seeds SEED .. SEED+K-1 "
                        f"(default {FULL.worlds}; --quick {QUICK.worlds})")
    parser.add_argument("--seed", type=int, default=0, help="the first world's seed; scenes, model, splits and run seeds derive from it")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (subprocesses, one torch thread each; 0: in this process)")
    parser.add_argument("--work", default=None, help="work folder, one sub-folder per world (default: outputs/reproduce-<scale>)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the table goes")
    parser.add_argument("--report", default=None, metavar="JSON", help="only re-write the report of a finished run's JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        _worker(json.loads(Path(args.worker).read_text()))
        return 0
    if args.report:
        summary = json.loads(Path(args.report).read_text(), parse_constant=float)
        if "worlds" not in summary:
            parser.error(f"--report {args.report}: a single-world table from before --worlds (no 'worlds' key); "
                         "its own .md is its report")
        summary.update(aggregate(summary["runs"], [{k: v for k, v in w.items() if k not in ("table", "conditional")}
                                                   for w in summary["worlds"]]))
        stem = Path(args.report).stem
        write_report(summary, Path(args.out), stem)
        print((Path(args.out) / f"{stem}.md").read_text())
        return 0
    scale = QUICK if args.quick else FULL
    worlds = scale.worlds if args.worlds is None else args.worlds
    if worlds < 1:
        parser.error(f"--worlds {worlds}: at least 1 world (2 or more for an interval over worlds)")
    work = Path(args.work or REPO / "outputs" / f"reproduce-{scale.name}")
    stem = ("reproduce-cpu-worlds" + ("-quick" if args.quick else "") + (f"-s{args.seed}" if args.seed else "")
            + (f"-w{worlds}" if worlds != scale.worlds else ""))
    run(scale, args.seed, work, Path(args.out), stem, jobs=args.jobs, worlds=worlds)
    print((Path(args.out) / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
