"""Finetuning and distillation (hetfuse.train.fitting): schedules, the held-out split, the distillation loss against
its formula, best-epoch checkpoints, resuming, and DDP under torchrun equal to one process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from hetfuse.errors import HetfuseError
from hetfuse.io import load_checkpoint
from hetfuse.train import FitSettings, distillation_loss, fit, lr_at, split_train_val
from hetfuse.train import fitting as fit_module


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


# ---------------------------------------------------------------------------------------------- schedules, split

@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "constant"])
def test_schedules_stay_within_the_peak_and_end_low(schedule):
    total, base = 1000, 0.1
    lrs = [lr_at(s, total, base, schedule) for s in range(total)]
    assert max(lrs) <= base + 1e-12 and min(lrs) >= 0
    if schedule == "constant":
        assert set(lrs) == {base}
    else:
        assert lrs[-1] < 0.02 * base
    if schedule == "cosine":
        assert lrs[0] == base and all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    if schedule == "step":
        assert lrs[499] == base and math.isclose(lrs[500], base * 0.1) and math.isclose(lrs[750], base * 0.01)
    if schedule == "onecycle":
        assert lrs.index(max(lrs)) == 300 and lrs[0] < base / 10


@given(n=st.integers(10, 500), frac=st.floats(0.01, 0.5), seed=st.integers(0, 10))
@settings(max_examples=30, deadline=None)
def test_held_out_split_partitions_the_training_set(n, frac, seed):
    tr, va = split_train_val(n, frac, seed)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(n))
    assert va.numel() == max(1, round(n * frac))
    tr2, va2 = split_train_val(n, frac, seed)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)


# ---------------------------------------------------------------------------------------------- distillation loss

@given(seed=st.integers(0, 1000), t=st.sampled_from([1.0, 4.0, 8.0, 20.0]), alpha=st.floats(0, 1))
@settings(max_examples=30, deadline=None)
def test_distillation_loss_is_hintons_formula(seed, t, alpha):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    p_t = torch.softmax(te / t, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / t, 1))).sum(1).mean()
    want = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, te, y, t, alpha), want, atol=1e-5)


def test_distillation_with_alpha_zero_is_cross_entropy_and_a_perfect_student_has_no_kl():
    s = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    assert torch.allclose(distillation_loss(s, torch.randn(4, 3), y, 4.0, 0.0), F.cross_entropy(s, y))
    assert float(distillation_loss(s, s.clone(), y, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- fit

def test_fit_keeps_the_best_epoch_and_logs_every_epoch(tmp_path):
    x, y = _data()
    out = tmp_path / "m.safetensors"
    res = fit(_mlp(), x, y, FitSettings(epochs=4, lr=0.05, batch_size=32), out=out, progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert res.best_val == max(h["val_acc"] for h in res.history)
    assert res.history[res.best_epoch - 1]["val_acc"] == res.best_val
    saved, meta = load_checkpoint(out, base=_mlp())
    for a, b in zip(saved.state_dict().values(), res.model.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    assert meta["best_epoch"] == res.best_epoch
    log = (tmp_path / "m.log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,loss,train_acc,val_acc,lr,seconds") and len(log) == 5


def test_fit_never_trains_on_the_held_out_split():
    """Labels of the held-out examples are scrambled: the training losses, which only see the others, stay the
    same."""
    x, y = _data()
    _, va = split_train_val(x.shape[0], 0.1, 0)
    y2 = y.clone()
    y2[va] = (y2[va] + 1) % 3
    s = FitSettings(epochs=2, lr=0.05, batch_size=30)
    a = fit(_mlp(), x, y, s, progress=False)
    b = fit(_mlp(), x, y2, s, progress=False)
    assert [(h["loss"], h["train_acc"]) for h in a.history] == [(h["loss"], h["train_acc"]) for h in b.history]
    assert a.history[-1]["val_acc"] != b.history[-1]["val_acc"]  # the scrambled labels are what it validates on


def test_an_interrupted_fit_resumes_to_the_same_weights(tmp_path, monkeypatch):
    x, y = _data()
    s = FitSettings(epochs=4, lr=0.05, batch_size=32, seed=3)
    whole = fit(_mlp(), x, y, s, out=tmp_path / "whole.safetensors", progress=False)

    real = fit_module._save_state

    def crash_after_two(path, model, opt, epoch, *rest, **kw):
        real(path, model, opt, epoch, *rest, **kw)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "_save_state", crash_after_two)
    out = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), x, y, s, out=out, progress=False)
    monkeypatch.setattr(fit_module, "_save_state", real)
    resumed = fit(_mlp(seed=99), x, y, s, out=out, progress=False)  # other initial weights: the state wins
    assert resumed.resumed_from == 2
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for p, q in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=False):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(HetfuseError, match="other settings"):
        fit(_mlp(), x, y, FitSettings(epochs=5, lr=0.05, batch_size=32, seed=3), out=out, progress=False)
    # how the run executes is not what it computes: a change of memory format resumes (here: nothing left to do)
    again = fit(_mlp(), x, y, FitSettings(epochs=4, lr=0.05, batch_size=32, seed=3, channels_last=True), out=out,
                progress=False)
    assert again.resumed_from == 4


def test_a_state_in_several_files_resumes_to_the_same_weights(tmp_path, monkeypatch):
    x, y = _data()
    s = FitSettings(epochs=4, lr=0.05, batch_size=32, seed=3)
    whole = fit(_mlp(), x, y, s, progress=False)
    limit = 300  # bytes: the 8-16-3 network's weights and momentum (~1.4 kB) in several files
    real = fit_module._save_state
    seen = []

    def crash_after_two(path, model, opt, epoch, *rest, **kw):
        real(path, model, opt, epoch, *rest, **kw)
        seen.append(sorted(f.name for f in path.parent.glob("cut.state*")))
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "_save_state", crash_after_two)
    out = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), x, y, s, out=out, progress=False, state_shard_bytes=limit)
    monkeypatch.setattr(fit_module, "_save_state", real)
    # each epoch's parts replace the previous epoch's; no file is over the limit unless one tensor is
    assert any("e1.part" in n for n in seen[0]) and not any("e1.part" in n for n in seen[1])
    biggest = max(v.numel() * v.element_size() for v in _mlp().state_dict().values())
    for f in tmp_path.glob("cut.state*"):
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as g:
            sizes = [g.get_tensor(k).numel() * g.get_tensor(k).element_size() for k in g.keys()]  # noqa: SIM118
        assert sum(sizes) <= max(limit, biggest)
    resumed = fit(_mlp(seed=99), x, y, s, out=out, progress=False, state_shard_bytes=limit)
    assert resumed.resumed_from == 2
    for p, q in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    # a missing part is named, not silently replaced by fresh weights
    part = sorted(tmp_path.glob("cut.state.e4.part*"))[0]
    part.unlink()
    with pytest.raises(HetfuseError, match="missing"):
        fit(_mlp(), x, y, s, out=out, progress=False)
    fit_module.remove_state(fit_module.state_path(out))
    assert not list(tmp_path.glob("cut.state*"))


def test_distillation_pulls_the_student_towards_the_teacher():
    x, y = _data(400)
    teacher = fit(_mlp(1), x, y, FitSettings(epochs=6, lr=0.1, batch_size=32), progress=False).model
    student = _mlp(2)
    with torch.no_grad():
        before = F.kl_div(F.log_softmax(student(x), 1), F.softmax(teacher(x), 1), reduction="batchmean")
    res = fit(student, x, y, FitSettings(epochs=4, lr=0.05, batch_size=32, temperature=4.0, alpha=1.0),
              teacher=teacher, progress=False)
    with torch.no_grad():
        after = F.kl_div(F.log_softmax(res.model(x), 1), F.softmax(teacher(x), 1), reduction="batchmean")
    assert after < 0.5 * before


def test_fit_refuses_bad_settings():
    x, y = _data()
    with pytest.raises(HetfuseError, match="schedule"):
        fit(_mlp(), x, y, FitSettings(schedule="linear"), progress=False)
    with pytest.raises(HetfuseError, match="both a temperature and alpha"):
        fit(_mlp(), x, y, FitSettings(temperature=4.0), progress=False)
    with pytest.raises(HetfuseError, match="fewer than one batch"):
        fit(_mlp(), x, y, FitSettings(batch_size=1000), progress=False)


# ---------------------------------------------------------------------------------------------- DDP

_LAUNCHER = textwrap.dedent("""
    import os, sys
    written, watching = [], [True]
    watched = os.path.realpath(os.environ["WATCH_DIR"])  # every write of this process under the test's folder
    if os.environ.get("RANK", "0") != "0":
        def audit(event, args):
            if not watching[0] or event not in ("open", "os.rename", "os.remove", "os.mkdir", "tempfile.mkstemp"):
                return
            if event == "open" and (args[1] is None or not any(c in str(args[1]) for c in "wax+")):
                return
            target = args[0] if not isinstance(args[0], int) else ""
            if event == "tempfile.mkstemp" or os.path.realpath(os.fsdecode(target)).startswith(watched):
                written.append(f"{event} {target}")
        sys.addaudithook(audit)
    from hetfuse.cli import main
    rc = main(sys.argv[1:])
    if os.environ.get("RANK", "0") != "0":
        watching[0] = False
        with open(os.environ["AUDIT_OUT"], "w") as fh:
            fh.write("\\n".join(written))
    sys.exit(rc)
