"""The mDPO objective: hand-derived terms, reductions to DPO, gradients, metrics, input forms."""
import math

import pytest
import torch

from mdpo import MDPOLoss, mdpo_loss
from mdpo.loss import OBJECTIVES
from mdpo_kernels import sequence_logprobs_ref


def _nls(x: float) -> float:
    """−log σ(x), written out by hand."""
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def test_zero_rewards_give_three_ln2():
    z = torch.zeros(3 * 4)
    loss, metrics = mdpo_loss(z, z)
    assert loss.item() == pytest.approx(3 * math.log(2), abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 0.0


def test_hand_derived_terms_one_pair():
    # π = (c, r, k) = (-10, -14, -13), ρ = (-12, -12, -12), β = 0.5, δ = 0.3.
    pol = torch.tensor([-10.0, -14.0, -13.0])
    ref = torch.tensor([-12.0, -12.0, -12.0])
    beta, delta = 0.5, 0.3
    r_c, r_r, r_k = beta * 2, beta * -2, beta * -1
    loss, m = mdpo_loss(pol, ref, beta=beta, delta=delta)
    assert m["loss/dpo"].item() == pytest.approx(_nls(r_c - r_r), rel=1e-6)
    assert m["loss/conditional"].item() == pytest.approx(_nls(r_c - r_k), rel=1e-6)
    assert m["loss/anchor"].item() == pytest.approx(_nls(r_c - delta), rel=1e-6)
    assert loss.item() == pytest.approx(_nls(r_c - r_r) + _nls(r_c - r_k) + _nls(r_c - delta), rel=1e-6)


def test_weights_and_extra_anchors():
    pol = torch.tensor([-10.0, -14.0, -13.0])
    ref = torch.tensor([-12.0, -12.0, -12.0])
    r_c, r_r, r_k = 0.2, -0.2, -0.1
    loss, m = mdpo_loss(pol, ref, weights=(0.5, 2.0, 3.0), rejected_anchor=-0.4, corrupted_anchor=0.1)
    want = 0.5 * _nls(r_c - r_r) + 2.0 * _nls(r_c - r_k) + 3.0 * _nls(r_c) + _nls(-0.4 - r_r) + _nls(0.1 - r_k)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["loss/anchor_rejected"].item() == pytest.approx(_nls(-0.4 - r_r), rel=1e-6)
    assert m["loss/anchor_corrupted"].item() == pytest.approx(_nls(0.1 - r_k), rel=1e-6)


def test_reduces_to_standard_dpo():
    torch.manual_seed(1)
    b = 5
    pol, ref = torch.randn(3 * b) * 5, torch.randn(3 * b) * 5
    loss, _ = mdpo_loss(pol, ref, weights=(1.0, 0.0, 0.0))
    pc, pr = pol[:b], pol[b : 2 * b]
    rc, rr = ref[:b], ref[b : 2 * b]
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(loss, dpo)
    # ... and the `dpo` objective on 2B rows gives the same number.
    loss2, m2 = mdpo_loss(torch.cat([pc, pr]), torch.cat([rc, rr]), objective="dpo")
    torch.testing.assert_close(loss2, dpo)
    assert "rewards/corrupted" not in m2 and "loss/conditional" not in m2


def test_objective_switches():
    torch.manual_seed(2)
    pol, ref = torch.randn(6), torch.randn(6)
    full, m = mdpo_loss(pol, ref)
    no_anchor, _ = mdpo_loss(pol, ref, objective="mdpo_no_anchor")
    torch.testing.assert_close(no_anchor, m["loss/dpo"] + m["loss/conditional"])
    no_cond, _ = mdpo_loss(pol[:4], ref[:4], objective="mdpo_no_conditional")
    torch.testing.assert_close(no_cond, m["loss/dpo"] + m["loss/anchor"])
    torch.testing.assert_close(full, m["loss/dpo"] + m["loss/conditional"] + m["loss/anchor"])


def test_gradcheck_float64():
    torch.manual_seed(3)
    pol = torch.randn(9, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(9, dtype=torch.float64)
    fn = lambda p: mdpo_loss(p, ref, beta=0.7, delta=0.2, rejected_anchor=-0.1, corrupted_anchor=0.3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pol,))


def test_metrics_match_definitions():
    torch.manual_seed(4)
    b, beta = 7, 0.1
    pol, ref = torch.randn(3 * b) * 3, torch.randn(3 * b) * 3
    _, m = mdpo_loss(pol, ref, beta=beta)
    r = beta * (pol - ref)
    rc, rr, rk = r[:b], r[b : 2 * b], r[2 * b :]
    expect = {
        "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/corrupted": rk.mean(),
        "rewards/margins": (rc - rr).mean(), "rewards/conditional_margins": (rc - rk).mean(),
        "rewards/accuracies": (rc > rr).float().mean(), "rewards/conditional_accuracies": (rc > rk).float().mean(),
        "logps/chosen": pol[:b].mean(), "logps/rejected": pol[b : 2 * b].mean(), "logps/corrupted": pol[2 * b :].mean(),
    }
    for key, value in expect.items():
        torch.testing.assert_close(m[key], value, msg=key)
        assert not m[key].requires_grad


def test_logits_form_matches_logps_form():
    torch.manual_seed(5)
    b, t, v = 2, 9, 31
    logits = torch.randn(3 * b, t, v, requires_grad=True)
    labels = torch.randint(0, v, (3 * b, t))
    labels[:, :3] = -100
    ref = torch.randn(3 * b)
    crit = MDPOLoss(beta=0.3)
    fused, _ = crit(logits=logits, labels=labels, ref_logps=ref)
    plain, _ = crit(policy_logps=sequence_logprobs_ref(logits, labels), ref_logps=ref)
    torch.testing.assert_close(fused, plain)
    g1, = torch.autograd.grad(fused, logits)
    g2, = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy_logps": torch.zeros(5), "ref_logps": torch.zeros(5)}, "3·B entries"),
        ({"policy_logps": torch.zeros(6), "ref_logps": torch.zeros(3)}, "differ in shape"),
        ({"ref_logps": torch.zeros(6)}, "exactly one of"),
        ({"logits": torch.zeros(6, 2, 3), "ref_logps": torch.zeros(6)}, "labels are required"),
    ],
)
def test_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MDPOLoss()(**kwargs)


def test_bad_objective_and_anchor():
    with pytest.raises(ValueError, match="objective='ipo'"):
        MDPOLoss(objective="ipo")
    with pytest.raises(ValueError, match="corrupted_anchor"):
        mdpo_loss(torch.zeros(4), torch.zeros(4), objective="dpo", corrupted_anchor=0.0)
    assert set(OBJECTIVES) == {"mdpo", "dpo", "dpo_no_image", "mdpo_no_conditional", "mdpo_no_anchor", "sft"}
