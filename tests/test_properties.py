"""Laws of the Lovász extension, checked with hypothesis on every backend."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given

from lovasz_kernels import lovasz_extension
from reference import naive

_pixels = st.integers(min_value=1, max_value=40)


@st.composite
def segment(draw, tied: bool = False):
    """(errors (1, P) float64, fg (1, P) bool); tied draws errors from a few integer values."""
    num_pixels = draw(_pixels)
    if tied:
        values = st.integers(min_value=-2, max_value=3).map(float)
    else:
        values = st.floats(min_value=-3, max_value=3, allow_nan=False, allow_subnormal=False)
    errors = draw(st.lists(values, min_size=num_pixels, max_size=num_pixels))
    fg = draw(st.lists(st.booleans(), min_size=num_pixels, max_size=num_pixels))
    return (torch.tensor([errors], dtype=torch.float64), torch.tensor([fg], dtype=torch.bool))


def _loss(backend, errors, fg) -> float:
    return lovasz_extension(errors, fg, backend=backend)[0].item()


@given(data=st.data())
def test_equals_jaccard_on_binary_vectors(backend, data):
    num_pixels = data.draw(_pixels)
    mispredicted = data.draw(st.lists(st.booleans(), min_size=num_pixels, max_size=num_pixels))
    fg = data.draw(st.lists(st.booleans(), min_size=num_pixels, max_size=num_pixels))
    errors = torch.tensor([mispredicted], dtype=torch.float64)
    expected = naive.jaccard_set_loss(
        {i for i, m in enumerate(mispredicted) if m}, {i for i, f in enumerate(fg) if f}
    )
    assert abs(_loss(backend, errors, torch.tensor([fg])) - expected) < 1e-12


@given(data=st.data(), t=st.floats(min_value=0, max_value=1))
def test_convex_along_segments(backend, data, t):
    x, fg = data.draw(segment())
    y = torch.tensor(
        [data.draw(st.lists(st.floats(-3, 3), min_size=x.shape[1], max_size=x.shape[1]))],
        dtype=torch.float64,
    )
    between = _loss(backend, t * x + (1 - t) * y, fg)
    assert between <= t * _loss(backend, x, fg) + (1 - t) * _loss(backend, y, fg) + 1e-9


@given(data=st.data(), tied=st.booleans())
def test_gradient_is_a_subgradient(backend, data, tied):
    """f(y) >= f(x) + <g, y - x> for every y; on ties g is only *a* subgradient."""
    x, fg = data.draw(segment(tied=tied))
    loss, grad = lovasz_extension(x, fg, backend=backend)
    assert bool((grad >= 0).all())
    for _ in range(5):
        y = torch.tensor(
            [data.draw(st.lists(st.floats(-3, 3), min_size=x.shape[1], max_size=x.shape[1]))],
            dtype=torch.float64,
        )
        assert _loss(backend, y, fg) >= loss.item() + float((grad * (y - x)).sum()) - 1e-9


@given(data=st.data())
def test_finite_differences_on_tie_free_inputs(backend, data):
    """Away from kinks the loss is linear: a central difference equals <g, d> exactly."""
    num_pixels = data.draw(_pixels)
    ranks = data.draw(st.permutations(range(num_pixels)))
    # distinct errors spaced 0.25 apart, none near the relu kink at 0
    errors = torch.tensor([[0.25 * r - 0.125 * num_pixels + 0.1 for r in ranks]],
                          dtype=torch.float64)
    fg = torch.tensor([data.draw(st.lists(st.booleans(), min_size=num_pixels,
                                          max_size=num_pixels))])
    direction = torch.tensor(
        [data.draw(st.lists(st.floats(-1, 1), min_size=num_pixels, max_size=num_pixels))],
        dtype=torch.float64,
    )
    _, grad = lovasz_extension(errors, fg, backend=backend)
    step = 1e-3  # moves each error by < 0.1: no order change, no sign change
    slope = (_loss(backend, errors + step * direction, fg)
             - _loss(backend, errors - step * direction, fg)) / (2 * step)
    assert abs(slope - float((grad * direction).sum())) < 1e-9


@given(data=st.data(), scale=st.floats(min_value=0.01, max_value=100))
def test_positively_homogeneous(backend, data, scale):
    x, fg = data.draw(segment())
    assert abs(_loss(backend, scale * x, fg) - scale * _loss(backend, x, fg)) < 1e-9 * (1 + scale)
