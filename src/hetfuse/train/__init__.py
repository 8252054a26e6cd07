"""Training and evaluation."""

from .trainer import accuracy, ensemble_accuracy, predict_logits, train_model

__all__ = ["accuracy", "ensemble_accuracy", "predict_logits", "train_model"]
