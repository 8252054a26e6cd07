import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetfuse.errors import HetfuseError
from hetfuse.match import Transport, ground_cost, solve_transport


def test_identical_inputs_give_the_identity_plan():
    x = torch.randn(12, 30, generator=torch.Generator().manual_seed(0))
    for solver in ("exact",):
        tr = solve_transport(ground_cost(x, x), solver=solver)
        assert torch.equal(tr.forward, torch.eye(12, dtype=torch.float64))
        assert tr.is_permutation and tr.solver == "lap" and tr.cost == pytest.approx(0.0)


def test_identical_inputs_with_sinkhorn_concentrate_on_the_diagonal():
    x = torch.randn(10, 30, generator=torch.Generator().manual_seed(1))
    tr = solve_transport(ground_cost(x, x), solver="sinkhorn", reg=0.005)
    assert torch.all(tr.forward.diagonal() > 0.99)


def test_permuted_neurons_are_recovered():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 40, generator=g)
    perm = torch.randperm(9, generator=g)
    tr = solve_transport(ground_cost(x[perm], x))  # source neuron i is x[perm[i]], target neuron j is x[j]
    # forward[i, j] = 1 iff source i goes to target j, i.e. perm[i] == j
    assert torch.equal(tr.forward.argmax(1), perm)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_assignment_cost_equals_network_simplex(n, seed):
    rng = np.random.default_rng(seed)
    cost = rng.random((n, n))
    tr = solve_transport(cost)
    u = np.full(n, 1.0 / n)
    assert tr.solver == "lap" and tr.is_permutation
    assert tr.cost == pytest.approx(ot.emd2(u, u, cost), abs=1e-12)


@pytest.mark.filterwarnings("ignore:sinkhorn did not converge")
@settings(max_examples=60, deadline=None)
@given(n_src=st.integers(1, 10), n_dst=st.integers(1, 10), seed=st.integers(0, 10_000),
       solver=st.sampled_from(["exact", "sinkhorn"]))
def test_marginals_hold(n_src, n_dst, seed, solver):
    rng = np.random.default_rng(seed)
    cost = rng.random((n_src, n_dst))
    tr = solve_transport(cost, solver=solver, reg=0.05)
    tol = 1e-9 if solver == "exact" else 1e-5
    # forward = T diag(1/nu): every target column is a convex combination of source neurons
    assert np.allclose(tr.forward.sum(0).numpy(), 1.0, atol=tol)
    assert np.all(tr.forward.numpy() >= -1e-12)
    # source marginal: row sums of T = 1/n_src, i.e. forward's row sums = n_dst / n_src
    assert np.allclose(tr.forward.sum(1).numpy(), n_dst / n_src, atol=tol * n_dst)
    # incoming rows are convex combinations as well: a copied source neuron counts once downstream
    assert np.allclose(tr.incoming.sum(1).numpy(), 1.0, atol=tol)


def test_exact_multiple_widths_give_copies():
    rng = np.random.default_rng(0)
    tr = solve_transport(rng.random((4, 12)))
    assert tr.solver == "emd"
    f = tr.forward.numpy()
    assert np.allclose(f, np.round(f), atol=1e-12)
    assert np.allclose(f.sum(0), 1) and np.allclose(f.sum(1), 3)


def test_errors():
    with pytest.raises(HetfuseError):
        solve_transport(np.ones((2, 2)), solver="magic")
    with pytest.raises(HetfuseError):
        ground_cost(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(HetfuseError):
        ground_cost(torch.tensor([[float("nan")]]), torch.zeros(1, 1))
    assert Transport.identity(3).is_permutation
