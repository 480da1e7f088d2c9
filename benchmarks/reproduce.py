"""The paper's claims at toy scale on a CPU: DPO vs DPO (no image) vs mDPO and its two ablations,
trained from one SFT model that can see and has a language prior to fall into (`mdpo.data.scenes`).

    python -m benchmarks.reproduce            # full table: 3 seeds x 5 objectives (about 15-30 min on 2 cores)
    python -m benchmarks.reproduce --quick    # 2 seeds, fewer steps and scenes (a few minutes)
    python -m benchmarks.reproduce --seed 7   # any seed: other scenes, model, splits and runs

Pipeline (every number below is a function of --seed; nothing is tuned on the test split):
1. scenes (`scenes.write_split`): SFT scenes and a pair pool with the co-occurrence prior, and the
   TEST split: balanced scenes + trap scenes (cue without partner, partner without cue), written
   before any model is trained. (The development split the design was chosen on is not used here.)
2. a random LLaVA-shaped model (`scenes.build_scene_model`), trained with `mdpo-train
   configs/tiny-cpu-sft.yaml` (objective sft, every weight trainable) on the faithful answers;
3. on-policy pairs: 4 answers per pool scene sampled from the SFT model (T = 0.7, top-k 20), labelled
   exactly from the object lists (`scenes.build_pairs`); a text-only learner's accuracy on them;
4. from the SFT model's folder (`model.path`), `mdpo-train configs/tiny-cpu.yaml` with objective dpo,
   dpo_no_image, mdpo, mdpo_no_conditional, mdpo_no_anchor: same lr, steps and data for all, one run
   per seed; 2 runs at a time in subprocesses, one torch thread each;
5. greedy answers on the test split, with the image and with a blank image, scored exactly
   (`scenes.score`, cross-checked against `mdpo.eval.chair.score_answers`): CHAIR_s, CHAIR_i, recall,
   objects per answer, the prior rate on trap scenes, blank-image recall; mean and 95 % t-interval
   over seeds; one line per claim of the paper, decided by the rules in `CLAIM_RULES`.

Writes OUT/reproduce-cpu.{json,md,png} (--quick: reproduce-cpu-quick.*); work files under --work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("sft", "dpo", "dpo_no_image", "mdpo", "mdpo_no_conditional", "mdpo_no_anchor")
LABELS = {"sft": "SFT (start)", "dpo": "DPO", "dpo_no_image": "DPO (no image)", "mdpo": "mDPO",
          "mdpo_no_conditional": "mDPO − conditional", "mdpo_no_anchor": "mDPO − anchor"}
# The paper's Table 2 (Object HalBench CHAIR_s / CHAIR_i, Bunny-3B); DPO (no image) is only in its Fig. 1.
PAPER = {"mdpo": (27.0, 4.6), "mdpo_no_anchor": (34.3, 5.7), "mdpo_no_conditional": (40.3, 7.1), "dpo": (44.3, 7.6)}
METRICS = ("chair_s", "chair_i", "recall", "objects_per_answer", "prior_rate", "blank_recall")
CLAIM_RULES = """Rules, fixed before any run (differences are means over seeds with a 95 % Welch t-interval):
C1 "DPO without the image scores about as well as DPO": reproduced if the interval of
   CHAIR_s(DPO no image) − CHAIR_s(DPO) and that of CHAIR_i both contain 0.
C2 "mDPO hallucinates less than DPO": reproduced if the intervals of CHAIR_s(mDPO) − CHAIR_s(DPO) and of
   CHAIR_i lie below 0. Recall is reported beside it (a model can lower CHAIR by saying less).
C3 "the conditional term is the larger part of the gain": reproduced if the interval of
   CHAIR_s(mDPO − conditional) − CHAIR_s(mDPO − anchor) lies above 0.
