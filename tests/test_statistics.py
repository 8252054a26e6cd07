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
