"""The optimizer: AdamW, with fp32 master weights when the trained parameters are bf16 / fp16.

Full fine-tuning of a bf16 model with plain AdamW loses most updates: an lr-1e-5 step moves a weight
of magnitude 0.02 by ~1e-5, far below half a bf16 ulp there (~6e-5), so the weight rounds back to
where it was (after 3 steps only a few % of the weights had changed at all). `MasterWeightAdamW`
keeps an fp32 copy of each low-precision parameter; AdamW updates the copies, and the model's
parameters are set to the copies rounded to their dtype after every step. The model still runs in
bf16 (the same numbers in training, the reference pass, evaluation and the saved weights).

Memory per trained parameter: 2 (bf16 weight) + 2 (bf16 grad) + 4 (fp32 master) + 8 (Adam moments)
= 16 bytes, 18 at the optimizer step while the fp32 gradients exist (each bf16 gradient is freed as
its fp32 copy is made). Gradients accumulate over micro-batches in the parameter's dtype, as DDP
reduces them; the optimizer arithmetic and the weights it accumulates are fp32.

LoRA needs none of this: peft keeps its adapter weights in fp32 over a bf16 base, and
`make_optimizer` returns a plain AdamW whenever every trained parameter is fp32.
"""
from __future__ import annotations

from typing import Iterable

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 copies of `params`; after each step the params hold the copies, rounded.

    params: the model's trainable parameters (any float dtype; fp32 ones are used as their own master).
    The state dict carries the master weights (`master_weights`, a list of tensors in parameter
    order), so a resumed run continues from the exact fp32 values, not from the rounded model.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], **kwargs):
        self.model_params = [p for p in params]
        masters = [p.detach().clone().float() if p.dtype in _LOW_PRECISION else p for p in self.model_params]
        super().__init__(masters, **kwargs)
        self.master_params = masters

    def _pairs(self):
        return [(p, m) for p, m in zip(self.model_params, self.master_params) if m is not p]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("MasterWeightAdamW.step takes no closure")
        for p, m in self._pairs():
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # free the low-precision gradient as its fp32 copy exists
        loss = super().step()
        for p, m in self._pairs():
            p.copy_(m)  # round to nearest
            m.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [m.detach() for m in self.master_params]
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is None:  # a checkpoint of a plain AdamW: start the masters from the model
            masters = [p.detach().float() for p in self.model_params]
        if len(masters) != len(self.master_params):
            raise ValueError(f"optimizer state holds {len(masters)} master weights for {len(self.master_params)} parameters")
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self.master_params, masters):
                m.copy_(saved.to(m.device))
                if m is not p:
                    p.copy_(m)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over `params`; `MasterWeightAdamW` when any of them is bf16 / fp16 (full fine-tuning)."""
    params = list(params)
    if any(p.dtype in _LOW_PRECISION for p in params):
        return MasterWeightAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
