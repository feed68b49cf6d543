"""The merge methods: small pure functions on tensors, one formula each (no I/O, no global state).

Per tensor, with the base ``theta_0``, experts ``theta_1..theta_n``, their weights ``w_i`` and task vectors
``tau_i = theta_i - theta_0``::

    linear            sum_i w_i theta_i                                     model soups (Wortsman et al. 2022)
    task_arithmetic   theta_0 + lambda * sum_i w_i tau_i                    Ilharco et al. 2023, "Editing models
                                                                            with task arithmetic"
    ties              theta_0 + lambda * disjoint_mean(elect(trim(tau)))    Yadav et al. 2023, "TIES-Merging"
    dare_linear       theta_0 + lambda * sum_i w_i dare(tau_i)              Yu et al. 2024, "Language models are
    dare_ties         theta_0 + lambda * disjoint_mean(elect(dare(tau)))    Super Mario" (DARE)

A TIES example on one entry of three experts (equal weights, nothing trimmed)::

    tau_1 = +0.3   tau_2 = -0.1   tau_3 = +0.5     elected sign = sign(0.3 - 0.1 + 0.5) = +1
    agreeing: experts 1 and 3                     disjoint mean = (0.3 + 0.5) / 2 = 0.4

The weights enter TIES as a weighted sign election and a weighted disjoint mean (equal weights give the
paper's unweighted rule). Every function computes in the dtype it is given; the caller passes float32.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def normalized(weights: Sequence[float]) -> list[float]:
    """``w_i / sum_j w_j`` (the caller checks that the sum is not 0)."""
    total = math.fsum(weights)
    return [w / total for w in weights]


def linear(thetas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted average of whole weights: ``sum_i w_i theta_i`` (normalise the weights first for a mean).

    When every expert holds the same tensor, that tensor is returned unchanged: the float sum would round
    (``3 * (x / 3) != x``), and a tensor no expert changed should leave the merge bit-identical.
    """
    if all(torch.equal(thetas[0], t) for t in thetas[1:]):
        return thetas[0].clone()
    out = thetas[0] * weights[0]
    for theta, w in zip(thetas[1:], weights[1:]):
        out.add_(theta * w)
    return out


def task_arithmetic(base: Tensor, taus: Sequence[Tensor], weights: Sequence[float], lam: float) -> Tensor:
    """``theta_0 + lambda * sum_i w_i tau_i`` (Ilharco et al. 2023). ``lambda = 0`` returns the base exactly."""
    total = taus[0] * weights[0]
    for tau, w in zip(taus[1:], weights[1:]):
        total.add_(tau * w)
    return base + lam * total


def top_k_count(density: float, numel: int) -> int:
    """``k = ceil(density * numel)``, computed on the decimal the user wrote (``0.3 * 10`` is 3, not 4)."""
    return min(numel, math.ceil(Fraction(repr(float(density))) * numel))


def trim(tau: Tensor, density: float) -> Tensor:
    """TIES step 1: keep the ``k = ceil(density * numel)`` entries of largest ``|tau|``, zero the rest.

    Ties at the threshold: when several entries share the k-th largest magnitude, they are kept in flat
    (row-major) index order until exactly ``k`` are kept, so the result never depends on a sort's whims.
    ``density = 1`` keeps everything.

    Args:
        tau: one expert's task vector for one tensor (any shape).
        density: fraction of entries to keep, in (0, 1].
    """
    n = tau.numel()
    k = top_k_count(density, n)
    if k >= n:
        return tau.clone()
    magnitude = tau.abs().flatten()  # (numel,)
    threshold = magnitude.kthvalue(n - k + 1).values  # the k-th largest magnitude
    keep = magnitude >= threshold
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # a tie at the threshold: keep only the first (ties - extra) of the tied entries, in index order
        tied = magnitude == threshold
        keep &= ~tied | (torch.cumsum(tied, 0) <= int(torch.count_nonzero(tied)) - extra)
    return torch.where(keep.view_as(tau), tau, 0.0)


