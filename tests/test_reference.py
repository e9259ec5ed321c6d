"""The naive oracle itself, against an independent formula (the Choquet integral)."""

from __future__ import annotations

import random

import pytest

from reference import naive


def _choquet(errors: list[float], fg: list[bool]) -> float:
    """Δ̄(m) = ∫_0^∞ Δ({i : m_i ≥ t}) dt for m = relu(errors): a sum over level sets."""
    margins = [max(e, 0.0) for e in errors]
    foreground = {i for i, f in enumerate(fg) if f}
    levels = sorted(set(margins), reverse=True) + [0.0]
    total = 0.0
    for upper, lower in zip(levels, levels[1:]):
        level_set = {i for i, m in enumerate(margins) if m >= upper}
        total += (upper - lower) * naive.jaccard_set_loss(level_set, foreground)
    return total


@pytest.mark.parametrize("seed", range(20))
def test_oracle_equals_choquet_integral(seed):
    rng = random.Random(seed)
    size = rng.randint(1, 25)
    errors = [rng.choice([rng.uniform(-1, 2), float(rng.randint(-1, 2))]) for _ in range(size)]
    fg = [rng.random() < 0.4 for _ in range(size)]
    loss, grad = naive.lovasz_extension(errors, fg)
    assert loss == pytest.approx(_choquet(errors, fg), abs=1e-12)
    # Euler: a positively homogeneous function equals <gradient, input>
    assert loss == pytest.approx(sum(g * max(e, 0.0) for g, e in zip(grad, errors)), abs=1e-12)


def test_jaccard_set_loss_definition():
    assert naive.jaccard_set_loss(set(), {1, 2}) == 0.0
    assert naive.jaccard_set_loss(set(), set()) == 0.0
    assert naive.jaccard_set_loss({3}, set()) == 1.0
    # F = {1, 2}, M = {2, 3}: |F \ M| = 1, |F ∪ M| = 3
    assert naive.jaccard_set_loss({2, 3}, {1, 2}) == pytest.approx(2 / 3)
