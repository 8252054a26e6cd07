"""Class-split training and evaluation: embedding heads, joint and per-task accuracy, multi-head networks."""

import json

import pytest
import torch

from hetfuse.cli import main
from hetfuse.errors import HetfuseError
from hetfuse.train import OutputHead, class_embeddings, parse_tasks, task_metrics


def test_class_embeddings_are_fixed_unit_vectors():
    e = class_embeddings(10, 512, seed=0)
    assert e.shape == (10, 512)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(10))
    assert torch.equal(e, class_embeddings(10, 512, seed=0))
    assert not torch.equal(e, class_embeddings(10, 512, seed=1))
    # well spread: no two classes nearly alike
    cos = e @ e.T - torch.eye(10)
    assert cos.abs().max() < 0.3


def test_an_embed_head_learns_over_its_own_classes_only():
    head = OutputHead("embed", 10, [6, 7, 3, 0, 5], dim=16)
    y = torch.tensor([6, 7, 3, 0, 5, 6])
    assert head.train_targets(y).tolist() == [0, 1, 2, 3, 4, 0]
    out = head.embeddings()[[3, 0]] * 4.0  # outputs pointing at classes 3 and 0
    assert head.train_logits(out).argmax(1).tolist() == [2, 3]
    assert head.scores(out).argmax(1).tolist() == [3, 0]
    torch.testing.assert_close(head.scores(out).max(1).values, torch.full((2,), 100.0))
    with pytest.raises(HetfuseError, match="outside"):
        head.train_targets(torch.tensor([1]))
    assert OutputHead.from_dict(head.to_dict(), 10) == head


def test_joint_and_per_task_accuracy():
    tasks = parse_tasks("0,1/2,3")
    y = torch.tensor([0, 1, 2, 3])
    # image 0 is scored highest as class 2 (joint wrong) but within its task as class 0 (task right)
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.1], [0.0, 0.0, 0.9, 0.1]])
    m = task_metrics(scores, y, tasks)
    assert m["joint"] == 50.0 and m["tasks"] == [100.0, 50.0] and m["per_task_avg"] == 75.0
    with pytest.raises(HetfuseError, match="disjoint"):
        parse_tasks("0,1/1,2")


def test_multi_head_convention():
    """Each head scores its own classes through a softmax; joint = argmax across heads; a task uses its head."""
    tasks = [[0, 1], [2, 3]]
    y = torch.tensor([0, 3])
    head_a = torch.tensor([[5.0, 0.0, 9.0, 9.0], [0.0, 0.1, 9.0, 9.0]])  # scores of classes 2, 3 are ignored
    head_b = torch.tensor([[9.0, 9.0, 0.0, 0.2], [9.0, 9.0, 0.0, 3.0]])
    m = task_metrics(None, y, tasks, head_scores=[head_a, head_b], head_classes=tasks)
    # image 0: head a is confident in class 0 (p≈0.99) vs head b's class 3 (p≈0.55): joint right
    # image 1: head a's best is class 1 (p≈0.52), head b's class 3 (p≈0.95): joint right
    assert m == {"joint": 100.0, "tasks": [100.0, 100.0], "per_task_avg": 100.0}


def test_cli_class_split_train_and_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path, classes, arch in ((a, "0,1,2,3,4", "mlp:24"), (b, "5,6,7,8,9", "mlp:24,16")):
        assert main(["train", "--arch", arch, "--dataset", "digits", "--classes", classes, "--head", "embed",
                     "--epochs", "3", "--lr", "0.05", "--momentum", "0.9", "--out", str(path), "--quiet"]) == 0
    f = tmp_path / "f.safetensors"
    assert main(["fuse", str(a), str(b), "--dataset", "digits", "--match", "elastic-zip", "--out", str(f),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(a), str(b), "--dataset", "digits", "--tasks", "0,1,2,3,4/5,6,7,8,9",
                 "--ensemble", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [m["path"] for m in res["models"]] == [str(a), str(b)]
    for m in res["models"] + [res["ensemble"]]:
        assert set(m) >= {"joint", "tasks", "per_task_avg"} and len(m["tasks"]) == 2
    # a task model knows nothing of the other task's classes; the ensemble uses each model on its own task
    ma, mb, ens = res["models"][0], res["models"][1], res["ensemble"]
    assert ma["tasks"][0] > 60 and ens["tasks"] == [ma["tasks"][0], mb["tasks"][1]]
    assert main(["eval", str(f), "--dataset", "digits", "--tasks", "0,1,2,3,4/5,6,7,8,9", "--json"]) == 0
    fused = json.loads(capsys.readouterr().out)["models"][0]
    assert 0 <= fused["joint"] <= 100 and len(fused["tasks"]) == 2
    assert main(["train", "--arch", "mlp:8", "--dataset", "digits", "--classes", "1,2", "--split", "skill-a",
                 "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 1


def test_train_embed_scale_is_recorded_and_checked(tmp_path):
    from hetfuse.io.checkpoint import load_checkpoint

    out = tmp_path / "a.safetensors"
    assert main(["train", "--arch", "mlp:16", "--dataset", "digits", "--classes", "0,1,2", "--head", "embed",
                 "--embed-scale", "10", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    _, meta = load_checkpoint(out)
    assert meta["head"]["scale"] == 10.0 and meta["head"]["classes"] == [0, 1, 2]
    assert main(["train", "--arch", "mlp:16", "--dataset", "digits", "--head", "embed", "--embed-scale", "0",
                 "--epochs", "1", "--out", str(tmp_path / "b.safetensors"), "--quiet"]) == 1