C4 "each component helps": reproduced if CHAIR_s(mDPO) is below both ablations (intervals of the
   differences below 0)."""
SIGHT_CHECK_SCENES = 200  # pool scenes of that check (greedy, with the image and with a blank one)
SIGHT_MARGIN = 0.10  # recall with the image minus recall with a blank image, at least
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


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
    seeds: int = 3
    model: dict = field(default_factory=dict)  # build_scene_model widths (default: the full model)
    sft_batch: int = 32
    pref_batch: int = 16
    sft_attempts: int = 3  # random starts tried for an SFT model that uses the image


FULL = Scale("full")
QUICK = Scale("quick", sft_scenes=1000, sft_steps=300, pool_scenes=300,
              test_counts={"balanced": 60, "cue_only": 30, "partner_only": 30}, pref_steps=25, seeds=2)


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
        import contextlib

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


def _worker(spec: dict) -> dict:
    """Train one preference run (or none for the SFT row) and evaluate it; returns its result row."""
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
    row = {"variant": spec["variant"], "seed": spec["seed"], **result, "curve": curve,
           "seconds": round(time.perf_counter() - started, 1)}
    (out / "result.json").write_text(json.dumps(row, indent=1))
    return row


def _run_worker(spec: dict) -> dict:
    if IN_PROCESS["on"]:
        return _worker(spec)
    path = Path(spec["work"]) / "runs" / f"{spec['variant']}-s{spec['seed']}.spec.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    log = path.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--worker", str(path)], cwd=REPO, env=_env(),
                            stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"worker {spec['variant']} seed {spec['seed']} failed (exit {rc}); see {log}")
    return json.loads((Path(spec["work"]) / "runs" / f"{spec['variant']}-s{spec['seed']}" / "result.json").read_text())


# ------------------------------------------------------------------------------------------ stats
def t975(df: int) -> float:
    if df <= 0:
        return float("nan")
    keys = sorted(T975)
    return T975[max(k for k in keys if k <= df)] if df < 30 else 1.96


def mean_ci(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": float("nan"), "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci": t975(n - 1) * sd / math.sqrt(n), "n": n, "values": values}


def diff_ci(a: list[float], b: list[float]) -> dict:
    """mean(a) − mean(b) with a 95 % Welch interval."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    if na < 2 or nb < 2:
        return {"diff": ma - mb, "low": float("nan"), "high": float("nan")}
    va = sum((v - ma) ** 2 for v in a) / (na - 1) / na
    vb = sum((v - mb) ** 2 for v in b) / (nb - 1) / nb
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (na - 1)) + (vb ** 2 / (nb - 1))) if se > 0 else na + nb - 2
    half = t975(int(df)) * se
    return {"diff": ma - mb, "low": ma - mb - half, "high": ma - mb + half}


