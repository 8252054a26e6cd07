"""What a new user stumbles on: results never overwritten silently, commands recorded as run, one cache, one
index convention, one-line errors, no silently ignored flags, files that respect the umask."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from hetfuse.cli import main
from hetfuse.errors import DataError
from hetfuse.io import save_checkpoint
from hetfuse.models import MLP
from conftest import real_root

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("use")
    a, b = d / "a.safetensors", d / "b.safetensors"
    assert main(["train", "--arch", "mlp:24,16", "--dataset", "digits", "--epochs", "1", "--out", str(a),
                 "--quiet"]) == 0
    assert main(["train", "--arch", "mlp:24,20,16", "--dataset", "digits", "--epochs", "1", "--seed", "1",
                 "--out", str(b), "--quiet"]) == 0
    return d, a, b


def test_an_experiment_refuses_a_folder_that_holds_results(tmp_path, capsys):
    out = tmp_path / "st"
    out.mkdir()
    (out / "results.csv").write_text("keep me")
    assert main(["experiment", "skill-transfer", "--seeds", "0", "--epochs", "1", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and "results.csv" in err[0]
    assert (out / "results.csv").read_text() == "keep me"


def test_the_recorded_command_is_the_one_that_ran(monkeypatch):
    from hetfuse.experiments.common import command_line

    monkeypatch.setattr("sys.argv", ["/usr/local/bin/hetfuse", "experiment", "skill-transfer", "--seeds", "0",
                                     "--out", "my folder"])
    assert command_line() == "hetfuse experiment skill-transfer --seeds 0 --out 'my folder'"


def test_provenance_flags_changed_code_not_results_written_into_the_checkout(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from hetfuse.experiments import common

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "checkout"
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "src" / "pkg" / "common.py").write_text("x = 1\n")
    (repo / "results" / "r.csv").write_text("a\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["-C", str(repo), "add", "."], check=True)
    subprocess.run(git + ["-C", str(repo), "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(common, "__file__", str(repo / "src" / "pkg" / "common.py"))
    (repo / "results" / "r.csv").write_text("b\n")  # an experiment rewrote a committed result
    info = common.provenance()
    assert len(info["git_commit"]) == 40 and info["git_dirty"] is False
    (repo / "src" / "pkg" / "common.py").write_text("x = 2\n")
    assert common.provenance()["git_dirty"] is True
    common.write_command(tmp_path, "hetfuse experiment x")
    assert "(with uncommitted changes to the package)" in (tmp_path / "command.txt").read_text()


def test_experiments_keep_their_models_under_the_one_cache_root(tmp_path, monkeypatch):
    from hetfuse.data import load_dataset
    from hetfuse.experiments.common import train_mlp

    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("digits")
    m = train_mlp(ds, None, [8], part="all", seed=0, epochs=1)
    files = list((tmp_path / "cache" / "models").glob("*.safetensors"))
    assert len(files) == 1
    again = train_mlp(ds, None, [8], part="all", seed=0, epochs=1)  # from the cache
    assert torch.equal(again.linears()[0].weight, m.linears()[0].weight)
    other = train_mlp(ds, None, [8], part="all", seed=1, epochs=1)  # another seed is another entry
    assert len(list((tmp_path / "cache" / "models").glob("*.safetensors"))) == 2
    assert not torch.equal(other.linears()[0].weight, m.linears()[0].weight)


def test_one_index_convention(pair, capsys, tmp_path):
    d, a, b = pair
    out, rep = tmp_path / "f.safetensors", tmp_path / "rep"
    assert main(["fuse", str(a), str(b), "--dataset", "digits", "--out", str(out), "--report", str(rep),
                 "--quiet", "--samples", "100"]) == 0
    line = capsys.readouterr().out
    assert "shallow unit → deep unit (1-based): model 0 → model 1: 1→1, 2→3" in line
    report = json.loads((rep / "report.json").read_text())
    assert [m["alignment"] for m in report["mappings"] if m["changed"]] == [[0, 2]]  # 0-based in JSON
    assert "0-based" in README and "1-based" in README
    # merge: the arrow still goes from the shallow model to the deep one
    assert main(["fuse", str(a), str(b), "--dataset", "digits", "--out", str(tmp_path / "m.safetensors"),
                 "--balance", "merge", "--quiet", "--samples", "100"]) == 0
    assert "model 0 → model 1: 1→1, 2→3" in capsys.readouterr().out


def test_missing_data_is_one_line_with_details_on_request(pair, tmp_path, capsys):
    d, a, b = pair
    for argv in (["eval", str(a), "--dataset", "idx:/nonexistent"],
                 ["eval", str(a), "--dataset", "mnist", "--data-root", "/nonexistent"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and err[1] == "(--verbose for details)" and "expected" in err[0]
        assert main(argv + ["--verbose"]) == 1
        assert "looked at" in capsys.readouterr().err
    with pytest.raises(DataError) as e:
        from hetfuse.data import load_dataset

        load_dataset("cifar100", tmp_path)
    assert "\n" not in str(e.value) and "cifar-100-python" in str(e.value)


def test_flags_that_would_be_ignored_are_refused(pair, tmp_path, capsys):
    d, a, b = pair
    assert main(["fuse", str(a), str(b), "--dataset", "digits", "--reg", "0.1",
                 "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 1
    assert "sinkhorn" in capsys.readouterr().err
    assert main(["eval", str(a), str(b), "--dataset", "digits", "--weights", "0.5,0.5"]) == 1
    assert "--ensemble" in capsys.readouterr().err
    assert main(["fuse", str(a), str(b), "--dataset", "digits", "--merge-sign", "majority",
                 "--out", str(tmp_path / "y.safetensors"), "--quiet"]) == 1
    assert "merge" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "fuse", "eval"])
def test_help_lists_every_data_set_and_the_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("mnist (default", "cifar10", "cifar100", "idx:PATH", "digits"):
        assert name in text


def test_every_flag_of_every_command_is_documented():
    """Every --flag that some command's --help shows is in the README (a method parameter's flag may appear as
    the parameter's name in the generated method table; --no-X as --X); so is every experiment name."""
    import argparse

    from hetfuse.cli import _method_params, _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    params = {"--" + n.replace("_", "-") for n in _method_params()}
    missing = []
    for name, p in sub.choices.items():
        for act in p._actions:
            for opt in act.option_strings:
                if not opt.startswith("--") or opt == "--help" or opt in README:
                    continue
                if opt in params and f"`{opt[2:].replace('-', '_')}`" in README:
                    continue
                if opt.startswith("--no-") and "--" + opt[5:] in README:
                    continue
                missing.append(f"{name} {opt}")
        if name == "experiment":
            choices = next(a for a in p._actions if a.dest == "name").choices
            missing += [f"experiment {c}" for c in choices if f"`{c}`" not in README]
    assert missing == []


