"""The training loop shared by pretraining and every finetuning task."""

from vlp.train.loop import train
from vlp.train.settings import TrainResult, TrainSettings

__all__ = ["TrainResult", "TrainSettings", "train"]
