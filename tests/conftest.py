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


@pytest.fixture
def data_root():
    """Root with the real data sets: $HETFUSE_DATA, else ../shared/data beside the checkout; skip if absent."""
    env = os.environ.get("HETFUSE_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (root / "mnist").is_dir():
        pytest.skip("real MNIST not available (set HETFUSE_DATA)")
    return root