def test_real_data_tests_follow_one_rule(monkeypatch):
    monkeypatch.delenv("HETFUSE_DATA", raising=False)
    assert real_root("mnist") is None  # even where ../shared/data exists: the tests read $HETFUSE_DATA only
    assert "$HETFUSE_DATA" in README and "skipped" in README


def test_written_files_respect_the_umask(pair, tmp_path):
    d, a, b = pair
    old = os.umask(0o022)
    try:
        p = save_checkpoint(MLP(4, [3], 2), tmp_path / "m.safetensors")
        assert p.stat().st_mode & 0o777 == 0o644
        assert main(["fuse", str(a), str(b), "--dataset", "digits", "--out", str(tmp_path / "f.safetensors"),
                     "--quiet", "--samples", "100"]) == 0
        assert (tmp_path / "f.config.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_small_things_are_documented():
    assert re.search(r'`\{"dataset", "models"', README)  # the eval JSON's keys
    assert "adds biases" in README  # REPAIR gives bias-free layers a bias
    assert "--ensemble --json     # the parents and their ensemble" in README


def test_the_first_cifar_decode_says_what_it_does(tmp_path, capsys):
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from hetfuse.data import load_cifar

    root = tmp_path / "cifar10"
    root.mkdir()
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "w:gz") as tf:
        for split in ("train", "test"):
            for cls in ("airplane", "cat"):
                buf = io.BytesIO()
                Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"{split}/{cls}/0001.jpg")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    load_cifar("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert "decoding cifar10" in capsys.readouterr().err
    load_cifar("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert "decoding" not in capsys.readouterr().err  # cached: nothing to say


def test_a_dataloader_is_sampled_like_a_tensor():
    """A DataLoader over the same rows gives the same seeded random samples as the tensor (not its first n rows),
    and only a bounded part of a long iterable is read."""
    from torch.utils.data import DataLoader, TensorDataset

    import hetfuse
    from hetfuse.pipeline import gather_samples

    torch.manual_seed(0)
    x, y = torch.randn(1000, 64), torch.randint(0, 10, (1000,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    for n, seed in ((100, 0), (100, 3), (1000, 1)):
        assert torch.equal(gather_samples(loader, n, seed=seed), gather_samples(x, n, seed=seed))
    assert not torch.equal(gather_samples(loader, 100), x[:100])
    read = []

    def batches():  # endless: reading stops at max(n, the rows that fit in pool_bytes)
        k = 0
        while True:
            read.append(k)
            yield torch.full((10, 4), float(k))
            k += 1

    got = gather_samples(batches(), 30, seed=0, pool_bytes=100 * 4 * 4)  # 100 rows of 4 float32
    assert len(read) == 10 and got.shape == (30, 4) and len(set(got[:, 0].tolist())) > 3
    with pytest.raises(DataError, match="asked 50, the data gave 20"):
        gather_samples(iter([torch.zeros(20, 4)]), 50)
    from torch import nn

    a = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    b = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 10))
    f1 = hetfuse.fuse([a, b], x, samples=200).model
    f2 = hetfuse.fuse([a, b], loader, samples=200).model
    assert all(torch.equal(p, q) for p, q in zip(f1.state_dict().values(), f2.state_dict().values(), strict=True))


def test_the_demo_shows_its_progress(capsys):
    from hetfuse.demo import run_demo

    table = run_demo(epochs=1, progress=True)
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [ln[ln.index("["):] for ln in err.splitlines() if re.search(r"\[ *\d+\.\d s\]", ln)]
    assert len(lines) >= 7, err
    for stage in ("training model A", "training model B", "balance add", "balance merge", "done"):
        assert any(stage in ln for ln in lines), (stage, lines)
    assert "model A" in table
    run_demo(epochs=1, progress=False)  # --quiet
    assert capsys.readouterr().err == ""
    assert "about 10 s" not in README and "hetfuse --version" in README
