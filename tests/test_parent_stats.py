"""The parents' repair statistics taken from the matcher's statistics (no second pass) equal the computed ones."""

import pytest
import torch

from hetfuse import FusionConfig, prepare_fusion
from hetfuse.pipeline import space_moments
from models_zoo_for_tests import inputs, make

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["mlp", "vgg-bn", "resnet-projection", "vit-hand"])
@pytest.mark.parametrize("budget", [1.0, 1.5])
def test_reused_statistics_equal_a_second_pass(kind, budget):
    data = inputs(kind, 40, 1)
    a, b = make(kind, 0, data), make(kind, 1, data)
    prep = prepare_fusion([a, b], data, FusionConfig(match="perm-acts", budget=budget, samples=40, repair_samples=40))
    reused = prep._stats_from_matching()
    assert reused is not None  # same samples, permutation maps: no second pass
    computed = [space_moments(prep.aligned_model(i), prep.graph, prep.repair_samples) for i in range(2)]
    for r_i, c_i in zip(reused, computed, strict=True):
        for (rm, rs), (cm, cs) in zip(r_i, c_i, strict=True):
            torch.testing.assert_close(rm, cm.to(rm.dtype), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rs, cs.to(rs.dtype), rtol=1e-4, atol=1e-5)


def test_no_reuse_where_it_would_not_be_exact():
    data = inputs("mlp", 60, 1)
    a, b = make("mlp", 0, data), make("mlp", 1, data)
    other_samples = prepare_fusion([a, b], data, FusionConfig(match="perm-acts", samples=30, repair_samples=60))
    assert other_samples._stats_from_matching() is None
    soft = prepare_fusion([a, b], data, FusionConfig(match="ot-acts", solver="sinkhorn", reg=0.5, samples=60,
                                                     repair_samples=60))
    assert soft._stats_from_matching() is None  # a soft transport plan mixes neurons
    linear = prepare_fusion([a, b], data, FusionConfig(match="cca", samples=60, repair_samples=60))
    assert linear._stats_from_matching() is None
