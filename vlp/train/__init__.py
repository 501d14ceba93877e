"""The training loop shared by pretraining and every finetuning task."""

from vlp.train.loop import TrainResult, TrainSettings, train

__all__ = ["TrainResult", "TrainSettings", "train"]
