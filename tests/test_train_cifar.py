"""Fast tests of the CIFAR training options (augment, one-cycle, label smoothing, channels_last,
max_batches, timing) and of ``hetfuse train`` on digits and on a tiny fake CIFAR-10 root."""

import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from hetfuse.cli import main
from hetfuse.data import skill_split
from hetfuse.errors import HetfuseError
from hetfuse.io import load_checkpoint
from hetfuse.models import MLP, build_model
from hetfuse.train import lr_at, accuracy, predict_logits, train_model

SHAPE = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(spec="resnet20:w=0.25", classes=10, seed=0):
    torch.manual_seed(seed)
    return build_model(spec, input_dim=3 * 32 * 32, output_dim=classes, input_shape=SHAPE)


def _toy_images(n=64, seed=0):
    """Two classes told apart by the sign of the red channel: easy even after crops and flips."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, *SHAPE, generator=g)
    x[:, 0] += (2.0 * y.float() - 1.0).view(-1, 1, 1)
    return x, y


def test_all_options_run_and_record_history():
    x = torch.randn(40, *SHAPE, generator=torch.Generator().manual_seed(1))
    y = torch.arange(40) % 10
    model = _tiny()
    hist = train_model(model, x, y, epochs=2, lr=0.05, momentum=0.9, nesterov=True, batch_size=16,
                       weight_decay=5e-4, augment=True, schedule="onecycle", label_smoothing=0.1,
                       channels_last=True, record_time=True, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2]
    for h in hist:
        assert set(h) == {"epoch", "loss", "train_acc", "seconds", "batches", "lr"}
        assert math.isfinite(h["loss"]) and h["seconds"] > 0 and h["batches"] == 3
    # one schedule list (hetfuse.train.lr_at): the last of the 6 steps is near the one-cycle's end (peak / 1e4)
    assert hist[-1]["lr"] == pytest.approx(lr_at(5, 6, 0.05, "onecycle")) and hist[-1]["lr"] < 0.05 / 5
    assert not model.training
    assert torch.isfinite(predict_logits(model, x)).all()


def test_default_history_keys_are_unchanged():
    x, y = torch.randn(30, 5), torch.arange(30) % 3
    hist = train_model(MLP(5, [4], 3), x, y, epochs=1, progress=False)
    assert set(hist[0]) == {"epoch", "loss", "train_acc"}


def test_augmented_onecycle_smoothed_training_learns_an_easy_problem():
    x, y = _toy_images()
    model = _tiny("vgg11:w=0.125,bn", classes=2)
    hist = train_model(model, x, y, epochs=6, lr=0.05, momentum=0.9, nesterov=True, batch_size=16,
                       augment=True, schedule="onecycle", label_smoothing=0.1, channels_last=True,
                       seed=3, progress=False)
    losses = [h["loss"] for h in hist]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert accuracy(model, x, y) > 80.0


def test_augment_is_seeded_and_changes_the_batches():
    x, y = _toy_images(32)

    def run(seed, augment):
        model = _tiny("resnet20:w=0.25", classes=2)
        train_model(model, x, y, epochs=1, batch_size=16, seed=seed, augment=augment, progress=False)
        return predict_logits(model, x)

    assert torch.equal(run(0, True), run(0, True))
    assert not torch.equal(run(0, True), run(0, False))
    assert not torch.equal(run(0, True), run(1, True))


def test_channels_last_matches_contiguous_training():
    x, y = _toy_images(32)
    outs = []
    for cl in (False, True):
        model = _tiny("resnet20:w=0.25", classes=2)
        train_model(model, x, y, epochs=1, batch_size=16, augment=True, channels_last=cl, progress=False)
        outs.append(predict_logits(model, x.contiguous(memory_format=torch.channels_last) if cl else x))
    assert torch.allclose(outs[0], outs[1], atol=1e-3, rtol=1e-3)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = MLP(5, [4], 3)
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.inner(x)


def test_max_batches_stops_early():
    x, y = torch.randn(100, 5), torch.arange(100) % 3
    m = _Counting()
    hist = train_model(m, x, y, epochs=3, batch_size=10, max_batches=7, record_time=True, progress=False)
    assert m.calls == 7 and len(hist) == 1 and hist[0]["batches"] == 7
    m = _Counting()
    hist = train_model(m, x, y, epochs=3, batch_size=10, max_batches=12, schedule="onecycle", record_time=True,
                       progress=False)
    assert m.calls == 12 and [h["batches"] for h in hist] == [10, 2]
    assert all(math.isfinite(h["loss"]) for h in hist)
    m = _Counting()
    assert train_model(m, x, y, epochs=3, batch_size=10, max_batches=0, progress=False) == [] and m.calls == 0


def test_batchnorm_model_skips_a_trailing_single_example_batch():
    x, y = _toy_images(17)
    hist = train_model(_tiny("vgg11:w=0.125,bn", classes=2), x, y, epochs=1, batch_size=8, record_time=True,
                       progress=False)
    assert hist[0]["batches"] == 2


def test_bad_options_are_refused():
    x, y = torch.randn(10, 5), torch.arange(10) % 2
    m = MLP(5, [4], 2)
    with pytest.raises(HetfuseError, match="schedule"):
        train_model(m, x, y, schedule="triangular", progress=False)
    with pytest.raises(HetfuseError, match="nesterov"):
        train_model(m, x, y, nesterov=True, momentum=0.0, progress=False)
    with pytest.raises(HetfuseError, match="label_smoothing"):
        train_model(m, x, y, label_smoothing=1.5, progress=False)
    with pytest.raises(HetfuseError, match="augment"):
        train_model(m, x, y, augment=True, progress=False)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_train_digits_keeps_the_paper_defaults(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--arch", "mlp:16", "--dataset", "digits", "--epochs", "2", "--out", str(out),
                 "--quiet"]) == 0
    _, meta = load_checkpoint(out)
    assert meta["lr"] == 0.01 and meta["momentum"] == 0.5 and meta["batch_size"] == 64
    assert meta["schedule"] == "constant" and meta["augment"] is False and meta["nesterov"] is False
    assert meta["label_smoothing"] == 0.0 and meta["weight_decay"] == 0.0 and meta["channels_last"] is False
    assert len(meta["history"]) == 2 and all(h["seconds"] > 0 for h in meta["history"])
    text = capsys.readouterr().out
    assert "epoch 1/2" in text and "epoch 2/2" in text and " s" in text


def _fake_cifar10(root, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def batch(n_per_class):
        y = np.repeat(np.arange(10), n_per_class)
        x = rng.integers(0, 256, size=(y.size, 3 * 32 * 32), dtype=np.uint8)
        return pickle.dumps({b"batch_label": b"fake", b"labels": y.tolist(), b"data": x}, protocol=2)

    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(batch(per_class))
    (d / "test_batch").write_bytes(batch(2))
    return root


def test_cli_train_cifar10_tiny_fake_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache"))
    root = _fake_cifar10(tmp_path / "data")
    out = tmp_path / "r.safetensors"
    assert main(["train", "--arch", "resnet20:w=0.25", "--dataset", "cifar10", "--data-root", str(root),
                 "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    model, meta = load_checkpoint(out)
    assert meta["lr"] == 0.1 and meta["momentum"] == 0.9 and meta["nesterov"] is True
    assert meta["schedule"] == "onecycle" and meta["augment"] is True and meta["label_smoothing"] == 0.1
    assert meta["weight_decay"] == 5e-4 and meta["batch_size"] == 128 and meta["train_examples"] == 150
    assert meta["arch_spec"] == "resnet20:w=0.25" and len(meta["history"]) == 1
    assert "epoch 1/1" in capsys.readouterr().out
    assert model(torch.zeros(2, *SHAPE)).shape == (2, 10)

    # explicit flags override the CIFAR defaults; --split works on CIFAR; channels_last runs
    out2 = tmp_path / "v.safetensors"
    assert main(["train", "--arch", "vgg11:w=0.125,bn", "--dataset", "cifar10", "--data-root", str(root),
                 "--epochs", "1", "--no-augment", "--schedule", "constant", "--lr", "0.05", "--no-nesterov",
                 "--label-smoothing", "0", "--weight-decay", "0", "--batch-size", "32", "--split", "skill-a",
                 "--channels-last", "--out", str(out2), "--quiet"]) == 0
    _, meta = load_checkpoint(out2)
    assert (meta["augment"], meta["schedule"], meta["lr"], meta["nesterov"]) == (False, "constant", 0.05, False)
    assert meta["momentum"] == 0.9 and meta["label_smoothing"] == 0 and meta["channels_last"] is True
    labels = torch.arange(10).repeat_interleave(3).repeat(5)
    assert meta["split"] == "skill-a" and meta["train_examples"] == len(skill_split(labels, "skill-a"))
    assert 15 < meta["train_examples"] < 150  # every image of label 4 plus a few of the others

    # a bad architecture string is a clean error, not a traceback
    assert main(["train", "--arch", "vgg7:w=1", "--dataset", "cifar10", "--data-root", str(root),
                 "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 1
    assert "vgg7" in capsys.readouterr().err


def test_cli_fuse_eval_check_cnns_of_different_depth(tmp_path, monkeypatch, capsys):
    """ResNet26- and ResNet20-shaped checkpoints on a fake CIFAR-10 root: fuse with a report, eval, check."""
    import json

    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache"))
    root = _fake_cifar10(tmp_path / "data")
    paths = []
    for spec in ("resnet26:w=0.25", "resnet20:w=0.25"):
        p = tmp_path / (spec.split(":")[0] + ".safetensors")
        assert main(["train", "--arch", spec, "--dataset", "cifar10", "--data-root", str(root), "--epochs", "1",
                     "--out", str(p), "--quiet"]) == 0
        paths.append(str(p))
    out, rep = tmp_path / "f.safetensors", tmp_path / "rep"
    assert main(["fuse", *paths, "--dataset", "cifar10", "--data-root", str(root), "--wb", "0.5",
                 "--representation", "cka", "--samples", "32", "--out", str(out), "--report", str(rep),
                 "--quiet"]) == 0
    report = json.loads((rep / "report.json").read_text())
    fused, _ = load_checkpoint(out)
    from hetfuse.graph import depth_groups, describe

    assert [len(g.units) for g in depth_groups(describe(fused))] == [4, 4, 4]  # ResNet20's widths, ResNet26's depth
    assert report["figures"] and all((rep / f).is_file() for f in report["figures"])
    capsys.readouterr()
    assert main(["eval", *paths, str(out), "--dataset", "cifar10", "--data-root", str(root), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["models"]) == 3
    assert main(["check", str(out)]) == 0
    assert main(["fuse", *paths, "--dataset", "cifar10", "--data-root", str(root), "--balance", "merge",
                 "--samples", "32", "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 1
    assert "merge" in capsys.readouterr().err
