"""Frozen linear layers whose weights stay in float8 (as ComfyUI loaded them) and compute in a wider dtype.

The weight is widened for each matrix product and never kept wide: the backward pass widens it again to carry
the gradient to the layer's input (LoRA on top of the layer and the concept rows below it still learn), so a
model never has a second, wider copy of its frozen weights. Layers subclass `torch.nn.Linear`, so PEFT wraps
them with LoRA as any linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class _Float8Product(torch.autograd.Function):
    """x @ w.T + b with w stored in float8: saves the float8 weight, not a widened copy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class FrozenFloat8Linear(torch.nn.Linear):
    """A frozen linear layer with a float8 weight, computing in `compute_dtype`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Product.apply(x.to(self.compute_dtype), self.weight, self.bias)


def keep_float8_linears(module: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every linear layer of `module` whose weight is float8 by a FrozenFloat8Linear over the same
    tensors; returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype in FLOAT8:
                setattr(parent, name, FrozenFloat8Linear(child.weight.data, child.bias, compute_dtype))
                replaced += 1
    return replaced


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: its first parameter's that is not float8."""
    return next(p.dtype for p in module.parameters() if p.dtype not in FLOAT8)
