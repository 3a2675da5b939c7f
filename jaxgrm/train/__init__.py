"""The sharded trainer shared by SFT, RL and distillation."""

from jaxgrm.train.mesh import MeshConfig, batch_sharding, make_train_mesh, shard_batch
from jaxgrm.train.objectives import CrossEntropy, PolicyGradient, token_logprobs
from jaxgrm.train.state import OptimConfig, TrainState, make_optimizer
from jaxgrm.train.step import jit_train_step, train_step

__all__ = [
    "CrossEntropy",
    "MeshConfig",
    "OptimConfig",
    "PolicyGradient",
    "TrainState",
    "batch_sharding",
    "jit_train_step",
    "make_optimizer",
    "make_train_mesh",
    "shard_batch",
    "token_logprobs",
    "train_step",
]
