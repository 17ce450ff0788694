"""The training layer: datasets (``data``), the model-agnostic ``Trainer``, pretraining from scratch
(``pretrain``). Imports the model and tokenizer layers only (LoRA adapters are applied by the caller)."""

from .data import DatasetError, RecordDataset, TokenBlocks
from .pretrain import ScratchResult, train_from_scratch
from .trainer import TrainConfig, Trainer, TrainEvent, TrainResult

__all__ = ["DatasetError", "RecordDataset", "ScratchResult", "TokenBlocks", "TrainConfig", "TrainEvent",
           "TrainResult", "Trainer", "train_from_scratch"]
