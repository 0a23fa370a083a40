"""Relevance rules of Chefer et al. 2021 as pure tensor functions (no autograd, no modules).

Every rule takes the forward values it needs plus the relevance at the operation's output and
returns the relevance at its input(s). Each one conserves relevance exactly in exact arithmetic,
except where a denominator is exactly zero (the relevance there has no input to go to and is
dropped, which is what :func:`safe_divide` encodes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0``.

    Chefer's version adds a 1e-9 stabiliser; an exact-zero test keeps the division exact and
    only drops relevance that has nowhere to go (e.g. rows of zero padding).
    """
    return (num / den).masked_fill_(den == 0, 0)


def linear_relevance(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, relevance: Tensor) -> Tensor:
    """alpha=1/beta=0 rule of a Linear that gave ``out = x @ weight.T + bias``; the bias is excluded.

    ``R_in = x⁺⊙(W⁺ᵀS) + x⁻⊙(W⁻ᵀS)``, ``S = R / (W⁺x⁺ + W⁻x⁻)``. Computed through the identities
    ``2(W⁺x⁺ + W⁻x⁻) = Wx + |W||x|`` and ``2(x⁺⊙W⁺ᵀS + x⁻⊙W⁻ᵀS) = x⊙WᵀS + |x|⊙|W|ᵀS`` (the
    factors 2 cancel), reusing the forward's ``Wx``: two matmuls instead of four.
    """
    x_abs, w_abs = x.abs(), weight.abs()
    z = F.linear(x_abs, w_abs, None if bias is None else -bias).add_(out)  # Wx + |W||x|
    s = safe_divide(relevance, z)
    both = s @ torch.cat([weight, w_abs], dim=1)  # [WᵀS, |W|ᵀS] in one matmul
    n_in = weight.shape[1]
    return (x * both[..., :n_in]).addcmul_(x_abs, both[..., n_in:])


def matmul_relevance(a: Tensor, b: Tensor, z: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """z-rule on both operands of ``z = a @ b``, each operand getting half (Chefer halves both).

    The z-rule gives each operand the whole relevance of ``z``; halving makes the two shares add
    up to it again.
    """
    s = safe_divide(relevance, z).mul_(0.5)
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


def residual_relevance(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of the two summands of ``a + b`` (dim 0 is the image).

    z-rule on each summand, then each branch is rescaled so that its total is the share
    ``|sum_a| / (|sum_a| + |sum_b|)`` of the incoming total (Chefer's ``Add.relprop``). Chefer sums
    over the whole tensor; the sums here are per image so that a batch gives the same relevance
    as its images one by one.
    """
    s = safe_divide(relevance, a + b)
    rel_a, rel_b = a * s, b * s
    dims = tuple(range(1, relevance.dim()))
    shape = (-1,) + (1,) * len(dims)
    sum_a, sum_b = rel_a.sum(dims), rel_b.sum(dims)
    per_abs = safe_divide(relevance.sum(dims), sum_a.abs() + sum_b.abs())
    return rel_a * (sum_a.sign() * per_abs).view(shape), rel_b * (sum_b.sign() * per_abs).view(shape)


def mean_pool_relevance(x: Tensor, relevance: Tensor, dims: tuple[int, ...]) -> Tensor:
    """z-rule of a mean over ``dims`` (Chefer's ``AdaptiveAvgPool2d``): each input in proportion to its value.

    ``relevance`` has the shape of ``x.mean(dims, keepdim=True)``. After the head's alpha1/beta0
    rule a pooled value's relevance is proportional to that value, so the ratio is bounded even
    where the mean is near zero. (Treating the pool as an alpha1/beta0 Linear instead would give
    negative tokens nothing and drop the relevance of every channel whose tokens are all
    negative: 14% of it on a random tiny Swin.)
    """
    return x * safe_divide(relevance, x.sum(dims, keepdim=True))
