"""The moments the matchers read (float32 models summed in float32, shifted) agree with float64 ones."""

import torch
from torch import nn

from hetfuse.graph import describe, space_statistics
from hetfuse.repair.repair import _mean_std


def _offset_mlp(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():  # a large common offset: E[x²] - E[x]² would lose every digit of the variance in float32
        m[0].bias.add_(300.0)
        m[2].bias.add_(-200.0)
    return m.to(dtype).eval()


def test_float32_moments_match_float64_despite_large_means():
    a, b = _offset_mlp(0), _offset_mlp(1)
    x = torch.randn(3000, 6)
    st32 = space_statistics([a, b], [describe(a), describe(b)], x, pairs=[(0, 1)], batch_size=700)
    a64, b64 = (m.to(torch.float64) for m in (a, b))
    st64 = space_statistics([a64, b64], [describe(a64), describe(b64)], x.double(), pairs=[(0, 1)], batch_size=700)
    assert st32.eps > st64.eps
    for s in range(2):
        assert st32.count[s] == st64.count[s] == 3000
        for i in range(2):
            torch.testing.assert_close(st32.mean(i, s), st64.mean(i, s), rtol=1e-6, atol=1e-4)
            torch.testing.assert_close(st32.std(i, s), st64.std(i, s), rtol=1e-4, atol=1e-4)
        c32, c64 = st32.correlation(0, 1, s), st64.correlation(0, 1, s)
        assert (c32 - c64).abs().max() < 1e-4, (c32 - c64).abs().max()
        torch.testing.assert_close(st32.gram(1, 0, s), st64.gram(0, 1, s).T, rtol=1e-6, atol=1e-2)


def test_repair_mean_std_is_exact_enough_in_float32():
    torch.manual_seed(0)
    r = 1e4 + torch.randn(5000, 7, dtype=torch.float64) * torch.arange(1, 8)
    mean, std = _mean_std(r.to(torch.float32))
    ref_m, ref_s = r.to(torch.float32).double().mean(0), r.to(torch.float32).double().std(0, unbiased=False)
    torch.testing.assert_close(mean, ref_m, rtol=1e-7, atol=1e-3)
    torch.testing.assert_close(std, ref_s, rtol=1e-4, atol=1e-4)
    assert mean.dtype == std.dtype == torch.float64


def test_fewer_positions_per_sample_are_the_same_observations_in_every_model():
    from hetfuse import FusionConfig, fuse
    from hetfuse.graph.activations import spread_positions
    from models_zoo_for_tests import inputs, make

    t = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    s = spread_positions(t, 6)
    assert s.shape == (2, 3, 6) and s[..., 0].equal(t[..., 0, 0]) and s[..., -1].equal(t[..., -1, -1])
    assert spread_positions(t, 20) is t and spread_positions(t, None) is t

    data = inputs("resnet-projection", 48, 0)
    a = make("resnet-projection", 0, data)
    g = describe(a)
    exact = space_statistics([a, a], [g, g], data, pairs=[(0, 1)])
    few = space_statistics([a, a], [g, g], data, pairs=[(0, 1)], positions=8)
    assert all(f < e for f, e in zip(few.count, exact.count, strict=True))
    every = space_statistics([a, a], [g, g], data, pairs=[(0, 1)], positions=10 ** 6)
    assert every.count == exact.count
    for s in range(len(g.spaces)):  # a model against itself: still perfectly correlated on the subset
        c = few.correlation(0, 1, s).diagonal()
        assert bool((c > 1 - 1e-4).all())

    # a network fused with a copy of itself whose neurons are permuted comes back with positions=8 too
    from hetfuse.graph import permuted_copy

    b = permuted_copy(a, describe(a, example=data[:2]), seed=3)[0]
    fused = fuse([a, b], data, config=FusionConfig(match="perm-acts", samples=48, repair="none", positions=8)).model
    with torch.no_grad():
        torch.testing.assert_close(fused(data[:8]), a(data[:8]), rtol=1e-4, atol=1e-4)
    cfg = FusionConfig(positions=16)
    assert FusionConfig.from_dict(cfg.to_dict()).positions == 16 and FusionConfig().to_dict().get("positions") is None