""")


def _finetune_args(out: Path) -> list[str]:
    return ["finetune", str(out.parent / "base.safetensors"), "--dataset", "digits", "--epochs", "2",
            "--batch-size", "64", "--lr", "0.05", "--out", str(out), "--quiet"]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")
def test_two_process_ddp_finetune_equals_one_process_and_only_rank_0_writes(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the same global batch gives the same weights as one process (to 1e-5;
    only the order of floating-point sums differs), and rank 1 writes no file."""
    from hetfuse.cli import main

    base = tmp_path / "base.safetensors"
    assert main(["train", "--arch", "mlp:32,16", "--dataset", "digits", "--epochs", "1", "--bias", "--out",
                 str(base), "--quiet"]) == 0
    one = tmp_path / "one" / "m.safetensors"
    one.parent.mkdir()
    (one.parent / "base.safetensors").write_bytes(base.read_bytes())
    assert main(_finetune_args(one)) == 0

    two = tmp_path / "two" / "m.safetensors"
    two.parent.mkdir()
    (two.parent / "base.safetensors").write_bytes(base.read_bytes())
    launcher = tmp_path / "launch.py"
    launcher.write_text(_LAUNCHER)
    audit = tmp_path.parent / f"{tmp_path.name}-rank1-writes.txt"
    env = dict(os.environ, AUDIT_OUT=str(audit), WATCH_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node=2",
           str(launcher), *_finetune_args(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert audit.read_text() == "", f"rank 1 wrote: {audit.read_text()}"
    assert sorted(p.name for p in two.parent.iterdir()) == ["base.safetensors", "m.log.csv", "m.safetensors",
                                                            "m.state.safetensors"]
    a, meta_a = load_checkpoint(one)
    b, meta_b = load_checkpoint(two)
    assert meta_b["processes"] == 2 and meta_a["processes"] == 1
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-5), k
    assert len(meta_a["history"]) == len(meta_b["history"]) == 2
    for r1, r2 in zip(meta_a["history"], meta_b["history"], strict=False):
        assert r1["val_acc"] == r2["val_acc"] and r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)


