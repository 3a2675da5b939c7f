"""Train state (params, optimizer state, step, key) and the optimizer: AdamW with warm-up +
cosine decay and global-norm clipping. Weight decay skips 1-D weights (norm scales, biases)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"invalid OptimConfig {self}")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < total_steps ({self.total_steps})"
            )

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.learning_rate,
            warmup_steps=self.warmup_steps,
            decay_steps=self.total_steps,
            end_value=self.learning_rate * self.end_lr_ratio,
        )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim > 1, params)

    chain = [
        optax.adamw(
            cfg.schedule(),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    ]
    if cfg.grad_clip_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(cfg.grad_clip_norm))
    return optax.chain(*chain)


@struct.dataclass
class TrainState:
    """step: [] int32 updates applied or skipped. params: nnx.State of the model. opt_state: the
    optimizer's. key: PRNG key for anything stochastic in training. skipped: [] int32 updates
    skipped for a non-finite loss or gradient."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    key: jax.Array
    skipped: jax.Array

    @classmethod
    def create(cls, params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
        """The optimizer state is born in the params' shardings (moments mirror their params);
        scalars are replicated on the same mesh (or device). The params are copied: the train
        step donates its state, and the caller's arrays (a model, a reference) must survive."""
        params = jax.tree.map(lambda x: x.copy(), params)
        sharding = jax.tree.leaves(params)[0].sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec())
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        opt_shardings = optax.tree_map_params(
            tx,
            lambda _, s: s,
            jax.eval_shape(tx.init, params),
            param_shardings,
            transform_non_params=lambda _: sharding,
        )
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        # Made by a jitted function so they land on every process's devices; distinct buffers,
        # since the step donates its state and a buffer may be donated only once.
        step, key, skipped = jax.jit(
            lambda: (jnp.zeros((), jnp.int32), jax.random.key(seed), jnp.zeros((), jnp.int32)),
            out_shardings=(sharding, sharding, sharding),
        )()
        return cls(step=step, params=params, opt_state=opt_state, key=key, skipped=skipped)
