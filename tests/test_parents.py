"""The committed-parents experiment: a parent's folder (weights, per-epoch log, command, accuracy), loading it back,
and resuming an interrupted training from its last finished epoch (tiny synthetic data, CPU, seconds)."""

import json

import pytest
import torch

from hetfuse.data.base import Dataset
from hetfuse.errors import HetfuseError
from hetfuse.experiments import parents as P

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(80) % 10
    x = 0.3 * torch.randn(80, 3, 32, 32, generator=g)
    x[:, 0] += (y.float() / 5 - 1).view(-1, 1, 1)
    return Dataset("cifar10", x[:60], y[:60], x[60:], y[60:], 10, (3, 32, 32))


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache"))
    recipe = dict(P.RECIPE, batch_size=16)
    entries = {"t-full": P.Parent("t-full", "resnet20:w=0.25", 2, recipe=recipe),
               "t-task": P.Parent("t-task", "resnet20:w=0.25", 2, classes=(0, 1, 2, 3, 4), recipe=recipe)}
    monkeypatch.setattr(P, "PARENTS", entries)
    return tmp_path / "parents"


def test_a_parent_folder_holds_weights_log_command_and_accuracy(tiny):
    ds = _data()
    for name in ("t-full", "t-task"):
        folder = P.train_parent(P.PARENTS[name], ds, out_root=tiny, progress=False)
        assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "log.csv", "command.txt", "accuracy.json"}
        log = (folder / "log.csv").read_text().splitlines()
        assert len(log) == 3 and "seconds" in log[0]
        assert ("test_acc" in log[0]) if name == "t-full" else ("test_acc_own" in log[0] and "test_joint" in log[0])
        acc = json.loads((folder / "accuracy.json").read_text())
        model, head = P.load_parent(name, root=tiny, train_missing=False)
        assert next(model.parameters()).dtype == torch.float32 and not model.training
        assert (head is None) == (name == "t-full")
        for k, v in P._metrics(model, head, P.PARENTS[name], ds).items():
            assert acc[k] == pytest.approx(v)
        assert f"--only {name}" in (folder / "command.txt").read_text()


def test_an_interrupted_parent_resumes_after_its_last_finished_epoch(tiny, monkeypatch, tmp_path):
    ds = _data()
    p = P.PARENTS["t-full"]
    whole = P.train_parent(p, ds, out_root=tiny / "whole", progress=False)
    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache2"))
    calls, metrics = [], P._metrics

    def dies_in_epoch_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine went away during epoch 2's evaluation
        return metrics(*args)

    monkeypatch.setattr(P, "_metrics", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        P.train_parent(p, ds, out_root=tiny / "resumed", progress=False)
    monkeypatch.setattr(P, "_metrics", metrics)
    resumed = P.train_parent(p, ds, out_root=tiny / "resumed", progress=False)
    a, _ = P.load_parent("t-full", root=tiny / "whole", train_missing=False)
    b, _ = P.load_parent("t-full", root=tiny / "resumed", train_missing=False)
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(u, v), k
    assert (whole / "log.csv").read_text().count("\n") == (resumed / "log.csv").read_text().count("\n") == 3


def test_unknown_parents_are_named():
    with pytest.raises(HetfuseError, match="unknown parent"):
        P.run_parents(only=["no-such-parent"])


def test_the_summary_lists_every_entry_with_its_status(tiny):
    P.train_parent(P.PARENTS["t-full"], _data(), out_root=tiny, progress=False)
    text = P.summarize(tiny)
    assert (tiny / "README.md").read_text() == text
    full = next(line for line in text.splitlines() if line.startswith("| t-full "))
    task = next(line for line in text.splitlines() if line.startswith("| t-task "))
    assert "waiting" not in full and "| no |" in full  # two epochs of a tiny net: far below the 90 % target
    assert "waiting" in task