def elect_sign(taus: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES step 2: the sign of ``sum_i w_i tau_i`` per entry, i.e. the sign with the larger (weighted) total
    magnitude. It is 0 where that sum is exactly 0: a tie between signs, or no expert changed the entry.
    """
    total = taus[0] * weights[0]
    for tau, w in zip(taus[1:], weights[1:]):
        total.add_(tau * w)
    return torch.sign(total)


def disjoint_mean(taus: Sequence[Tensor], sign: Tensor, weights: Sequence[float]) -> Tensor:
    """TIES step 3: per entry, the weighted mean over the experts whose value is non-zero AND has the elected
    sign: ``sum_i w_i a_i tau_i / sum_i w_i a_i`` with ``a_i = [tau_i != 0 and sign(tau_i) == sign]``.

    An entry with no agreeing expert (sign 0, or every value zero) is 0, so the merge keeps the base there.
    Weights must be positive.
    """
    numerator = torch.zeros_like(taus[0])
    denominator = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        agrees = (tau * sign > 0).to(tau.dtype)  # 1 where tau is non-zero with the elected sign (sign 0: nobody)
        numerator.addcmul_(tau, agrees, value=w)
        denominator.add_(agrees, alpha=w)
    denominator[denominator == 0] = 1.0  # no agreeing expert: the numerator is 0 there, and so is the mean
    return numerator.div_(denominator)


def ties(base: Tensor, taus: Sequence[Tensor], weights: Sequence[float], lam: float,
         densities: Optional[Sequence[float]] = None) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): ``theta_0 + lambda * disjoint_mean(elect(trim(tau)))``.

    Args:
        densities: per expert, the fraction kept by :func:`trim`; None skips trimming (dare_ties, whose
            task vectors DARE already sparsified).
    """
    trimmed = [trim(t, d) for t, d in zip(taus, densities)] if densities is not None else list(taus)
    sign = elect_sign(trimmed, weights)
    return base + lam * disjoint_mean(trimmed, sign, weights)


def tensor_seed(seed: int, expert: int, name: str) -> int:
    """The DARE mask seed of one (expert, tensor): a stable hash, the same on every machine and run.

    ``sha256("<seed>/<expert index>/<tensor name>")``, first 8 bytes little-endian, top bit cleared (a
    non-negative int64 for ``torch.Generator.manual_seed``). Python's ``hash`` would change per process.
    """
    digest = hashlib.sha256(f"{seed}/{expert}/{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def keep_mask(shape: Sequence[int], drop_rate: float, seed: int) -> Tensor:
    """DARE's Bernoulli mask: True (kept) with probability ``1 - drop_rate``, from a CPU ``torch.Generator``
    seeded with ``seed``; the same seed gives the same mask on every machine."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator) >= drop_rate


def dare(tau: Tensor, drop_rate: float, keep: Tensor) -> Tensor:
    """DARE (Yu et al. 2024): drop entries, rescale the survivors: ``tau * keep / (1 - p)``.

    The rescaling keeps the expected value of every entry (``E[dare(tau)] = tau``). ``drop_rate`` p is in
    [0, 1); ``keep`` comes from :func:`keep_mask` (or a test).
    """
    return torch.where(keep, tau / (1.0 - drop_rate), 0.0)


def merge_tensor(method: str, name: str, base: Optional[Tensor], thetas: Sequence[Tensor], weights: Sequence[float],
                 *, lam: float = 1.0, densities: Optional[Sequence[float]] = None,
                 drop_rates: Optional[Sequence[float]] = None, seed: int = 0) -> Tensor:
    """One tensor of the merge by ``method``, from the experts' whole weights ``thetas``.

    Args:
        method: linear | task_arithmetic | ties | dare_linear | dare_ties.
        name: the tensor's name (seeds DARE's masks).
        base: the base tensor (None only for linear).
        weights: per expert, already normalised where the method asks for it.
        densities: per expert (ties); drop_rates: per expert (dare_*); seed: DARE's seed.
    """
    if method == "linear":
        return linear(thetas, weights)
    assert base is not None, f"{method} needs the base tensor"
    taus = []
    for i, theta in enumerate(thetas):  # one expert at a time, so only the final task vectors are held
        tau = theta - base
        if method.startswith("dare_"):
            tau = dare(tau, drop_rates[i], keep_mask(tau.shape, drop_rates[i], tensor_seed(seed, i, name)))
        elif method == "ties":
            tau = trim(tau, densities[i])
        taus.append(tau)
    if method in ("ties", "dare_ties"):
        return base + lam * disjoint_mean(taus, elect_sign(taus, weights), weights)
    if method in ("task_arithmetic", "dare_linear"):
        return task_arithmetic(base, taus, weights, lam)
    raise AssertionError(f"unknown merge method {method!r}")
