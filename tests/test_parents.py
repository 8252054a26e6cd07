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


@pytest.mark.parametrize("file_limit", [None, 40_000])
def test_an_interrupted_parent_resumes_after_its_last_finished_epoch(tiny, monkeypatch, tmp_path, file_limit):
    if file_limit is not None:  # a state bigger than a file may be (the ResNet-20 x0.25 state: ~0.14 MB)
        monkeypatch.setattr(P, "MAX_STATE_FILE_BYTES", file_limit)
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
    state = tiny / "resumed" / "_resume" / "t-full.state.safetensors"
    assert state.is_file()  # kept beside the committed parents, where a session can commit it
    files = list(state.parent.glob("t-full.state*"))
    assert len(files) == (1 if file_limit is None else 4)  # 0.14 MB in files of at most ~40 kB
    if file_limit is not None:  # none over the limit, unless one tensor is (none is, here)
        # the tensors of each file stay under the limit; the file adds a header (names, offsets, the log: ~3 kB)
        assert all(f.stat().st_size <= 1.1 * file_limit for f in files), [(f.name, f.stat().st_size) for f in files]
    monkeypatch.setattr(P, "_metrics", metrics)
    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "a-new-machine"))  # the cache did not survive
    resumed = P.train_parent(p, ds, out_root=tiny / "resumed", progress=False)
    a, _ = P.load_parent("t-full", root=tiny / "whole", train_missing=False)
    b, _ = P.load_parent("t-full", root=tiny / "resumed", train_missing=False)
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(u, v), k
    assert (whole / "log.csv").read_text().count("\n") == (resumed / "log.csv").read_text().count("\n") == 3
    assert not (tiny / "resumed" / "_resume").exists()  # a finished parent's state is deleted


def test_a_parent_another_process_trains_is_skipped_not_trained_twice(tiny, monkeypatch, capsys):
    ds = _data()
    monkeypatch.setattr("hetfuse.data.load_dataset", lambda *a, **k: ds)
    state_dir = P.resume_dir(tiny)
    state_dir.mkdir(parents=True)
    with P.training_lock(state_dir, "t-full"):  # as another process would hold it (flock: per open file)
        with pytest.raises(P.ParentBusy, match="another process"):
            P.train_parent(P.PARENTS["t-full"], ds, out_root=tiny, progress=False)
        done = P.run_parents(out_dir=tiny, only=["t-full", "t-task"], progress=False)
        assert [d.name for d in done] == ["t-task"]  # the queue went on with its next parent
        assert "skipped: parent t-full is being trained by another process" in capsys.readouterr().out
        assert not (tiny / "t-full").exists()
    assert (P.train_parent(P.PARENTS["t-full"], ds, out_root=tiny, progress=False) / "model.safetensors").is_file()
    assert not state_dir.exists()  # the finished parent's lock went with its state


