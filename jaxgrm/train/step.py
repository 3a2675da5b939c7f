"""One jitted, donated train step shared by SFT, RL and distillation.

The batch is split into `accum_steps` micro-batches along B and scanned; each micro-batch adds
its loss sum, denominator, metric pairs and the gradient of its loss *sum*. The step then
divides once: gradient = sum of gradients / total denominator, which equals the gradient of the
full-batch loss exactly (the denominator does not depend on the parameters). A non-finite loss or
gradient norm skips the update (params and optimizer state unchanged) and counts it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgrm.masked import safe_divide
from jaxgrm.train.state import TrainState


def _split_micro(batch: Mapping[str, jax.Array], n: int):
    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        # Interleaved: micro-batch i holds rows i, i + n, ...; a batch split over devices in
        # contiguous blocks stays split inside every micro-batch (a [n, B/n] reshape would put
        # the device split on the scanned axis and gather the whole batch on every device).
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return {k: one(v) for k, v in batch.items()}


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    objective: Callable,
    tx: optax.GradientTransformation,
    accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Returns the new state and scalar metrics: loss, grad_norm, skipped, plus the objective's
    metrics, each reduced as sum / denominator over the whole batch."""

    def sum_loss(params, micro):
        (total, den), metrics = objective(nnx.merge(graphdef, params), micro)
        return total, (den, metrics)

    grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

    def accumulate(carry, micro):
        (total, (den, metrics)), grads = grad_fn(state.params, micro)
        acc_total, acc_den, acc_metrics, acc_grads = carry
        return (
            acc_total + total,
            acc_den + den,
            jax.tree.map(jnp.add, acc_metrics, metrics),
            jax.tree.map(jnp.add, acc_grads, grads),
        ), None

    micro = _split_micro(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, state.params, first)
    (_, (_, metric_shapes)), grad_shapes = shapes
    zeros = functools.partial(jax.tree.map, lambda s: jnp.zeros(s.shape, s.dtype))
    init = (jnp.zeros(()), jnp.zeros(()), zeros(metric_shapes), zeros(grad_shapes))
    (total, den, metrics, grads), _ = jax.lax.scan(accumulate, init, micro)

    grads = jax.tree.map(lambda g: g / jnp.maximum(den, 1e-9), grads)
    loss = safe_divide(total, den)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zero the gradient before the optimizer sees it when it is not finite, so NaNs never reach
    # the moments; then keep the old params and optimizer state.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = tx.update(safe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    out = {k: safe_divide(s, d) for k, (s, d) in metrics.items()}
    out.update(loss=loss, grad_norm=grad_norm, skipped=new_state.skipped, finite=finite)
    return new_state, out


def jit_train_step(
    graphdef: nnx.GraphDef,
    objective: Callable,
    tx: optax.GradientTransformation,
    accum_steps: int = 1,
    state_shardings=None,
    batch_shardings=None,
):
    """`train_step` jitted once for these static pieces, donating the state. With shardings
    given, the state keeps its layout across steps and batches are laid out on the data axes.

    The returned function's `num_compiles` counts its traces (one per new batch shape or
    dtype), as `Sampler.num_compiles` does for the sampler."""
    fn = functools.partial(
        train_step, graphdef=graphdef, objective=objective, tx=tx, accum_steps=accum_steps
    )

    mesh = None
    if state_shardings is not None:
        leaves = jax.tree.leaves(state_shardings)
        mesh = next((s.mesh for s in leaves if isinstance(s, jax.sharding.NamedSharding)), None)

    def counted(state, batch):
        jitted.num_compiles += 1  # runs only while tracing, i.e. once per compile
        if mesh is None:
            return fn(state, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for constrain_batch
            return fn(state, batch)

    counted.__name__ = counted.__qualname__ = "train_step"  # the name in jax's compile logs

    kwargs = {}
    if state_shardings is not None:
        kwargs["in_shardings"] = (state_shardings, batch_shardings)
        kwargs["out_shardings"] = (state_shardings, None)
    jitted = jax.jit(counted, donate_argnums=0, **kwargs)
    jitted.num_compiles = 0
    return jitted