def test_the_log_has_every_column_of_a_history_resumed_from_an_older_state(tmp_path):
    path = tmp_path / "run.log.csv"
    fit_module.write_log(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4, "batches": 7}])
    lines = path.read_text().splitlines()
    assert lines == ["epoch,loss,batches", "1,0.5,", "2,0.4,7"]


def test_with_nothing_held_out_a_resumed_run_keeps_its_last_epoch_not_a_stale_best(tmp_path):
    """A state written with a 'best' copy (as hetfuse 0.2's first parents run wrote it) must not replace the last
    epoch's weights when nothing is held out."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.arange(64) % 3
    out = tmp_path / "m.safetensors"
    settings = FitSettings(epochs=3, lr=0.05, batch_size=16, val_fraction=0.0)
    from hetfuse.models import MLP

    model = MLP(6, [5], 3)
    fit(model, x, y, settings, out=out, progress=False)
    last = {k: v.clone() for k, v in model.state_dict().items()}
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = fit_module.state_path(out)
    with safe_open(str(state), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(state))
    tensors.update({f"best.{k}": torch.zeros_like(v) for k, v in last.items()})  # a stale "best" copy
    save_file(tensors, str(state), metadata=meta)
    again = MLP(6, [5], 3)
    res = fit(again, x, y, settings, out=out, progress=False)  # resumes after epoch 3: nothing left to train
    assert res.resumed_from == 3
    for k, v in again.state_dict().items():
        assert torch.equal(v, last[k]), k
