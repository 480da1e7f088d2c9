"""The statistics of `benchmarks.reproduce`: intervals and the claim rules, decided over worlds.

A *world* is one draw of everything the benchmark builds before it compares objectives: the scenes,
the SFT model and the on-policy pairs (`--seed` of one world). Inside a world every objective is
trained with several *run seeds* (data order, corruption). The paper's claims are about objectives, not
about one SFT model, so they are decided on the between-world distribution:

1. per world, the mean difference over its run seeds (e.g. mean CHAIR_s(mDPO) − mean CHAIR_s(DPO));
2. a 95 % t-interval over the K world means: mean ± t(K−1) · sd / √K.

Why a t-interval over world means and not a hierarchical bootstrap. With equal run seeds per world the
variance of a world mean is σ²_between + σ²_within / n, so the spread of the K world means already holds
both parts, and under a normal random-effects model the interval has exact 95 % coverage whatever
their ratio; its only estimate is the sd of K numbers, which t(K−1) pays for (t = 4.30 at K = 3). A
percentile bootstrap that resamples K = 3 worlds cannot reach past the lowest or highest world mean:
each extreme resample (all three draws the same world) has probability 1/27 > 2.5 %, so its 95 %
interval is [min, max] of the world means (a little wider from the within-world resampling) and decides
a direction whenever the three worlds agree in sign — which three coin flips do 25 % of the time. The
t-interval is wide at K = 3 because three worlds say little; a reader needs that, not a narrow interval.

Claim rules (fixed before a run; `CLAIM_RULES` is printed with every table). Each claim has one or
more *parts*, a difference of one metric between two objectives, and a kind:

  below   the claim says a < b:      interval wholly below 0 → supported; wholly above 0 → contradicted
  above   the claim says a > b:      interval wholly above 0 → supported; wholly below 0 → contradicted
  equal   the claim says a ≈ b (|a − b| ≤ margin): interval inside [−margin, +margin] → supported;
          wholly outside it → contradicted (an equivalence test: "contains 0" alone would let a noisy,
          wide interval pass)

and anything else is open. A claim is **reproduced** when every part is supported, **not reproduced**
when any part is contradicted, and **not decided** otherwise. The same rule decides each world alone
from its own run seeds (a 95 % Welch interval), shown beside the verdict over worlds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
C1_MARGIN = 5.0  # CHAIR points: "about as well" (the paper's smallest Table 2 step on CHAIR_s is 4.0, its mDPO–DPO gap 17.3)
VERDICTS = ("reproduced", "not reproduced", "not decided")


@dataclass(frozen=True)
class Claim:
    """One claim of the paper: parts (a, b, metric) on the difference metric(a) − metric(b), one kind for all."""

    key: str
    text: str
    kind: str  # below | above | equal
    parts: tuple[tuple[str, str, str], ...]
    margin: float = 0.0  # kind equal only
    shown: tuple[tuple[str, str, str], ...] = ()  # reported beside the verdict, not part of it


CLAIMS = (
    Claim("C1", "DPO without the image scores about as well as DPO", "equal",
          (("dpo_no_image", "dpo", "chair_s"), ("dpo_no_image", "dpo", "chair_i")), margin=C1_MARGIN),
    Claim("C2", "mDPO hallucinates less than DPO (CHAIR_s and CHAIR_i)", "below",
          (("mdpo", "dpo", "chair_s"), ("mdpo", "dpo", "chair_i")), shown=(("mdpo", "dpo", "recall"),)),
    Claim("C3", "removing the conditional term hurts more than removing the anchor (CHAIR_s)", "above",
          (("mdpo_no_conditional", "mdpo_no_anchor", "chair_s"),)),
    Claim("C4", "mDPO is below both ablations (CHAIR_s)", "below",
          (("mdpo", "mdpo_no_conditional", "chair_s"), ("mdpo", "mdpo_no_anchor", "chair_s"))),
)
CLAIM_RULES = f"""Rules, fixed before any run. A world = one draw of scenes, SFT model and pairs; per world the
mean difference over its run seeds; the verdict uses the 95 % t-interval over the world means
(t with K − 1 degrees of freedom); each world alone is decided the same way from a 95 % Welch interval
over its run seeds. Reproduced: every part supported; not reproduced: any part contradicted (interval on
the wrong side); not decided: otherwise (with one world there is no interval over worlds: not decided).
C1 "DPO without the image scores about as well as DPO": supported if the interval of
   CHAIR_s(DPO no image) − CHAIR_s(DPO), and that of CHAIR_i, lies inside ±{C1_MARGIN:g} points;
   contradicted if it lies wholly outside.
