import pytest
import torch

from hetfuse.data import load_dataset
from hetfuse.errors import HetfuseError
from hetfuse.models import MLP
from hetfuse.train import accuracy, ensemble_accuracy, predict_logits, train_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_train_beats_chance(digits):
    torch.manual_seed(0)
    model = MLP(64, [32], 10)
    hist = train_model(model, digits.x_train, digits.y_train, epochs=2, lr=0.05, seed=0, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert set(hist[0]) == {"epoch", "loss", "train_acc"}
    assert hist[-1]["train_acc"] > 50.0
    assert not model.training
    assert accuracy(model, digits.x_test, digits.y_test) > 50.0


def test_train_deterministic(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        m = MLP(64, [16], 10)
        train_model(m, x, y, epochs=1, seed=5, progress=False)
        outs.append(predict_logits(m, digits.x_test))
    assert torch.equal(outs[0], outs[1])


def test_ensemble_weights_validated(digits):
    m = MLP(64, [8], 10)
    x, y = digits.x_test, digits.y_test
    with pytest.raises(HetfuseError, match="sum to 1"):
        ensemble_accuracy([m, m], [0.5, 0.6], x, y)
    with pytest.raises(HetfuseError, match="non-negative"):
        ensemble_accuracy([m, m], [1.5, -0.5], x, y)
    with pytest.raises(HetfuseError, match="2 models but 1 weights"):
        ensemble_accuracy([m, m], [1.0], x, y)


def test_ensemble_with_itself(digits):
    torch.manual_seed(0)
    m = MLP(64, [16], 10)
    train_model(m, digits.x_train, digits.y_train, epochs=1, progress=False)
    acc = accuracy(m, digits.x_test, digits.y_test)
    assert ensemble_accuracy([m, m], [0.5, 0.5], digits.x_test, digits.y_test) == pytest.approx(acc)
    assert ensemble_accuracy([m], [1.0], digits.x_test, digits.y_test) == pytest.approx(acc)
