"""Training, finetuning and distillation, output heads and evaluation."""

from .fitting import FitResult, FitSettings, distillation_loss, fit, lr_at, split_train_val
from .heads import (OutputHead, class_embeddings, ensemble_task_metrics, model_task_metrics, parse_classes, parse_tasks,
                    task_metrics)
from .trainer import (ZIPIT_RECIPE, accuracy, class_probabilities, class_scores, ensemble_accuracy, predict_logits,
                      train_model)

__all__ = ["FitResult", "FitSettings", "OutputHead", "ZIPIT_RECIPE", "accuracy", "class_embeddings",
           "class_probabilities", "class_scores", "distillation_loss", "ensemble_accuracy", "ensemble_task_metrics",
           "fit", "lr_at", "model_task_metrics", "parse_classes", "parse_tasks", "predict_logits", "split_train_val",
           "task_metrics", "train_model"]
