"""The Sinkhorn solver of ``ot-acts`` / ``ot-weights``: log-domain stabilised scaling in torch on the cost's device.
Its plan is POT's ``sinkhorn_log`` plan, its marginals hold, it stays finite where a plain kernel underflows, no
NumPy round trip is made, and a network fused with a permuted copy of itself comes back."""

import ot
import pytest
import torch

from hetfuse import fuse, prepare_fusion, FusionConfig
from hetfuse.graph import describe, permuted_copy
from hetfuse.match import ground_cost, solve_transport
from hetfuse.match.transport import sinkhorn_plan
from hetfuse.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


def _cost(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    return ground_cost(torch.randn(n, 20, generator=g), torch.randn(m, 20, generator=g))


@pytest.mark.parametrize(("n", "m", "reg"), [(30, 30, 0.01), (17, 40, 0.05), (40, 12, 0.003), (1, 5, 0.1)])
def test_the_plan_is_pots_log_domain_plan_and_its_marginals_hold(n, m, reg):
    c = _cost(n, m, n + m)
    c = c / c.max()
    plan, converged = sinkhorn_plan(c, reg)
    assert converged and plan.dtype == torch.float64
    assert torch.allclose(plan.sum(1), torch.full((n,), 1.0 / n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(plan.sum(0), torch.full((m,), 1.0 / m, dtype=torch.float64), rtol=0, atol=1e-9)
    a, b = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)
    ref = ot.sinkhorn(a, b, c, reg, method="sinkhorn_log", numItermax=10_000, stopThr=1e-9)
    assert torch.allclose(plan, ref, rtol=0, atol=1e-9 / max(n, m))


def test_stays_finite_where_the_plain_kernel_underflows():
    """A cost whose every entry is far above reg = 3e-4 (of the largest entry): exp(-C / reg) is 0 (below e^-745)
    in every row, so unstabilised scaling divides by zero; the stabilised plan is POT's log-domain one, with its
    marginals, and it finds the noisy permutation."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 20, generator=g)
    perm = torch.randperm(64, generator=g)
    c = ground_cost(x[perm] + 0.05 * torch.randn(64, 20, generator=g), x) + 5.0
    c = c / c.max()
    assert bool((torch.exp(-c / 3e-4) == 0).all())
    plan, converged = sinkhorn_plan(c, 3e-4)
    assert converged and bool(torch.isfinite(plan).all())
    u = torch.full((64,), 1 / 64, dtype=torch.float64)
    assert torch.allclose(plan.sum(1), u, rtol=0, atol=1e-12)
    assert torch.allclose(plan.sum(0), u, rtol=0, atol=1e-9)
    assert torch.equal(plan.argmax(1), perm)
    ref = ot.sinkhorn(u, u, c, 3e-4, method="sinkhorn_log", numItermax=10_000, stopThr=1e-9)
    assert torch.allclose(plan, ref, rtol=0, atol=1e-11)


def test_solve_transport_keeps_torch_tensors(monkeypatch):
    c = _cost(25, 25, 4).to(torch.float32)

    def refuse(self, *args, **kwargs):
        raise AssertionError("the Sinkhorn path made a NumPy round trip")

    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    tr = solve_transport(c, solver="sinkhorn", reg=0.02)
    assert isinstance(tr.forward, torch.Tensor) and tr.forward.device == c.device
    # forward = T diag(1/ν): columns are convex combinations; rows of T hold 1/n, so forward's rows sum to 1
    assert torch.allclose(tr.forward.sum(0), torch.ones(25, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(tr.forward.sum(1), torch.ones(25, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(tr.incoming.sum(1), torch.ones(25, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("match", ["ot-acts", "ot-weights"])
def test_a_network_fused_with_its_permuted_copy_comes_back(match):
    torch.manual_seed(0)
    model = MLP(12, [24, 16], 4, bias=True).eval()
    x = torch.randn(64, 12)
    twin, perms = permuted_copy(model, describe(model, example=x[:2]), seed=5)
    config = FusionConfig(target=1, match=match, solver="sinkhorn", reg=0.002, samples=64, repair="none")
    prep = prepare_fusion([twin, model], x, config)
    for s, perm in enumerate(perms):
        fwd = prep.match.maps[0][s].out
        assert torch.equal(fwd.argmax(1), perm.to(fwd.device))  # twin's neuron j is the model's neuron perm[j]
        assert float(fwd.max(1).values.min()) > 0.999
    res = fuse([twin, model], x, target=1, match=match, solver="sinkhorn", reg=0.002, samples=64, repair=False)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert res.report["solvers"][0] == ["sinkhorn", "sinkhorn"]
