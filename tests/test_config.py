"""FusionConfig: the stages, validated when built, written and read as JSON (and the version-1 flat form)."""

import json

import pytest

from hetfuse import FusionConfig
from hetfuse.errors import HetfuseError
from hetfuse.registry import describe_methods, get_method, methods


def test_defaults_are_the_clafusion_pipeline():
    c = FusionConfig()
    stages = (c.similarity, c.depth_align, c.balance, c.match, c.repair)
    assert stages == ("neurons-cka", "cla", "add", "ot-acts", "auto")
    assert c.stage("depth_align").params == {"fix_first": True, "fix_last": True}
    assert c.samples == 400 and c.repair_samples == 2000


def test_the_similarity_default_follows_the_aligner():
    assert FusionConfig(depth_align="lma").similarity == "cka"
    assert FusionConfig(depth_align="sma", similarity="neurons").similarity == "neurons"


@pytest.mark.parametrize("kwargs, words", [
    ({"balance": "bogus"}, "not a depth balancer method; known: add, merge"),
    ({"match": "zap"}, "known: ot-acts"),
    ({"weights": [0.5, 0.6]}, "sum to 1"),
    ({"weights": [-0.1, 1.1]}, "non-negative"),
    ({"samples": 1}, "samples"),
    ({"repair_samples": 0}, "repair_samples"),
    ({"frobnicate": 3}, "unknown fusion option 'frobnicate'"),
    ({"merge_sign": "sum"}, "it is a parameter of merge"),
    ({"solver": "annealing"}, "not a valid value"),
    ({"reg": 0.1}, "applies to solver='sinkhorn' only"),
    ({"solver": "sinkhorn", "reg": -1.0}, "reg must be positive"),
    ({"depth_align": "fixed"}, "needs mapping"),
    ({"fix_first": "yes"}, "not a valid value"),
])
def test_bad_options_are_refused_when_the_config_is_built(kwargs, words):
    with pytest.raises(HetfuseError, match=words):
        FusionConfig(**kwargs)


def test_method_parameters_go_to_the_stage_whose_method_declares_them():
    c = FusionConfig(balance="merge", merge_sign="majority", solver="sinkhorn", reg=0.05, fix_first=False,
                     repair=False)
    assert c.stage("balance").params == {"merge_sign": "majority"}
    assert c.stage("match").params == {"solver": "sinkhorn", "reg": 0.05, "k": None}
    assert c.stage("depth_align").params["fix_first"] is False
    assert c.repair == "none" and FusionConfig(repair=True).repair == "auto"


def test_json_round_trip_and_replace():
    c = FusionConfig(weights=[0.25, 0.75], target=1, depth_align="fixed", mapping=[0, 2], balance="merge",
                     samples=100, repair_samples=300, seed=4)
    d = json.loads(c.to_json())
    assert d["version"] == 2 and d["stages"]["depth_align"] == {"method": "fixed", "params": {"mapping": [0, 2]}}
    assert FusionConfig.from_dict(d) == c
    c2 = c.replace(match="none", seed=5)
    assert c2.match == "none" and c2.seed == 5 and c2.stage("depth_align").params == {"mapping": [0, 2]}
    assert c.replace(merge_sign="majority").stage("balance").params == {"merge_sign": "majority"}


def test_version_1_flat_configurations_still_load():
    old = {"balance": "merge", "extra": {}, "fix_first": True, "fix_last": False, "match": "ot-acts",
           "merge_sign": "majority", "progress": True, "reg": 0.01, "repair": True, "representation": "cka",
           "samples": 200, "seed": 3, "solver": "exact", "target": None, "weights": [0.5, 0.5]}
    c = FusionConfig.from_dict(old)
    assert (c.similarity, c.balance, c.repair, c.samples, c.seed) == ("cka", "merge", "auto", 200, 3)
    assert c.stage("depth_align").params == {"fix_first": True, "fix_last": False}
    assert c.stage("balance").params == {"merge_sign": "majority"}
    # reg had no effect with the exact solver
    assert c.stage("match").params == {"solver": "exact", "reg": None, "k": None}
    with pytest.raises(HetfuseError, match="unknown fusion options: colour"):
        FusionConfig.from_dict(dict(old, colour="red"))


def test_every_registered_method_is_documented_and_buildable():
    for fam in describe_methods():
        assert fam["methods"], fam["family"]
        for m in fam["methods"]:
            assert m["description"] and all(p["help"] for p in m["params"]), m["name"]
            cls = get_method(fam["family"], m["name"])
            if m["name"] != "fixed":
                cls()  # defaults are valid
    assert list(methods("repair")) == ["auto", "bn-reset", "repair", "none", "lsq"]
