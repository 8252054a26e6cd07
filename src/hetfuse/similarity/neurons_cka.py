"""Neuron counts first, activations where the counts tie: the default representation of ``cla``.

CLAFusion's own representation (:mod:`hetfuse.similarity.neurons`) is the squared difference of the neuron counts.
On networks whose layers share a width (most CNN stages, the equal-width MLPs of the class-split experiments) every
cost of that representation is zero and the alignment is decided by the dynamic program's tie-breaking alone. This
method keeps the neuron-count cost and breaks its ties by linear CKA of the units' activations: the cost of deep
unit i against shallow unit j is ``(w_i − w_j)² + (1 − CKA_ij) / (n + 1)`` with n shallow units. An alignment
places each of the n shallow units once, so the CKA part of any alignment's total is below 1, the smallest step of
the count part: the alignments that are optimal for the neuron counts stay the only candidates, and among them
the most similar by activations wins.
"""

from __future__ import annotations

from ..registry import register
from .base import Similarity
from .cka import LinearCKA
from .neurons import Neurons


@register
class NeuronsThenCKA(Similarity):
    family = "similarity"
    name = "neurons-cka"
    description = ("number of neurons, ties broken by linear CKA of the activations: cost (w_i − w_j)² + "
                   "(1 − CKA)/(n + 1) (default of cla)")
    reference = "CLAFusion §3.1 (neurons, CKA)"
    needs = "acts"
    native = "cost"
    bounded = False

    def compute(self, deep, shallow):
        counts = Neurons().compute(deep, shallow)
        cka = LinearCKA().compute(deep, shallow)
        return counts + (1.0 - cka) / (len(shallow) + 1)
