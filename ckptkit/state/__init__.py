"""Small stateful objects a training loop checkpoints next to its model and optimizer."""

from ckptkit.state.dataloader import LoaderPosition, ResumableDataLoader
from ckptkit.state.early_stopping import EarlyStopping
from ckptkit.state.rng import RNGState
from ckptkit.state.sharded import ShardedState
from ckptkit.state.trainable import TrainableOnly

__all__ = [
    "EarlyStopping",
    "LoaderPosition",
    "RNGState",
    "ResumableDataLoader",
    "ShardedState",
    "TrainableOnly",
]
