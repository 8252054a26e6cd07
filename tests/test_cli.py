import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from hetfuse.cli import main
from hetfuse.io import load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    a, b = d / "a.safetensors", d / "b.safetensors"
    assert main(["train", "--arch", "mlp:32,16", "--dataset", "digits", "--epochs", "3", "--lr", "0.05",
                 "--split", "skill-a", "--out", str(a), "--quiet"]) == 0
    assert main(["train", "--arch", "mlp:32,24,16", "--dataset", "digits", "--epochs", "3", "--lr", "0.05",
                 "--split", "skill-b", "--seed", "1", "--out", str(b), "--quiet"]) == 0
    return d, a, b


def test_train_writes_a_checkpoint_with_its_architecture(trained):
    _, a, _ = trained
    model, meta = load_checkpoint(a)
    assert model.arch()["hidden"] == [32, 16] and model.arch()["bias"] is False
    assert meta["split"] == "skill-a" and meta["dataset"] == "digits" and len(meta["history"]) == 3


def test_fuse_eval_check_roundtrip(trained, capsys):
    d, a, b = trained
    out, rep = d / "f.safetensors", d / "rep"
    assert main(["fuse", str(a), str(b), "--dataset", "digits", "--wb", "0.3", "--samples", "200",
                 "--out", str(out), "--report", str(rep), "--quiet"]) == 0
    config = json.loads((d / "f.config.json").read_text())
    assert config["weights"] == [0.7, 0.3] and config["stages"]["repair"]["method"] == "auto"
    assert config["samples"] == 200
    report = json.loads((rep / "report.json").read_text())
    assert report["fused_widths"] == [32, 32, 16]
    assert [m["alignment"] for m in report["mappings"] if m["changed"]] == [[0, 2]]
    assert (rep / report["figures"][0]).stat().st_size > 1000
    capsys.readouterr()
    assert main(["eval", str(a), str(b), str(out), "--dataset", "digits", "--ensemble", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [m["path"] for m in res["models"]] == [str(a), str(b), str(out)]
    assert all(0 <= m["accuracy"] <= 100 for m in res["models"]) and res["ensemble"]["accuracy"] > 10
    assert main(["check", str(out)]) == 0
    assert "OK" in capsys.readouterr().out


def test_wb_zero_gives_back_the_first_model(trained, capsys):
    d, a, b = trained
    out = d / "f0.safetensors"
    assert main(["fuse", str(a), str(b), "--dataset", "digits", "--wb", "0", "--no-repair", "--samples", "100",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    main(["eval", str(a), str(out), "--dataset", "digits", "--json"])
    accs = [m["accuracy"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert accs[0] == pytest.approx(accs[1])


def _fails(argv, capsys, words):
    assert main(argv) != 0
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_bad_input_exits_non_zero_and_writes_nothing(trained, tmp_path, capsys):
    d, a, b = trained
    out = tmp_path / "x.safetensors"
    base = ["fuse", str(a), str(b), "--dataset", "digits", "--out", str(out), "--quiet", "--samples", "100"]
    _fails(base + ["--weights", "0.5,0.6"], capsys, ["sum to 1"])
    _fails(base + ["--weights=-0.5,1.5"], capsys, ["non-negative"])
    _fails(["fuse", str(a), str(b), str(a), "--wb", "0.2", "--dataset", "digits", "--out", str(out)], capsys,
           ["--wb", "two models"])
    _fails(base[:-2] + ["--samples", "5000"], capsys, ["fewer samples"])
    _fails(["fuse", str(a), str(b), "--dataset", "nope", "--out", str(out)], capsys, ["unknown", "nope"])
    assert not out.exists() and not (tmp_path / "x.config.json").exists()
    # existing outputs are refused unless --force
    out.write_text("keep me")
    _fails(base, capsys, ["exists", "--force"])
    assert out.read_text() == "keep me"
    assert main(base + ["--force"]) == 0
    assert load_checkpoint(out)[0] is not None


def test_missing_data_says_where_it_looked(trained, tmp_path, capsys, monkeypatch):
    d, a, b = trained
    monkeypatch.delenv("HETFUSE_DATA", raising=False)
    _fails(["eval", str(a), "--dataset", "mnist"], capsys, ["HETFUSE_DATA"])
    _fails(["eval", str(a), "--dataset", "mnist", "--data-root", str(tmp_path)], capsys, [str(tmp_path / "mnist")])


def test_foreign_corrupt_and_pickle_checkpoints_are_refused(trained, tmp_path, capsys):
    d, a, b = trained
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _fails(["eval", str(junk), "--dataset", "digits"], capsys, [str(junk)])
    model, _ = load_checkpoint(a)
    pkl = tmp_path / "m.pt"
    torch.save(model, pkl)
    _fails(["eval", str(pkl), "--dataset", "digits"], capsys, ["--allow-pickle"])
    assert main(["eval", str(pkl), "--dataset", "digits", "--allow-pickle"]) == 0
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    _fails(["check", str(foreign)], capsys, ["hetfuse"])


def _write_idx(path, arr, code):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(">u1").tobytes())


def test_models_with_different_input_sizes_are_refused(trained, tmp_path, capsys):
    d, a, b = trained
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny"
    root.mkdir()
    for prefix, n in (("train", 120), ("t10k", 30)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 4, 4)), 0x08)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 0x08)
    c = tmp_path / "c.safetensors"
    assert main(["train", "--arch", "mlp:8", "--dataset", f"idx:{root}", "--epochs", "1", "--out", str(c),
                 "--quiet"]) == 0
    _fails(["fuse", str(a), str(c), "--dataset", "digits", "--out", str(tmp_path / "y.safetensors")], capsys,
           ["16 inputs", "64 input features"])


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "hetfuse.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fuse" in out.stdout and "experiment" in out.stdout


def test_version(capsys):
    import hetfuse

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"hetfuse {hetfuse.__version__}\n"


def test_elastic_zip_takes_a_list_of_widths(trained, tmp_path, capsys):
    from hetfuse.graph import describe

    d, a, b = trained
    out = tmp_path / "z.safetensors"
    base = ["fuse", str(a), str(b), "--dataset", "digits", "--match", "elastic-zip", "--samples", "100",
            "--out", str(out), "--quiet"]
    assert main(base + ["--width", "40,30,20"]) == 0  # one width per neuron space of the balanced networks
    assert describe(load_checkpoint(out)[0]).widths == [40, 30, 20]
    assert json.loads((tmp_path / "z.config.json").read_text())["stages"]["match"]["params"]["width"] == [40, 30, 20]
    capsys.readouterr()
    for value, widths in (("min", [32, 24, 16]), ("target", [32, 32, 16])):  # target: a's, with its identity layer
        assert main(base + ["--width", value, "--force"]) == 0
        assert describe(load_checkpoint(out)[0]).widths == widths
    for value, words in (("40,x", ["--width", "40,x", "comma-separated"]), ("40,,20", ["--width", "comma-separated"]),
                         ("widest", ["max|min|target"]), ("40,30", ["2 widths", "3 neuron spaces"]),
                         ("=0,30,20", ["positive"])):
        flag = ["--width" + value] if value.startswith("=") else ["--width", value]
        assert main(base + flag + ["--force"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hetfuse fuse: error: "), err
        for w in words:
            assert w in err[0], err


def test_an_existing_output_is_refused_with_the_command_lines_words(trained, tmp_path, capsys, monkeypatch):
    """save_model tells a Python caller force=True; the same refusal on the command line says --force."""
    import hetfuse.cli

    d, a, b = trained
    out = tmp_path / "t.safetensors"
    out.write_bytes(a.read_bytes())
    monkeypatch.setattr(hetfuse.cli, "_refuse_existing", lambda paths, force: None)  # as if it appeared meanwhile
    assert main(["train", "--arch", "mlp:8", "--dataset", "digits", "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--force" in err and "force=True" not in err
    assert out.read_bytes() == a.read_bytes()


def test_check_and_eval_a_plain_sequential(tmp_path, capsys):
    from torch import nn

    from hetfuse.io import save_model

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.1),
                        nn.Sequential(nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU()), nn.Linear(16, 10))
    path = save_model(seq, tmp_path / "seq.safetensors")
    assert main(["check", str(path)]) == 0
    assert "2 hidden neuron spaces [24, 16]" in capsys.readouterr().out
    assert main(["eval", str(path), "--dataset", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["path"] == str(path)
