"""The opt-in approximate assignment (``solver="sparse"``): always a permutation, never better than the optimum, and
never further from it than the bound it reports; exact where the candidates hold the optimum; in the matchers, a
network and a permuted copy of it still fuse back into the network, and the gaps are reported."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from hetfuse import fuse
from hetfuse.errors import HetfuseError
from hetfuse.graph import describe
from hetfuse.graph.spec import permuted_copy
from hetfuse.match import sparse_assignment
from hetfuse.models import MLP


def _optimum(c, maximize):
    cols = linear_sum_assignment(c, maximize=maximize)[1]
    return float(c[np.arange(len(c)), cols].sum())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 6), seed=st.integers(0, 10_000), maximize=st.booleans(),
       kind=st.sampled_from(["uniform", "cubed", "integers", "distances"]))
def test_a_permutation_within_its_reported_gap_of_the_optimum(n, k, seed, maximize, kind):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        c = rng.random((n, n))
    elif kind == "cubed":  # a few cheap entries, many dear ones
        c = rng.random((n, n)) ** 3
    elif kind == "integers":  # ties everywhere
        c = rng.integers(0, 4, (n, n)).astype(float)
    else:  # Euclidean distances between two point clouds, the ground cost of ot-acts
        a, b = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
        c = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    found = sparse_assignment(torch.tensor(c), k=k, maximize=maximize)
    assert sorted(found.cols.tolist()) == list(range(n))
    total = float(c[np.arange(n), found.cols].sum())
    assert found.total == pytest.approx(total, rel=1e-12, abs=1e-12)
    best = _optimum(c, maximize)
    worse_by = (best - total) if maximize else (total - best)
    tol = 1e-9 * max(1.0, abs(best))
    assert -tol <= worse_by <= found.gap + tol
    assert found.gap >= 0.0


def test_exact_where_the_optimum_is_among_the_candidates():
    """A cost whose optimal partner is each row's cheapest entry (a permuted, strongly diagonal cost): the answer is
    the optimum, and the dual bound closes (the gap is zero up to round-off)."""
    rng = np.random.default_rng(0)
    n = 300
    perm = rng.permutation(n)
    c = rng.random((n, n)) + 1.0
    c[np.arange(n), perm] = rng.random(n) * 0.1
    found = sparse_assignment(c, k=3)
    assert found.solver == "sparse"
    assert np.array_equal(found.cols, perm)
    assert found.gap <= 1e-9 * n


def test_few_candidates_fall_back_to_the_exact_solver():
    c = np.random.default_rng(1).random((10, 10))
    found = sparse_assignment(c, k=5)  # 2k >= n: nothing to gain
    assert found.solver == "scipy" and found.gap == 0.0
    assert found.total == pytest.approx(_optimum(c, False))
    with pytest.raises(HetfuseError, match="square"):
        sparse_assignment(np.zeros((3, 4)))
    with pytest.raises(HetfuseError, match="k >= 1"):
        sparse_assignment(np.zeros((3, 3)), k=0)


def _pair():
    torch.manual_seed(0)
    a = MLP(16, [64, 64, 48], 5).eval()
    b, _ = permuted_copy(a, describe(a), seed=3)
    return a, b.eval(), torch.randn(400, 16)


@pytest.mark.parametrize("match", ["perm-acts", "ot-acts", "ot-weights"])
def test_a_network_and_its_permuted_copy_fuse_back_with_the_sparse_solver(match):
    a, b, x = _pair()
    res = fuse([a, b], x, match=match, solver="sparse", k=4, repair="none", samples=400)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), a(x), rtol=1e-5, atol=1e-5)
    info = res.report["match_info"]
    assert [len(g) for g in info["gaps"]] == [3, 3]  # per model (the target's are 0), three spaces
    assert all(0.0 <= g <= 1e-9 for gaps in info["gaps"] for g in gaps)
    assert set(res.report["solvers"][1]) == {"sparse"}


def test_the_sparse_solver_needs_equal_widths_and_k_belongs_to_it():
    torch.manual_seed(0)
    a, b = MLP(8, [12], 3).eval(), MLP(8, [20], 3).eval()
    x = torch.randn(50, 8)
    with pytest.raises(HetfuseError, match="equal widths"):
        fuse([a, b], x, match="ot-acts", solver="sparse", samples=50)
    with pytest.raises(HetfuseError, match="k=3 applies to solver='sparse'"):
        fuse([a, a], x, match="ot-acts", k=3, samples=50)
    with pytest.raises(HetfuseError, match="k=3 applies to solver='sparse'"):
        fuse([a, a], x, match="perm-acts", k=3, samples=50)
