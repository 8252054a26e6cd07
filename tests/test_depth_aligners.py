"""SMA and LMA (and CLA) dynamic programs: optimal against brute force, lexicographically smallest among ties,
the planted alignment on a block-diagonal similarity, and the API's errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hetfuse
from hetfuse.align import align_depth, all_alignments, alignment_objective
from hetfuse.errors import HetfuseError


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    m = draw(st.integers(n, 9))
    ff, fl = draw(st.booleans()), draw(st.booleans())
    if n == 1 and ff and fl and m > 1:
        fl = False
    hi = draw(st.integers(0, 3))  # a small range of integers: many ties, exact sums
    rows = draw(st.lists(st.lists(st.integers(-hi, hi).map(float), min_size=n, max_size=n), min_size=m, max_size=m))
    return np.array(rows), ff, fl


@pytest.mark.parametrize("method", ["cla", "sma", "lma"])
@settings(max_examples=150, deadline=None)
@given(prob=problems())
def test_every_depth_alignment_is_the_first_optimum_of_brute_force(method, prob):
    matrix, ff, fl = prob
    m, n = matrix.shape
    a = align_depth(matrix, method, fix_first=ff, fix_last=fl)
    candidates = all_alignments(m, n, fix_first=ff, fix_last=fl)
    values = [alignment_objective(matrix, c, method) for c in candidates]
    best = min(values) if method == "cla" else max(values)
    assert alignment_objective(matrix, a, method) == best
    assert a == candidates[values.index(best)]  # ties: the lexicographically smallest optimum


@pytest.mark.parametrize("method", ["sma", "lma"])
@pytest.mark.parametrize("seed", range(5))
def test_a_planted_block_diagonal_similarity_gives_the_planted_alignment(method, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    m = int(rng.integers(n + 1, 10))
    # segments: shallow unit i is similar to a run of deep units starting at a(i)
    starts = sorted(rng.choice(np.arange(1, m), size=n - 1, replace=False).tolist())
    a = [0] + starts
    sim = rng.uniform(0.0, 0.2, size=(m, n))
    for i in range(n):
        end = a[i + 1] if i + 1 < n else m
        sim[a[i]:end, i] = rng.uniform(0.8, 1.0, size=end - a[i])
    got = align_depth(sim, method, fix_first=True, fix_last=False)
    if method == "lma":
        assert got == a  # every deep unit of a segment counts: the segments are recovered
    else:
        assert got[0] == 0 and all(sim[g, i] >= 0.8 for i, g in enumerate(got))


def test_sma_is_cla_on_negated_similarities_and_lma_differs_from_both():
    sim = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    assert align_depth(sim, "sma", fix_first=False, fix_last=False) == align_depth(-sim, "cla", fix_first=False,
                                                                                    fix_last=False)
    # SMA takes the best single deep unit for the second shallow unit; LMA also counts the units it carries
    sim2 = np.array([[1.0, 0.0], [0.0, 0.6], [0.0, 0.6], [0.0, 0.7]])
    assert align_depth(sim2, "sma", fix_first=True, fix_last=False) == [0, 3]
    assert align_depth(sim2, "lma", fix_first=True, fix_last=False) == [0, 1]


@pytest.mark.parametrize("bad, words", [
    (np.array([[0.0, np.nan], [1.0, 1.0]]), "NaN"),
    (np.zeros((2, 3)), "at least as many"),
    (np.zeros((3, 1)), "contradict"),
])
def test_align_depth_errors(bad, words):
    for method in ("cla", "sma", "lma"):
        with pytest.raises(ValueError, match=words):
            hetfuse.align_depth(bad, method)
    with pytest.raises(HetfuseError, match="unknown depth alignment"):
        hetfuse.align_depth(np.zeros((2, 2)), "zz")