def claims(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    """The claim lines of CLAIM_RULES from per-variant, per-metric lists of seed values."""
    def d(a, b, m):
        return diff_ci(values[a][m], values[b][m])

    def contains0(x):
        return x["low"] <= 0 <= x["high"]

    out = []
    c1s, c1i = d("dpo_no_image", "dpo", "chair_s"), d("dpo_no_image", "dpo", "chair_i")
    out.append({"claim": "C1 DPO without the image scores about as well as DPO",
                "reproduced": contains0(c1s) and contains0(c1i), "numbers": {"chair_s": c1s, "chair_i": c1i}})
    c2s, c2i, c2r = d("mdpo", "dpo", "chair_s"), d("mdpo", "dpo", "chair_i"), d("mdpo", "dpo", "recall")
    out.append({"claim": "C2 mDPO hallucinates less than DPO (CHAIR_s and CHAIR_i)",
                "reproduced": c2s["high"] < 0 and c2i["high"] < 0, "numbers": {"chair_s": c2s, "chair_i": c2i, "recall": c2r}})
    c3 = d("mdpo_no_conditional", "mdpo_no_anchor", "chair_s")
    out.append({"claim": "C3 removing the conditional term hurts more than removing the anchor (CHAIR_s)",
                "reproduced": c3["low"] > 0, "numbers": {"chair_s": c3}})
    c4a, c4b = d("mdpo", "mdpo_no_conditional", "chair_s"), d("mdpo", "mdpo_no_anchor", "chair_s")
    out.append({"claim": "C4 mDPO is below both ablations (CHAIR_s)",
                "reproduced": c4a["high"] < 0 and c4b["high"] < 0, "numbers": {"vs_no_conditional": c4a, "vs_no_anchor": c4b}})
    return out


# ----------------------------------------------------------------------------------------- report
def _fmt(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    ci = "" if math.isnan(stat["ci"]) else f" ± {stat['ci'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}{ci}"


def _fmt_diff(x: dict, digits: int = 1) -> str:
    return f"{x['diff']:+.{digits}f} [{x['low']:+.{digits}f}, {x['high']:+.{digits}f}]"


def _num(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1f}"


def write_report(summary: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary["table"]
    lines = [f"# Toy reproduction of mDPO on a CPU ({summary['scale']['name']}, seed {summary['seed']})", "",
             f"{summary['seeds']} seed(s) per objective, mean ± 95 % t-interval over seeds; test split of "
             f"{summary['test_scenes']} scenes ({summary['test_counts']}); greedy answers. CHAIR in %, recall in [0, 1]. "
             "Prior rate: trap scenes whose missing partner is named. Paper: Table 2 (Object HalBench, CHAIR_s / CHAIR_i).", "",
             "| objective | CHAIR_s | CHAIR_i | recall | objects/answer | prior rate | blank-image recall | paper CHAIR_s / CHAIR_i |",
             "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        if v not in table:
            continue
        t = table[v]
        paper = "{} / {}".format(*PAPER[v]) if v in PAPER else "–"
        lines.append(f"| {LABELS[v]} | {_fmt(t['chair_s'])} | {_fmt(t['chair_i'])} | {_fmt(t['recall'], digits=3)} | "
                     f"{_fmt(t['objects_per_answer'], digits=2)} | {_fmt(t['prior_rate'])} | {_fmt(t['blank_recall'], digits=3)} | {paper} |")
    order = sorted((v for v in PAPER if v in table), key=lambda v: table[v]["chair_s"]["mean"])
    ours = LABELS[order[0]] + f" ({table[order[0]]['chair_s']['mean']:.1f})" if order else ""
    for a, b in zip(order, order[1:]):
        same = table[a]["chair_s"]["mean"] == table[b]["chair_s"]["mean"]
        ours += (" = " if same else " < ") + LABELS[b] + f" ({table[b]['chair_s']['mean']:.1f})"
    sft = table.get("sft")
    lines += ["", "Ordering by CHAIR_s (lowest first): ours " + ours + "; paper "
              + " < ".join(f"{LABELS[v]} ({PAPER[v][0]})" for v in sorted(PAPER, key=lambda v: PAPER[v][0])) + "."]
    if sft:
        sees = sft["recall"]["mean"] - sft["blank_recall"]["mean"]
        lines += ["", f"Does the SFT model use the image? recall {sft['recall']['mean']:.3f} with the image, "
                  f"{sft['blank_recall']['mean']:.3f} with a blank one ({'yes' if sees > 0.05 else 'NO: the comparisons below are vacuous'})."]
    for a in summary.get("sft_attempts", []):
        lines.append(f"- SFT from model seed {a['model_seed']}: recall on {SIGHT_CHECK_SCENES} pool scenes {a['pool_recall']:.3f}, "
                     f"with a blank image {a['pool_blank_recall']:.3f}"
                     + ("" if a["pool_recall"] - a["pool_blank_recall"] >= SIGHT_MARGIN else f" (does not use the image: margin < {SIGHT_MARGIN})")
                     + ("; kept" if a is summary["sft_attempts"][-1] else "; replaced"))
    lines += ["", "## Claims", ""]
    for c in summary["claims"]:
        nums = "; ".join(f"{k} {_fmt_diff(x, 3 if k == 'recall' else 1)}" for k, x in c["numbers"].items())
        lines.append(f"- **{'reproduced' if c['reproduced'] else 'not reproduced'}** — {c['claim']}: {nums}")
    lines += ["", "```", CLAIM_RULES, "```", "", "## Data and training", ""]
    p = summary["pairs"]
    lines += [f"- SFT: {summary['scale']['sft_steps']} steps on {summary['scale']['sft_scenes']} co-occurrence scenes (objective sft, every weight).",
              f"- Pairs: {p['pairs']} from {p['records']} pool scenes × {summary['scale']['samples_per_scene']} samples (T 0.7, top-k 20); "
              f"{p['gold_chosen']} with the reference answer as chosen (no faithful sample); rejected answers naming the partner "
              f"of a present object: {p['rejected_names_partner']}; offline pairs added (too few on-policy ones): {p['offline_pairs']}; "
              f"text-only learner accuracy on the pairs: {summary['text_only_accuracy']:.3f}.",
              f"- Preference runs: configs/tiny-cpu.yaml, {summary['scale']['pref_steps']} steps of {summary['scale']['pref_batch']} pairs, same lr for all.",
              f"- Conditional term (mdpo, mean over seeds): loss over the first 10 steps {summary['conditional']['first10']:.3f}, "
              f"over the last 10 % {summary['conditional']['last10pct']:.3f} (log 2 = 0.693 at step 0: policy = reference).",
              f"- Wall time {summary['seconds']:.0f} s with {summary['jobs']} job(s) at a time, one torch thread each"
              + (f"; load average at the start {summary['load_at_start']}" if summary.get("load_at_start") else "") + ".",
              "", "Per trap kind (mean over seeds):", "", "| objective | kind | CHAIR_s | CHAIR_i | recall | prior rate |", "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        for kind, t in summary.get("by_kind", {}).get(v, {}).items():
            lines.append(f"| {LABELS[v]} | {kind} | {t['chair_s']:.1f} | {t['chair_i']:.1f} | {t['recall']:.3f} | "
                         f"{_num(t['prior_rate'])} |")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    variants = [v for v in VARIANTS if v in table]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, (metric, title, scale) in zip(axes, [("chair_s", "CHAIR_s (%)", 1), ("chair_i", "CHAIR_i (%)", 1),
                                                  ("recall", "recall", 1), ("prior_rate", "prior rate on traps (%)", 1)]):
        means = [table[v][metric]["mean"] * scale for v in variants]
        errs = [0 if math.isnan(table[v][metric]["ci"]) else table[v][metric]["ci"] * scale for v in variants]
        ax.bar(range(len(variants)), means, yerr=errs, capsize=3, color="#4c72b0", label="ours")
        if metric in ("chair_s", "chair_i"):
            k = 0 if metric == "chair_s" else 1
            xs = [i for i, v in enumerate(variants) if v in PAPER]
            ax.scatter(xs, [PAPER[variants[i]][k] for i in xs], color="#dd8452", zorder=3, label="paper Table 2")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([LABELS[v] for v in variants], rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"toy reproduction ({summary['scale']['name']}, seed {summary['seed']}, {summary['seeds']} seeds, 95 % intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- run
def run(scale: Scale, seed: int, work: Path, out_dir: Path, stem: str, jobs: int = 2, log=print) -> dict:
    from mdpo.data import scenes

    started = time.perf_counter()
    IN_PROCESS["on"] = jobs == 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    work.mkdir(parents=True, exist_ok=True)
    # 1. scenes; the test split is written (and so fixed) before any model exists
    scenes.write_split(work, "sft", {"train": scale.sft_scenes}, seed=seed)
    pool_path = scenes.write_split(work, "pool", {"train": scale.pool_scenes}, seed=seed)
    scenes.write_split(work, "test", scale.test_counts, seed=seed)  # read back by path at evaluation
    log(f"[{time.perf_counter() - started:6.0f} s] scenes written: {work}")
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
        log(f"[{time.perf_counter() - started:6.0f} s] SFT (model seed {init}): pool recall {seen:.3f}, with a blank image {blind:.3f}")
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
    log(f"[{time.perf_counter() - started:6.0f} s] {len(pairs)} pairs, text-only accuracy {text_acc:.3f}")
    # 4-5. preference runs and evaluation, `jobs` at a time
    epochs = max(1, math.ceil(scale.pref_steps * scale.pref_batch / len(pairs)))
    specs = [{"variant": "sft", "seed": seed, "work": str(work)}]
    specs += [{"variant": v, "seed": seed + k, "work": str(work), "pref_steps": scale.pref_steps, "epochs": epochs,
               "pref_batch": scale.pref_batch} for k in range(scale.seeds) for v in VARIANTS[1:]]
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool_exec:
        for row in pool_exec.map(_run_worker, specs):
            rows.append(row)
            m = row["metrics"]
            log(f"[{time.perf_counter() - started:6.0f} s] {row['variant']:<20} seed {row['seed']}: CHAIR_s {m['chair_s']:.1f} "
                f"CHAIR_i {m['chair_i']:.1f} recall {m['recall']:.3f} objects {m['objects_per_answer']:.2f} ({row['seconds']} s)")
    values = {v: {k: [r["metrics"][k] for r in rows if r["variant"] == v] for k in METRICS} for v in VARIANTS}
    table = {v: {k: mean_ci(values[v][k]) for k in METRICS} for v in VARIANTS}
    by_kind = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        by_kind[v] = {kind: {k: sum(r["by_kind"][kind][k] for r in mine) / len(mine) for k in ("chair_s", "chair_i", "recall", "prior_rate")}
                      for kind in mine[0]["by_kind"]}
    cond = [r["curve"]["loss/conditional"] for r in rows if r["variant"] == "mdpo" and "loss/conditional" in r["curve"]]
    summary = {
        "scale": asdict(scale), "seed": seed, "seeds": scale.seeds, "jobs": jobs,
        "test_scenes": sum(scale.test_counts.values()), "test_counts": scale.test_counts,
        "pairs": pair_stats, "text_only_accuracy": text_acc, "sft_attempts": attempts, "table": table, "by_kind": by_kind,
        "claims": claims(values) if scale.seeds >= 1 else [],
        "conditional": {k: sum(c[k] for c in cond) / len(cond) for k in ("first10", "last10pct")} if cond else {"first10": float("nan"), "last10pct": float("nan")},
        "runs": rows, "seconds": time.perf_counter() - started, "load_at_start": round(load, 2) if load is not None else None,
    }
    written = write_report(summary, out_dir, stem)
    log(f"[{time.perf_counter() - started:6.0f} s] wrote {', '.join(map(str, written))}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer scenes and steps (a few minutes)")
    parser.add_argument("--seed", type=int, default=0, help="scenes, model, splits and run seeds derive from it")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (subprocesses, one torch thread each; 0: in this process)")
    parser.add_argument("--work", default=None, help="work folder (default: outputs/reproduce-<scale>-s<seed>)")
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
        summary["claims"] = claims({v: {k: summary["table"][v][k]["values"] for k in METRICS} for v in VARIANTS})
        stem = Path(args.report).stem
        write_report(summary, Path(args.out), stem)
        print((Path(args.out) / f"{stem}.md").read_text())
        return 0
    scale = QUICK if args.quick else FULL
    work = Path(args.work or REPO / "outputs" / f"reproduce-{scale.name}-s{args.seed}")
    stem = "reproduce-cpu" + ("-quick" if args.quick else "") + ("" if args.seed == 0 else f"-s{args.seed}")
    summary = run(scale, args.seed, work, Path(args.out), stem, jobs=args.jobs)
    print((Path(args.out) / f"{stem}.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    raise SystemExit(main())
