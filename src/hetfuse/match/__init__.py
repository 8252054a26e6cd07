"""The neuron-matcher stage: how every network's neurons enter the fused network's (optimal transport,
vanilla averaging; more in later files). One file per method."""

from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap
from .transport import SOLVERS, Transport, ground_cost, solve_transport
from .assignment import SparseAssignment, solve_assignment, sparse_assignment  # noqa: I001
from .ot import OTActs, OTWeights  # registration order = the order of the docs and the CLI
from .perm import PermActs
from .weights import PermWeights
from .cca import CCA
from .zip import ElasticZip, Zip, greedy_zip
from .vanilla import Vanilla

__all__ = ["CCA", "ElasticZip", "MatchContext", "MatchResult", "NeuronMatcher", "OTActs", "OTWeights", "PermActs",
           "PermWeights", "SOLVERS", "SpaceMap", "SparseAssignment", "Transport", "Vanilla", "Zip", "greedy_zip",
           "ground_cost", "solve_assignment", "solve_transport", "sparse_assignment"]
