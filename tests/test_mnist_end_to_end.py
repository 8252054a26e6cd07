"""End to end on real MNIST (skipped without the data): train a specialist and a generalist briefly, fuse.

One epoch at a higher learning rate than the paper, to keep CI short."""

import torch

from hetfuse import FusionConfig, prepare_fusion
from hetfuse.data import load_dataset, skill_split
from hetfuse.models import MLP
from hetfuse.train import accuracy, train_model


def test_skill_transfer_pipeline_on_real_mnist(data_root):
    ds = load_dataset("mnist", data_root)
    models = []
    for hidden, part in (([400, 200, 100], "a"), ([400, 200, 100, 50], "b")):
        torch.manual_seed(0)
        m = MLP(784, hidden, 10, bias=False)
        idx = skill_split(ds.y_train, part, seed=0)
        train_model(m, ds.x_train[idx], ds.y_train[idx], epochs=1, lr=0.05, momentum=0.9, batch_size=64, seed=0,
                    progress=False)
        models.append(m)
    a, b = models
    acc_a, acc_b = accuracy(a, ds.x_test, ds.y_test), accuracy(b, ds.x_test, ds.y_test)
    prep = prepare_fusion([a, b], ds.x_train, FusionConfig(samples=400))
    (mp,) = [m for m in prep.report["mappings"] if m["changed"]]
    assert mp["alignment"] == [0, 1, 3]  # the paper's [1, 2, 4] with the neuron representation
    # wB = 0 without repair is model A itself (identity layers are exact); wB = 1 is B in A's widths
    assert accuracy(prep.combine([1.0, 0.0], repair=False), ds.x_test, ds.y_test) == acc_a
    fused_b = accuracy(prep.combine([0.0, 1.0], repair=False), ds.x_test, ds.y_test)
    assert abs(fused_b - acc_b) < 5.0
    # a small weight on B keeps a working classifier close to A (the paper's regime), not a collapsed one
    assert accuracy(prep.combine([0.9, 0.1]), ds.x_test, ds.y_test) > 0.9 * acc_a
