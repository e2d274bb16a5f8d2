"""How close a module must come to its port of the reference code (the ``*_reference`` tests),
values and gradients alike.

* float64: ``torch.testing.assert_close`` with rtol and atol 1e-7: the two compute the same
  function and differ by rounding only (about 1e-14 here);
* float32: a relative error of 1e-4 in the Frobenius norm, ||ours - reference|| <= 1e-4
  ||reference||: summation orders differ (a linear layer against a 1x1 convolution, a GRU
  cell against a GRU, packed against padded sequences), and batch norms amplify the
  rounding of stacked layers to about 1e-5. A parameter's gradient is measured against the
  norm of all the module's gradients at least (:func:`assert_same_grads`).
"""

import torch
from torch import nn

DTYPES = [torch.float32, torch.float64]
F32_RELATIVE = 1e-4


def assert_near(actual: torch.Tensor, expected: torch.Tensor, what: str = "",
                scale: float = 0.0) -> None:
    """The module docstring's tolerance for ``actual``'s dtype; in float32 relative to
    ``scale`` when that is larger than ||expected||; integer tensors (batch norm's counter)
    equal."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    actual, expected = actual.detach(), expected.detach()
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-7,
                                   msg=lambda m: f"{what}: {m}")
        return
    error = float((actual - expected).norm())
    bound = F32_RELATIVE * max(float(expected.norm()), scale)
    assert error <= bound, f"{what}: error {error:.2e} > {bound:.2e}"


def assert_same_grads(module: nn.Module, rename, reference: nn.Module) -> None:
    """Every parameter's gradient in ``module`` against that of its counterpart in
    ``reference`` (``rename``: our parameter name -> the reference's); in float32 relative
    to the norm of all the reference's gradients at least (the bias of a linear layer before
    a batch norm in training has a zero gradient, which both compute as rounding noise)."""
    theirs = dict(reference.named_parameters())
    grads = [p.grad.flatten() for p in theirs.values() if p.grad is not None]
    scale = float(torch.cat(grads).norm())
    for name, param in module.named_parameters():
        assert_near(param.grad, theirs[rename(name)].grad.reshape(param.shape), name, scale)


def randomise_norms(module: nn.Module, seed: int = 1) -> None:
    """Give every BatchNorm1d of ``module`` random affine weights and running statistics
    (they start at 1, 0, 0, 1: an Rs-GCN layer would be the identity, a batch norm in eval
    mode nearly so), drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen)
            m.running_mean = torch.randn(n, generator=gen) * 0.1
            m.running_var = torch.rand(n, generator=gen) + 0.5
