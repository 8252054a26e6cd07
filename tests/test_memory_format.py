"""The channels_last guard: torch's channels_last convolution backward crashes some CPUs (README, troubleshooting).
The training tests that ask for channels_last run single-threaded (the crashing case) through the one_thread
fixture, so that a regression of the guard shows on any affected processor."""

from __future__ import annotations

import warnings

import pytest
import torch
from hetfuse.models import MLP, build_model
from hetfuse.train import memory_format as mf
from hetfuse.train import train_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv():
    return build_model("resnet20:w=0.25", input_dim=3, output_dim=2, input_shape=(3, 32, 32))


def test_the_environment_variable_overrides_the_probe(monkeypatch):
    monkeypatch.setenv(mf.ENV_VAR, "0")
    assert mf.use_channels_last(True, _conv()) is False
    monkeypatch.setenv(mf.ENV_VAR, "1")
    assert mf.use_channels_last(True, _conv()) is True
    assert mf.use_channels_last(False, _conv()) is False


def test_models_without_convolutions_never_use_it(monkeypatch):
    monkeypatch.setenv(mf.ENV_VAR, "1")
    assert mf.use_channels_last(True, MLP(4, [3], 2)) is False


def test_an_unsafe_processor_trains_contiguous_with_one_warning(monkeypatch):
    monkeypatch.delenv(mf.ENV_VAR, raising=False)
    monkeypatch.setattr(mf, "_verdict", False)
    monkeypatch.setattr(mf, "_warned", False)
    with pytest.warns(RuntimeWarning, match="channels_last is not used"):
        assert mf.use_channels_last(True, _conv()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mf.use_channels_last(True, _conv()) is False  # once per process


def test_the_verdict_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path))
    monkeypatch.delenv(mf.ENV_VAR, raising=False)
    monkeypatch.setattr(mf, "_verdict", None)
    calls = []
    monkeypatch.setattr(mf, "probe", lambda: calls.append(1) or True)
    assert mf.channels_last_safe() is True
    monkeypatch.setattr(mf, "_verdict", None)
    assert mf.channels_last_safe() is True and calls == [1]
    assert list(tmp_path.glob("channels_last-*.json"))


def test_the_probe_gives_a_verdict_without_crashing_this_process():
    assert mf.probe() in (True, False)


def test_training_a_net_with_a_small_strided_projection_survives_single_threaded():
    """resnet20 x0.25 has 1x1 stride-2 shortcut convs with 4 and 8 input channels: the crashing shapes. Asking for
    channels_last on one thread must not kill the process whatever the processor."""
    assert torch.get_num_threads() == 1
    torch.manual_seed(0)
    model = _conv()
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 2
    hist = train_model(model, x, y, epochs=1, batch_size=8, channels_last=True, progress=False)
    assert len(hist) == 1 and torch.isfinite(torch.tensor(hist[0]["loss"]))
    assert all(p.is_contiguous() for p in model.parameters() if p.dim() == 4) or mf.channels_last_safe()
