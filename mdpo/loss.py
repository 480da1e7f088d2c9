"""The mDPO objective (Wang et al., 2024, "mDPO: Conditional Preference Optimization for
Multimodal Large Language Models"), as a drop-in module.

Rows follow the batch layout [chosen c | rejected r | corrupted k], B each. With policy and
reference sequence log-probs π, ρ and implicit rewards r_x = β·(π_x − ρ_x):

    L_DPO   = −log σ(r_c − r_r)                  standard DPO on (m_w, y_w) vs (m_w, y_l)
    L_CoPO  = −log σ(r_c − r_k)                  conditional preference: only the image differs
    L_AncPO = −log σ(r_c − δ)                    anchor: keeps the chosen reward above δ
    L_mDPO  = mean_i (w_dpo·L_DPO + w_copo·L_CoPO + w_anc·L_AncPO)          (paper: all weights 1)

Optional extra anchors (paper, Table 4): −log σ(δ_r − r_r) on the rejected response and
−log σ(δ_k − r_k) on the corrupted image, each added with weight 1 when its δ is given.

`sft` is supervised fine-tuning on the chosen responses (rows [chosen], B): no reference, and
L_SFT = mean_i −(1/|y_i|) Σ_t log π(y_i,t | m, x, y_i,<t), the per-row mean token NLL averaged over
rows (the trainer asks the scorer for length-averaged log-probs for it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Objective:
    """Which terms an objective trains and whether the corrupted branch is computed at all."""

    dpo: float
    conditional: float
    anchor: float
    has_corrupted: bool
    sft: bool = False  # supervised fine-tuning on the chosen rows only: no rejected row, no reference

    @property
    def branches(self) -> tuple[str, ...]:
        if self.sft:
            return ("chosen",)
        return ("chosen", "rejected", "corrupted") if self.has_corrupted else ("chosen", "rejected")

    @property
    def needs_reference(self) -> bool:
        return not self.sft


# `dpo_no_image` is plain DPO on text-only rows (the images are removed by the data collator).
OBJECTIVES: dict[str, Objective] = {
    "mdpo": Objective(1.0, 1.0, 1.0, has_corrupted=True),
    "dpo": Objective(1.0, 0.0, 0.0, has_corrupted=False),
    "dpo_no_image": Objective(1.0, 0.0, 0.0, has_corrupted=False),
    "mdpo_no_conditional": Objective(1.0, 0.0, 1.0, has_corrupted=False),
    "mdpo_no_anchor": Objective(1.0, 1.0, 0.0, has_corrupted=True),
    "sft": Objective(0.0, 0.0, 0.0, has_corrupted=False, sft=True),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def sft_loss(policy_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT loss from the chosen rows' length-averaged log-probs (B,): the mean token NLL, averaged over rows.

    returns: the scalar loss and detached 0-dim metrics (`loss/total`, `loss/sft`, `logps/chosen`).
    """
    if policy_logps.dim() != 1 or policy_logps.shape[0] == 0:
        raise ValueError(f"policy_logps must be 1-D with one entry per chosen row; got shape {tuple(policy_logps.shape)}")
    logps = policy_logps.float()
    loss = -logps.mean()
    metrics = {"loss/total": loss, "loss/sft": loss, "logps/chosen": logps.mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


def _split_branches(values: torch.Tensor, n_branches: int, name: str) -> list[torch.Tensor]:
    if values.dim() != 1 or values.shape[0] % n_branches or values.shape[0] == 0:
        raise ValueError(
            f"{name} must be 1-D with {n_branches}·B entries laid out as "
            f"[chosen | rejected{' | corrupted' if n_branches == 3 else ''}]; got shape {tuple(values.shape)}"
        )
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return list(values.chunk(n_branches))


def mdpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
    objective: str = "mdpo",
    weights: tuple[float, float, float] | None = None,
    rejected_anchor: float | None = None,
    corrupted_anchor: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mDPO loss from per-sequence log-probs.

    policy_logps, ref_logps: (3B,) for objectives with a corrupted branch, (B,) for sft (ref_logps ignored), else (2B,).
    weights: (w_dpo, w_copo, w_anc); defaults to the objective's own (mdpo: 1, 1, 1).
    returns: the scalar loss and detached 0-dim metric tensors (no host sync).
    """
    spec = get_objective(objective)
    if spec.sft:  # no reference: ref_logps is ignored (may be None)
        return sft_loss(policy_logps)
    w_dpo, w_copo, w_anc = weights if weights is not None else (spec.dpo, spec.conditional, spec.anchor)
    if corrupted_anchor is not None and not spec.has_corrupted:
        raise ValueError(f"corrupted_anchor needs the corrupted branch, which objective={objective!r} does not compute")
    n = len(spec.branches)
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ in shape")
    pol = _split_branches(policy_logps, n, "policy_logps")
    ref = _split_branches(ref_logps.to(policy_logps.device), n, "ref_logps")
    rewards = [beta * (p - r) for p, r in zip(pol, ref)]
    r_c, r_r = rewards[0], rewards[1]

    # −log σ(x) = softplus(−x), numerically stable for large |x|.
    loss_dpo = F.softplus(-(r_c - r_r))
    loss_anchor = F.softplus(-(r_c - delta))
    per_pair = w_dpo * loss_dpo + w_anc * loss_anchor
    metrics = {"loss/dpo": loss_dpo.mean(), "loss/anchor": loss_anchor.mean()}
    if spec.has_corrupted:
        r_k = rewards[2]
        loss_cond = F.softplus(-(r_c - r_k))
        per_pair = per_pair + w_copo * loss_cond
        metrics["loss/conditional"] = loss_cond.mean()
    if rejected_anchor is not None:
        loss_anc_r = F.softplus(-(rejected_anchor - r_r))
        per_pair = per_pair + loss_anc_r
        metrics["loss/anchor_rejected"] = loss_anc_r.mean()
    if corrupted_anchor is not None:
        loss_anc_k = F.softplus(-(corrupted_anchor - rewards[2]))
        per_pair = per_pair + loss_anc_k
        metrics["loss/anchor_corrupted"] = loss_anc_k.mean()
    loss = per_pair.mean()

    metrics.update(
        {
            "loss/total": loss,
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (r_c > r_r).float().mean(),
            "logps/chosen": pol[0].mean(),
            "logps/rejected": pol[1].mean(),
        }
    )
    if spec.has_corrupted:
        metrics.update(
            {
                "rewards/corrupted": rewards[2].mean(),
                "rewards/conditional_margins": (r_c - rewards[2]).mean(),
                "rewards/conditional_accuracies": (r_c > rewards[2]).float().mean(),
                "logps/corrupted": pol[2].mean(),
            }
        )
    return loss, {k: v.detach() for k, v in metrics.items()}


class MDPOLoss(torch.nn.Module):
    """mDPO loss as a module. Call with keyword arguments, in one of three input forms:

        loss(policy_logps=..., ref_logps=...)                       # per-sequence log-probs
        loss(logits=..., labels=..., ref_logps=...)                 # fused `sequence_logprobs`
        loss(hidden=..., lm_head_weight=..., labels=..., ref_logps=...)   # fused LM head, no logits

    Rows are [chosen | rejected | corrupted] (3B), or [chosen | rejected] (2B) for objectives
    without a corrupted branch (`dpo`, `dpo_no_image`, `mdpo_no_conditional`).
    Returns (loss, metrics) with detached metric tensors.
    """

    def __init__(
        self,
        beta: float = 0.1,
        delta: float = 0.0,
        objective: str = "mdpo",
        dpo_weight: float | None = None,
        conditional_weight: float | None = None,
        anchor_weight: float | None = None,
        rejected_anchor: float | None = None,
        corrupted_anchor: float | None = None,
        ignore_index: int = -100,
        average_logprobs: bool = False,
        impl: str | None = None,
    ):
        super().__init__()
        spec = get_objective(objective)
        self.objective, self.beta, self.delta = objective, beta, delta
        self.weights = (
            spec.dpo if dpo_weight is None else dpo_weight,
            spec.conditional if conditional_weight is None else conditional_weight,
            spec.anchor if anchor_weight is None else anchor_weight,
        )
        self.rejected_anchor, self.corrupted_anchor = rejected_anchor, corrupted_anchor
        self.ignore_index, self.average_logprobs, self.impl = ignore_index, average_logprobs, impl

    def policy_logps(self, *, policy_logps=None, logits=None, labels=None, hidden=None, lm_head_weight=None, lm_head_bias=None):
        forms = {"policy_logps": policy_logps is not None, "logits": logits is not None, "hidden": hidden is not None}
        if sum(forms.values()) != 1:
            raise ValueError(f"pass exactly one of policy_logps, logits (+ labels), hidden (+ lm_head_weight, labels); got {[k for k, v in forms.items() if v] or 'none'}")
        if policy_logps is not None:
            return policy_logps
        if labels is None:
            raise ValueError("labels are required with logits or hidden")
        if logits is not None:
            from mdpo_kernels import sequence_logprobs

            return sequence_logprobs(logits, labels, ignore_index=self.ignore_index, average=self.average_logprobs, impl=self.impl)
        if lm_head_weight is None:
            raise ValueError("lm_head_weight is required with hidden")
        from mdpo_kernels import linear_sequence_logprobs

        return linear_sequence_logprobs(
            hidden, lm_head_weight, labels, bias=lm_head_bias, ignore_index=self.ignore_index,
            average=self.average_logprobs, impl=self.impl,
        )

    def forward(self, *, ref_logps, policy_logps=None, logits=None, labels=None, hidden=None, lm_head_weight=None, lm_head_bias=None):
        pol = self.policy_logps(
            policy_logps=policy_logps, logits=logits, labels=labels, hidden=hidden,
            lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias,
        )
        return mdpo_loss(
            pol, ref_logps, beta=self.beta, delta=self.delta, objective=self.objective, weights=self.weights,
            rejected_anchor=self.rejected_anchor, corrupted_anchor=self.corrupted_anchor,
        )

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}, beta={self.beta}, delta={self.delta}, weights={self.weights}"
