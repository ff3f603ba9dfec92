"""Training: offline byte-level data, synthetic long-context tasks, a training loop and pickle-free checkpoints."""

from titans_compose.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from titans_compose.train.data import Batch, Corpus, DataError, WindowSampler, load_corpus
from titans_compose.train.loop import StepRecord, TrainingError, TrainResult, lm_loss, lr_at, train
from titans_compose.train.tasks import TaskBatch, exact_match, mqar_batch, passkey_batch

__all__ = [
    "Batch",
    "CheckpointError",
    "Corpus",
    "DataError",
    "StepRecord",
    "TaskBatch",
    "TrainResult",
    "TrainingError",
    "WindowSampler",
    "exact_match",
    "lm_loss",
    "load_checkpoint",
    "load_corpus",
    "lr_at",
    "mqar_batch",
    "passkey_batch",
    "read_checkpoint",
    "save_checkpoint",
    "train",
]
