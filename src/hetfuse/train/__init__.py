"""Training, output heads and evaluation."""

from .heads import (OutputHead, class_embeddings, ensemble_task_metrics, model_task_metrics, parse_classes, parse_tasks,
                    task_metrics)
from .trainer import ZIPIT_RECIPE, accuracy, class_scores, ensemble_accuracy, predict_logits, train_model

__all__ = ["OutputHead", "ZIPIT_RECIPE", "accuracy", "class_embeddings", "class_scores", "ensemble_accuracy",
           "ensemble_task_metrics", "model_task_metrics", "parse_classes", "parse_tasks", "predict_logits", "task_metrics",
           "train_model"]
