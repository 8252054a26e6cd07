import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run much faster single-threaded; modules that use them opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def real_root(dataset: str) -> Path | None:
    """The one rule of the tests for real data: they read it from ``$HETFUSE_DATA`` and are skipped when that is
    unset or has no ``<dataset>/`` folder (CI sets it; see the README)."""
    env = os.environ.get("HETFUSE_DATA")
    if not env or not (Path(env) / dataset).is_dir():
        return None
    return Path(env)


@pytest.fixture
def data_root():
    """The data root holding real MNIST, or skip (see :func:`real_root`)."""
    root = real_root("mnist")
    if root is None:
        pytest.skip("real MNIST not available (set HETFUSE_DATA to a folder holding mnist/)")
    return root


@pytest.fixture
def cifar_root():
    """The data root holding real CIFAR-10, or skip (see :func:`real_root`)."""
    root = real_root("cifar10")
    if root is None:
        pytest.skip("real CIFAR-10 not available (set HETFUSE_DATA to a folder holding cifar10/)")
    return root


def train_digits_pair(folder: Path) -> tuple[Path, Path]:
    """Two MLPs of depths 2 and 3 (with biases) trained for 2 epochs on the bundled digits, written to
    ``folder/a.safetensors`` and ``folder/b.safetensors`` through the CLI."""
    from hetfuse.cli import main

    a, b = folder / "a.safetensors", folder / "b.safetensors"
    common = ["--dataset", "digits", "--quiet", "--epochs", "2", "--lr", "0.05", "--bias"]
    assert main(["train", "--arch", "mlp:32,16", "--out", str(a)] + common) == 0
    assert main(["train", "--arch", "mlp:32,24,16", "--seed", "1", "--out", str(b)] + common) == 0
    return a, b