C2 "mDPO hallucinates less than DPO": supported if the intervals of CHAIR_s(mDPO) − CHAIR_s(DPO) and of
   CHAIR_i lie below 0, contradicted if above. Recall is reported beside it (a model can lower CHAIR by
   saying less).
C3 "the conditional term is the larger part of the gain": supported if the interval of
   CHAIR_s(mDPO − conditional) − CHAIR_s(mDPO − anchor) lies above 0, contradicted if below.
C4 "each component helps": supported if the intervals of CHAIR_s(mDPO) − CHAIR_s(each ablation) lie
   below 0, contradicted if above."""


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t (table; between entries the next smaller df, i.e. wider)."""
    if df <= 0:
        return float("nan")
    return T975[max(k for k in T975 if k <= df)] if df < 30 else 1.96


def mean_ci(values: list[float]) -> dict:
    """mean and the half-width of its 95 % t-interval (nan below 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": float("nan"), "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci": t975(n - 1) * sd / math.sqrt(n), "n": n, "values": values}


def diff_ci(a: list[float], b: list[float]) -> dict:
    """mean(a) − mean(b) with a 95 % Welch interval (one world's run seeds)."""
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


def between_worlds(world_diffs: list[float]) -> dict:
    """The mean of K per-world mean differences with its 95 % t-interval over worlds (df K − 1)."""
    s = mean_ci(world_diffs)
    return {"diff": s["mean"], "low": s["mean"] - s["ci"], "high": s["mean"] + s["ci"], "worlds": len(world_diffs)}


def decide_part(kind: str, interval: dict, margin: float = 0.0) -> str:
    """supported | contradicted | open, for one difference's interval (nan bounds: open)."""
    low, high = interval["low"], interval["high"]
    if math.isnan(low) or math.isnan(high):
        return "open"
    if kind == "below":
        return "supported" if high < 0 else "contradicted" if low > 0 else "open"
    if kind == "above":
        return "supported" if low > 0 else "contradicted" if high < 0 else "open"
    if kind == "equal":
        return "supported" if -margin <= low and high <= margin else "contradicted" if low > margin or high < -margin else "open"
    raise ValueError(f"claim kind {kind!r} must be below, above or equal")


def verdict(decisions: list[str]) -> str:
    if any(d == "contradicted" for d in decisions):
        return "not reproduced"
    return "reproduced" if decisions and all(d == "supported" for d in decisions) else "not decided"


def claims(per_world: dict[object, dict[str, dict[str, list[float]]]]) -> list[dict]:
    """Every claim of CLAIMS decided over worlds.

    per_world: world -> variant -> metric -> the values of that world's run seeds.
    Returns one dict per claim: `verdict` over worlds, and per part (and per shown difference: `part`
    False) `a`, `b`, `metric`, its interval over worlds (`diff`, `low`, `high`, `worlds`), its
    `decision` (None for a shown difference), and `per_world`: world -> the
    world's Welch difference over its run seeds with that world's own `decision`; `world_verdicts`:
    world -> the claim's verdict from that world alone.
    """
    worlds = list(per_world)
    out = []
    for claim in CLAIMS:
        numbers = {}
        for a, b, metric in claim.parts + claim.shown:
            per = {w: diff_ci(per_world[w][a][metric], per_world[w][b][metric]) for w in worlds}
            across = between_worlds([per[w]["diff"] for w in worlds])
            gated = (a, b, metric) in claim.parts
            across["decision"] = decide_part(claim.kind, across, claim.margin) if gated else None
            for w in worlds:
                per[w]["decision"] = decide_part(claim.kind, per[w], claim.margin) if gated else None
            numbers[_part_name(claim, a, b, metric)] = {**across, "a": a, "b": b, "metric": metric, "part": gated,
                                                        "per_world": per}
        parts = [n for n in numbers.values() if n["part"]]
        out.append({"claim": f"{claim.key} {claim.text}", "key": claim.key, "kind": claim.kind, "margin": claim.margin,
                    "verdict": verdict([n["decision"] for n in parts]), "numbers": numbers,
                    "world_verdicts": {w: verdict([n["per_world"][w]["decision"] for n in parts]) for w in worlds}})
    return out


def _part_name(claim: Claim, a: str, b: str, metric: str) -> str:
    """chair_s, chair_i, recall -- or `vs_<b>` where one claim compares one metric against several b."""
    same_metric = sum(1 for p in claim.parts if p[2] == metric) > 1
    return f"vs_{b}" if same_metric else metric
