"""Gradient clipping and optimiser steps for parameter groups updated more than once per
step.

A group's ``"repeats"`` (default 1) says how many times its parameters stand in the
optimiser. VSRN's reference lists its caption encoder's and decoder's parameters twice in
the list it hands Adam (``model.py``: ``decoder``, ``encoder`` and then ``caption_model``,
which holds both), and clips with PyTorch 0.4's ``clip_grad_norm`` over that list. Listed
twice, a parameter

* counts twice in the total gradient norm (its squared norm is summed twice);
* is scaled by the clip factor twice when the gradients are clipped (the clip multiplies
  every listed gradient in place);
* gets two full Adam updates per step, one after the other, with the same gradient: its
  moments and step count advance twice (about twice the step of a parameter listed once).

:func:`clip_gradients` and :func:`optimizer_step` do the same for a group with
``"repeats": 2`` without handing the optimiser a parameter twice (which PyTorch warns will
become an error, and which its multi-tensor kernels do not update one after the other).
With every group at 1 they are ``clip_grad_norm_`` and ``optimizer.step()``.
"""

import torch


def _repeats(group: dict) -> int:
    return int(group.get("repeats", 1))


@torch.no_grad()
def clip_gradients(groups: list[dict], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``groups`` (an optimiser's parameter groups) so that their
    total L2 norm, each parameter counted ``repeats`` times, is at most ``max_norm``; a
    parameter's gradient is scaled ``repeats`` times. Returns the total norm (0-d)."""
    if all(_repeats(g) == 1 for g in groups):  # torch's multi-tensor kernels
        return torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]],
                                              max_norm)
    listed = [(p.grad, _repeats(g)) for g in groups for p in g["params"] if p.grad is not None]
    if not listed:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm(grad) for grad, r in listed for _ in range(r)]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grad_norm_'s factor
    for grad, r in listed:
        for _ in range(r):
            grad.mul_(coef.to(grad.device))
    return total


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, then again for each group as many times as its ``repeats``
    says (the other groups' gradients are set to None first, so they are not stepped
    again). Call it after the backward pass; the next step's ``zero_grad`` follows."""
    optimizer.step()
    most = max(_repeats(g) for g in optimizer.param_groups)
    for done in range(1, most):
        for group in optimizer.param_groups:
            if _repeats(group) <= done:
                for p in group["params"]:
                    p.grad = None
        optimizer.step()


@torch.no_grad()
def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimiser would apply is finite (no fp16 overflow)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
