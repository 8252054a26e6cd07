"""Linear and RBF CKA."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetfuse.errors import HetfuseError
from hetfuse.similarity import linear_cka, rbf_cka


def _rand(seed, t, p):
    return np.random.default_rng(seed).standard_normal((t, p))


def _orth(seed, k):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((k, k)))
    return q


seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 6)
CKAS = [linear_cka, rbf_cka]


@pytest.mark.parametrize("cka", CKAS)
@settings(max_examples=40, deadline=None)
@given(seed=seeds, t=st.integers(3, 12), p=dims)
def test_identical_is_one(cka, seed, t, p):
    x = _rand(seed, t, p)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("cka", CKAS)
@settings(max_examples=40, deadline=None)
@given(seed=seeds, t=st.integers(3, 12), p=dims, q=dims)
def test_symmetric_and_bounded(cka, seed, t, p, q):
    x, y = _rand(seed, t, p), _rand(seed + 1, t, q)
    v = cka(x, y)
    assert 0.0 <= v <= 1.0
    assert v == pytest.approx(cka(y, x), abs=1e-12)


@pytest.mark.parametrize("cka", CKAS)
@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    t=st.integers(3, 12),
    p=dims,
    q=dims,
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-10, 10),
)
def test_orthogonal_and_scale_invariance(cka, seed, t, p, q, scale, shift):
    x, y = _rand(seed, t, p), _rand(seed + 7, t, q)
    base = cka(x, y)
    assert cka(x @ _orth(seed, p), y) == pytest.approx(base, abs=1e-8)
    assert cka(x, y @ _orth(seed + 3, q)) == pytest.approx(base, abs=1e-8)
    assert cka(scale * x, y) == pytest.approx(base, abs=1e-8)
    assert cka(x, scale * y + shift) == pytest.approx(base, abs=1e-8)


def test_linear_cka_matches_definition_and_detects_difference():
    x, y = _rand(1, 20, 4), _rand(2, 20, 3)
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-12)
    assert linear_cka(x, y) < 0.9
    # Gram form (t small relative to p*q) agrees with the feature form
    x2, y2 = _rand(3, 4, 10), _rand(4, 4, 12)
    xc, yc = x2 - x2.mean(0), y2 - y2.mean(0)
    ref = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x2, y2) == pytest.approx(ref, rel=1e-10)


def test_not_invariant_to_anisotropic_scaling():
    x, y = _rand(5, 30, 3), _rand(6, 30, 3)
    y = y + x  # correlated
    d = np.diag([1.0, 100.0, 0.01])
    assert abs(linear_cka(x @ d, y) - linear_cka(x, y)) > 1e-3


@pytest.mark.parametrize("cka", CKAS)
def test_constant_column_no_nan(cka):
    x = _rand(0, 10, 3)
    y = _rand(1, 10, 2)
    xc = np.concatenate([x, np.full((10, 1), 0.1)], axis=1)
    v = cka(xc, y)
    assert np.isfinite(v)
    assert v == pytest.approx(cka(x, y), abs=1e-12)


@pytest.mark.parametrize("cka", CKAS)
def test_zero_variance_returns_zero(cka):
    y = _rand(1, 10, 2)
    assert cka(np.full((10, 3), 0.3), y) == 0.0
    assert cka(y, np.zeros((10, 1))) == 0.0
    assert cka(np.ones((1, 2)), np.ones((1, 3))) == 0.0


@pytest.mark.parametrize("cka", CKAS)
def test_dtypes_and_torch(cka):
    x, y = _rand(0, 15, 3), _rand(1, 15, 4)
    ref = cka(x, y)
    assert cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == pytest.approx(ref, abs=1e-5)
    assert cka(x.astype(np.float16), y) == pytest.approx(ref, abs=5e-3)
    assert isinstance(cka(x, y), float)


@pytest.mark.parametrize("cka", CKAS)
def test_validation(cka):
    x = _rand(0, 5, 2)
    with pytest.raises(HetfuseError, match="2-D"):
        cka(np.zeros(5), x)
    with pytest.raises(HetfuseError, match="rows"):
        cka(x, _rand(1, 6, 2))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(HetfuseError, match="NaN"):
        cka(bad, x)
    bad[0, 0] = np.inf
    with pytest.raises(HetfuseError):
        cka(x, bad)


def test_rbf_sigma_frac():
    x, y = _rand(0, 15, 3), _rand(1, 15, 3) + _rand(0, 15, 3)
    a, b = rbf_cka(x, y, sigma_frac=0.2), rbf_cka(x, y, sigma_frac=5.0)
    assert 0 <= a <= 1 and 0 <= b <= 1 and a != b
    # a very wide kernel approaches linear CKA
    assert rbf_cka(x, y, sigma_frac=1e3) == pytest.approx(linear_cka(x, y), abs=1e-3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(HetfuseError, match="sigma_frac"):
            rbf_cka(x, y, sigma_frac=bad)


def test_rbf_permutation_of_samples_consistent():
    x, y = _rand(0, 12, 3), _rand(1, 12, 2)
    perm = np.random.default_rng(2).permutation(12)
    assert rbf_cka(x[perm], y[perm]) == pytest.approx(rbf_cka(x, y), abs=1e-10)
    assert linear_cka(x[perm], y[perm]) == pytest.approx(linear_cka(x, y), abs=1e-10)