def test_a_state_left_in_the_cache_by_an_older_version_is_moved_and_resumed(tiny, monkeypatch, tmp_path):
    ds = _data()
    p = P.PARENTS["t-full"]
    calls, metrics = [], P._metrics

    def dies_in_epoch_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return metrics(*args)

    monkeypatch.setattr(P, "_metrics", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        P.train_parent(p, ds, out_root=tiny, progress=False)
    legacy = tmp_path / "cache" / "parents"
    legacy.mkdir(parents=True)
    for f in (tiny / "_resume").iterdir():
        f.rename(legacy / f.name)
    after = []
    monkeypatch.setattr(P, "_metrics", lambda *args: after.append(1) or metrics(*args))
    folder = P.train_parent(p, ds, out_root=tiny, progress=False)
    assert (folder / "log.csv").read_text().count("\n") == 3
    assert len(after) == 2  # epoch 1 came from the moved state: epoch 2's log line and the final accuracy.json
    assert not list(legacy.iterdir())


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


def test_class_split_tables_run_on_committed_parents_and_wait_for_missing_ones(tiny, monkeypatch, tmp_path):
    from hetfuse.experiments import class_split as C

    monkeypatch.setenv("HETFUSE_PARENTS", str(tiny))
    recipe = dict(P.RECIPE, batch_size=16)
    (a_classes, b_classes) = C.CIFAR10_SPLITS[0]
    entries = {f"cs0{t}-{key}": P.Parent(f"cs0{t}-{key}", arch, 1, seed=100 * (t == "B"), classes=tuple(cls),
                                         recipe=recipe)
               for t, cls in (("A", a_classes), ("B", b_classes))
               for key, arch in (("r1", "resnet20:w=0.25"), ("r2", "resnet32:w=0.25"))}
    monkeypatch.setattr(P, "PARENTS", entries)
    ds = _data()
    for name in ("cs0A-r1", "cs0B-r1", "cs0A-r2"):  # cs0B-r2 is still training
        P.train_parent(entries[name], ds, out_root=tiny, progress=False)
    setting = C.Setting("converged-test", "cifar10", {"a": "resnet20:w=0.25", "b": "resnet32:w=0.25"},
                        C.CIFAR10_SPLITS[:1], 1, recipe,
                        [C.Method("Homo Perm", "homo", match="perm-acts"), C.Method("Perm + LMA", "hetero", "lma",
                                                                                      "perm-acts")],
                        embed_scale=P.CLASS_SPLIT_EMBED_SCALE, parents={"a": "r1", "b": "r2"})
    out = tmp_path / "table"
    rows = C.run_class_split("converged-test", out_dir=out, dataset=ds, setting=setting, samples=16, progress=False,
                             committed_only=True, command="hetfuse experiment class-split-converged-test")
    got = {(r["direction"], r["method"]) for r in rows}
    # direction 0 (r1 on A + r2 on B) has no hetero row; direction 1 (r2 on A + r1 on B) no homogeneous r2 pair
    assert got == {(0, "Task A"), (0, "Homo Perm"), (1, "Task A"), (1, "Task B"), (1, "Ensemble"), (1, "Perm + LMA")}
    summary = (out / "summary.md").read_text()
    assert "parent cs0B-r2 is not committed yet: " in summary and "Perm + LMA (split 0, direction 0)" in summary
    # the task model rows are the committed parents' own accuracies
    model, head = P.load_parent("cs0A-r2")
    task = next(r for r in rows if r["method"] == "Task A")
    assert task["task_a"] == pytest.approx(P._metrics(model, head, entries["cs0A-r2"], ds)["test_acc_own"])
    P.train_parent(entries["cs0B-r2"], ds, out_root=tiny, progress=False)
    rows = C.run_class_split("converged-test", out_dir=out, dataset=ds, setting=setting, samples=16, progress=False,
                             committed_only=True, resume=True)
    assert len(rows) == 2 * 5 and "not committed" not in (out / "summary.md").read_text()


def test_the_converged_settings_name_their_parents_and_refuse_what_does_not_apply():
    from hetfuse.experiments import class_split as C

    for name, keys in [("converged-resnet", ("resnet20", "resnet32")), ("converged-vgg", ("vgg11", "vgg16")),
                       ("converged-width", ("resnet20x0.5", "resnet20"))]:
        s = C.settings(name)
        assert s.parents == dict(zip("ab", keys, strict=True))
        for k in range(len(s.splits)):
            for task in "AB":
                for key in keys:
                    p = P.PARENTS[f"cs{k}{task}-{key}"]
                    assert list(p.classes) == s.splits[k][task == "B"] and p.seed == 100 * (task == "B")
    with pytest.raises(HetfuseError, match="--epochs"):
        C.run_class_split("converged-resnet", out_dir="unused", epochs=3)
    with pytest.raises(HetfuseError, match="first 2 class splits"):
        C.settings("converged-resnet", splits=3)


def test_the_one_shot_experiment_fuses_the_committed_full_data_parents(tiny, monkeypatch, tmp_path):
    from hetfuse.experiments import cifar_oneshot as O

    monkeypatch.setenv("HETFUSE_PARENTS", str(tiny))
    recipe = dict(P.RECIPE, batch_size=16)
    entries = {"f-deep": P.Parent("f-deep", "resnet32:w=0.25", 1, recipe=recipe),
               "f-shallow": P.Parent("f-shallow", "resnet20:w=0.25", 1, seed=1, recipe=recipe)}
    monkeypatch.setattr(P, "PARENTS", entries)
    monkeypatch.setitem(O.PARENT_SETUPS, "converged-test", {"a": "f-deep", "b": "f-shallow", "paper": "n/a"})
    ds = _data()
    for p in entries.values():
        P.train_parent(p, ds, out_root=tiny, progress=False)
    rows = O.run_cifar_oneshot(setup="converged-test", out_dir=tmp_path / "o", samples=16, progress=False,
                               dataset=ds, wbs=(0.0, 1.0), command="hetfuse experiment cifar-converged-test")
    from hetfuse.train import accuracy

    deep, _ = P.load_parent("f-deep")
    shallow, _ = P.load_parent("f-shallow")
    assert rows[0]["acc_a"] == pytest.approx(accuracy(deep, ds.x_test, ds.y_test))
    assert rows[0]["acc_b"] == pytest.approx(accuracy(shallow, ds.x_test, ds.y_test))
    assert rows[0]["acc_fused"] == rows[0]["acc_a"]  # wB = 0 without repair: model A itself
    assert rows[1]["acc_fused"] == pytest.approx(rows[1]["acc_b"])  # wB = 1: B with zero (identity) blocks added
    # the ensemble is read off each parent's outputs computed once: its ends are the parents themselves
    assert rows[0]["acc_ensemble"] == rows[0]["acc_a"] and rows[1]["acc_ensemble"] == rows[1]["acc_b"]
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "`resnet32:w=0.25`" in summary and "committed in results/parents" in summary

    # several seeds (the alignment samples): a folder each and a summary of means over them
    from hetfuse.experiments import run_cifar_experiment

    rows = run_cifar_experiment("converged-test", seeds=[0, 1], out_dir=tmp_path / "s", samples=16, progress=False,
                                dataset=ds, wbs=(0.5,), command="hetfuse experiment cifar-converged-test")
    assert [r["seed"] for r in rows] == [0, 1]
    assert (tmp_path / "s" / "seed0" / "results.csv").is_file() and (tmp_path / "s" / "seed1" / "results.csv").is_file()
    text = (tmp_path / "s" / "summary.md").read_text()
    fused = [r["acc_fused_repair"] for r in rows]
    mean, std = sum(fused) / 2, abs(fused[0] - fused[1]) / 2 ** 0.5
    assert f"{mean:.2f} ± {std:.2f}" in text and "seeds [0, 1]" in text
    assert (tmp_path / "s" / "command.txt").read_text().startswith("hetfuse experiment cifar-converged-test")
