"""Cross-layer alignment DP against brute force."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetfuse.align import all_alignments, alignment_cost, cross_layer_alignment
from hetfuse.errors import HetfuseError

FLAGS = [(True, True), (True, False), (False, True), (False, False)]


def _feasible(m, n, ff, fl):
    return not (n == 1 and ff and fl and m > 1)


@st.composite
def problems(draw, integer=False):
    n = draw(st.integers(1, 6))
    m = draw(st.integers(n, 7))
    ff = draw(st.booleans())
    fl = draw(st.booleans())
    if not _feasible(m, n, ff, fl):
        ff = False
    if integer:
        hi = draw(st.integers(0, 3))  # small range -> many ties
        elems = st.integers(-hi, hi).map(float)
    else:
        elems = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
    rows = draw(st.lists(st.lists(elems, min_size=n, max_size=n), min_size=m, max_size=m))
    return np.array(rows, dtype=np.float64), ff, fl


def _brute(cost, ff, fl):
    m, n = cost.shape
    best, best_a = math.inf, None
    for a in all_alignments(m, n, fix_first=ff, fix_last=fl):
        v = alignment_cost(cost, a)
        if v < best:  # strict: keeps the first (lexicographically smallest) optimum
            best, best_a = v, a
    return best, best_a


def _check_valid(a, m, n, ff, fl):
    assert len(a) == n
    assert all(0 <= i < m for i in a)
    assert all(x < y for x, y in zip(a, a[1:], strict=False))
    if ff:
        assert a[0] == 0
    if fl:
        assert a[-1] == m - 1


@settings(max_examples=200, deadline=None)
@given(problems(integer=True))
def test_dp_matches_brute_force_with_ties(prob):
    cost, ff, fl = prob
    m, n = cost.shape
    a = cross_layer_alignment(cost, fix_first=ff, fix_last=fl)
    _check_valid(a, m, n, ff, fl)
    best, best_a = _brute(cost, ff, fl)
    assert alignment_cost(cost, a) == best  # integer costs: exact
    assert a == best_a  # documented tie-break: lexicographically smallest optimum


@settings(max_examples=200, deadline=None)
@given(problems(integer=False))
def test_dp_matches_brute_force_float(prob):
    cost, ff, fl = prob
    m, n = cost.shape
    a = cross_layer_alignment(cost, fix_first=ff, fix_last=fl)
    _check_valid(a, m, n, ff, fl)
    best, _ = _brute(cost, ff, fl)
    assert alignment_cost(cost, a) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("ff,fl", FLAGS)
def test_all_zero_cost_gives_lexicographically_smallest(ff, fl):
    m, n = 6, 3
    a = cross_layer_alignment(np.zeros((m, n)), fix_first=ff, fix_last=fl)
    assert a == all_alignments(m, n, fix_first=ff, fix_last=fl)[0]
    expected = [0, 1, 5] if fl else [0, 1, 2]
    assert a == expected


def test_paper_figure2():
    deep, shallow = (5, 4, 3, 1), (3, 2, 1)
    cost = [[(d - s) ** 2 for s in shallow] for d in deep]
    # hand-checked: a(2) in {1, 2} costs (4-2)^2 = 4 or (3-2)^2 = 1
    assert cross_layer_alignment(cost) == [0, 2, 3]
    assert alignment_cost(cost, [0, 2, 3]) == 4 + 1 + 0
    # free: [1, 2, 3] costs (4-3)^2 + (3-2)^2 + 0 = 2, every other map costs more
    assert cross_layer_alignment(cost, fix_first=False, fix_last=False) == [1, 2, 3]
    assert alignment_cost(cost, [1, 2, 3]) == 2


def test_square_is_identity():
    cost = np.random.default_rng(0).random((5, 5))
    for ff, fl in FLAGS:
        assert cross_layer_alignment(cost, fix_first=ff, fix_last=fl) == [0, 1, 2, 3, 4]


def test_accepts_torch_and_lists():
    torch = pytest.importorskip("torch")
    cost = [[0.0, 5.0], [5.0, 5.0], [5.0, 0.0]]
    assert cross_layer_alignment(torch.tensor(cost)) == [0, 2]
    assert cross_layer_alignment(cost, fix_first=False, fix_last=False) == [0, 2]


@pytest.mark.parametrize("m,n", [(1, 1), (4, 1), (5, 2), (6, 3), (7, 7), (7, 4)])
def test_all_alignments_count(m, n):
    free = all_alignments(m, n, fix_first=False, fix_last=False)
    assert len(free) == math.comb(m, n)
    assert free == sorted(free)
    assert len({tuple(a) for a in free}) == len(free)
    if n >= 2:
        assert len(all_alignments(m, n)) == math.comb(m - 2, n - 2)
    assert len(all_alignments(m, n, fix_first=True, fix_last=False)) == math.comb(m - 1, n - 1)


@pytest.mark.parametrize(
    "cost",
    [
        np.zeros((2, 3)),  # m < n
        np.zeros((3, 0)),  # n == 0
        np.zeros(3),  # 1-D
        np.zeros((2, 2, 2)),  # 3-D
        np.array([[0.0, 1.0], [np.nan, 0.0]]),
        np.array([[0.0, 1.0], [np.inf, 0.0]]),
        [[1.0, 2.0], [3.0]],  # ragged
    ],
)
def test_errors(cost):
    with pytest.raises(HetfuseError):
        cross_layer_alignment(cost)
    with pytest.raises(ValueError):  # HetfuseError subclasses ValueError
        cross_layer_alignment(cost, fix_first=False, fix_last=False)


def test_single_shallow_layer():
    cost = np.array([[3.0], [1.0], [2.0]])
    with pytest.raises(HetfuseError, match="contradict"):
        cross_layer_alignment(cost)
    with pytest.raises(HetfuseError):
        all_alignments(3, 1)
    assert cross_layer_alignment(cost, fix_first=False, fix_last=False) == [1]
    assert cross_layer_alignment(cost, fix_first=True, fix_last=False) == [0]
    assert cross_layer_alignment(cost, fix_first=False, fix_last=True) == [2]
    assert cross_layer_alignment([[7.0]]) == [0]


def test_alignment_cost_validates():
    cost = np.arange(6.0).reshape(3, 2)
    assert alignment_cost(cost, [0, 2]) == 0.0 + 5.0
    with pytest.raises(HetfuseError):
        alignment_cost(cost, [0])
    with pytest.raises(HetfuseError):
        alignment_cost(cost, [0, 3])
