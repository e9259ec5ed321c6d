"""Brute-force oracles for the proximal operator of the Lovász hinge. Test-only, tiny P.

Plain Python floats and bitmask subsets; no sorting trick, no sweep, nothing shared with the
numba kernels. For one segment with logits F, labels y ∈ {0, 1} (None = ignored) and step λ:

- :func:`prox_certificate` checks the optimality conditions of the prox directly on the
  definition (enumerating all 2^P subsets): with margins m0 = 1 − y±·F and m = 1 − y±·X,
  X = prox_λ(F) iff s = m0 − m satisfies s ≥ 0, s(A) ≤ λ Δ_J(A) for every set A of valid
  pixels, and ⟨s, m⟩ = λ Δ̄_J(relu(m)) (m − m0 is then in −λ ∂(Δ̄_J ∘ relu)(m), the problem
  being strongly convex the point is the unique prox).
- :func:`brute_prox` computes the prox with the generic divide-and-conquer algorithm for
  base polytopes, finding each most violated set by enumerating every subset of the block.
"""

from __future__ import annotations

import math

from reference.naive import jaccard_set_loss, lovasz_extension


def _members(mask: int, pixels: list[int]) -> set[int]:
    return {pixels[k] for k in range(len(pixels)) if mask >> k & 1}


def _margins(logits: list[float], labels: list) -> list[float | None]:
    out = []
    for score, label in zip(logits, labels):
        if label is None:
            out.append(None)
        else:
            out.append(1.0 - score * (1.0 if label == 1 else -1.0))
    return out


def prox_certificate(
    logits: list[float], labels: list, prox: list[float], lam: float
) -> dict[str, float]:
    """How far ``prox`` is from satisfying the optimality conditions (0 = optimal).

    Returns ``negative_s`` (max of −s), ``polytope`` (max over A of s(A) − λΔ_J(A)),
    ``complementarity`` (|⟨s, m⟩ − λ Δ̄_J(relu(m))|) and ``ignored`` (max change on an
    ignored pixel).
    """
    valid = [i for i in range(len(labels)) if labels[i] is not None]
    foreground = {i for i in valid if labels[i] == 1}
    m0 = _margins(logits, labels)
    m = _margins(prox, labels)
    s = {i: m0[i] - m[i] for i in valid}
    negative_s = max([-s[i] for i in valid], default=0.0)
    polytope = -math.inf
    for mask in range(1 << len(valid)):
        subset = _members(mask, valid)
        total = sum(s[i] for i in subset)
        polytope = max(polytope, total - lam * jaccard_set_loss(subset, foreground))
    loss, _ = lovasz_extension([m[i] for i in valid], [i in foreground for i in valid])
    inner = sum(s[i] * m[i] for i in valid)
    ignored = max(
        [abs(prox[i] - logits[i]) for i in range(len(labels)) if labels[i] is None], default=0.0
    )
    return {
        "negative_s": negative_s,
        "polytope": polytope,
        "complementarity": abs(inner - lam * loss),
        "ignored": ignored,
    }


def _prox_of_extension(
    z: dict[int, float], block: list[int], above: set[int], set_function
) -> dict[int, float]:
    """prox of the Lovász extension of A ↦ G(above ∪ A) − G(above) on ``block`` at z."""
    base = set_function(above)
    level = (sum(z[i] for i in block) - (set_function(above | set(block)) - base)) / len(block)
    best_value = 0.0
    best_set: set[int] = set()
    for mask in range(1, (1 << len(block)) - 1):
        subset = _members(mask, block)
        value = set_function(above | subset) - base - sum(z[i] - level for i in subset)
        if value < best_value - 1e-14:
            best_value = value
            best_set = subset
    if not best_set:
        return {i: level for i in block}
    top = [i for i in block if i in best_set]
    rest = [i for i in block if i not in best_set]
    levels = _prox_of_extension(z, top, above, set_function)
    levels.update(_prox_of_extension(z, rest, above | best_set, set_function))
    return levels


def brute_prox(logits: list[float], labels: list, lam: float) -> list[float]:
    """The prox of λ·(Lovász hinge of one segment); ``labels`` items are 0, 1 or None."""
    valid = [i for i in range(len(labels)) if labels[i] is not None]
    foreground = {i for i in valid if labels[i] == 1}
    m0 = _margins(logits, labels)
    positive = [i for i in valid if m0[i] > 0]
    out = list(logits)
    if not positive:
        return out

    def set_function(subset: set[int]) -> float:
        return lam * jaccard_set_loss(subset, foreground)

    levels = _prox_of_extension({i: m0[i] for i in positive}, positive, set(), set_function)
    for i in positive:
        margin = max(levels[i], 0.0)
        out[i] = (1.0 - margin) if labels[i] == 1 else (margin - 1.0)
    return out
