"""A small end-to-end check of the fused path: `python -m mdpo.demo`.

Builds a synthetic [chosen | rejected | corrupted] batch of logits and labels, computes the mDPO
loss through the fused `sequence_logprobs` and through the fp32 reference, and prints the loss,
the metrics and how far the two paths agree (values and gradients).
"""
from __future__ import annotations

import argparse

import torch

from mdpo import MDPOLoss
from mdpo_kernels import dispatch, sequence_logprobs_ref


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rows = 3 * args.pairs
    logits = torch.randn(rows, args.seq_len, args.vocab) * 2
    labels = torch.randint(0, args.vocab, (rows, args.seq_len))
    labels[:, : args.seq_len // 2] = -100  # image + prompt tokens carry no label
    ref_logps = sequence_logprobs_ref(logits + 0.1 * torch.randn_like(logits), labels)

    criterion = MDPOLoss()
    fused_in = logits.clone().requires_grad_()
    loss, metrics = criterion(logits=fused_in, labels=labels, ref_logps=ref_logps)
    loss.backward()
    plain_in = logits.clone().requires_grad_()
    loss_ref, _ = criterion(policy_logps=sequence_logprobs_ref(plain_in, labels), ref_logps=ref_logps)
    loss_ref.backward()

    impl = dispatch.resolve_impl(logits.device)
    print(f"mDPO demo: {args.pairs} pairs x 3 branches, T={args.seq_len}, V={args.vocab}, fused impl={impl}")
    for key, value in metrics.items():
        print(f"  {key:32s} {value.item(): .6f}")
    value_err = (loss - loss_ref).abs().item()
    grad_err = (fused_in.grad - plain_in.grad).abs().max().item()
    print(f"  fused loss {loss.item():.6f} vs reference {loss_ref.item():.6f}: |diff| {value_err:.2e}, max |grad diff| {grad_err:.2e}")
    ok = value_err < 1e-4 and grad_err < 1e-5
    print("agreement: OK" if ok else "agreement: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
