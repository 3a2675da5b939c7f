"""Runs a few SFT steps of a tiny model and prints the losses and a parameter checksum.

Used by tests/test_train_step.py in fresh processes: with N virtual CPU devices and a mesh, or
as one of several processes joined by jax.distributed over loopback (gloo collectives).

    python tests/train_worker.py MESH_DATA MESH_FSDP MESH_TENSOR [COORD NUM_PROC PROC_ID]
"""

import sys

import jax

if len(sys.argv) > 4:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=sys.argv[4], num_processes=int(sys.argv[5]), process_id=int(sys.argv[6])
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxgrm.model import ModelConfig, create_model  # noqa: E402
from jaxgrm.train import (  # noqa: E402
    CrossEntropy,
    MeshConfig,
    OptimConfig,
    TrainState,
    jit_train_step,
    make_optimizer,
    make_train_mesh,
    shard_batch,
)


def main():
    data, fsdp, tensor = (int(a) for a in sys.argv[1:4])
    mesh = make_train_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    cfg = ModelConfig.tiny(vocab_size=128, qkv_bias=True)
    model = create_model(cfg, seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    tx = make_optimizer(OptimConfig(learning_rate=3e-3, warmup_steps=1, total_steps=10))
    state = TrainState.create(params, tx, seed=0)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jit_train_step(graphdef, CrossEntropy(), tx, accum_steps=2, state_shardings=shardings)
    rng = np.random.default_rng(0)
    procs, me = jax.process_count(), jax.process_index()
    for i in range(3):
        tokens = rng.integers(1, cfg.vocab_size, (16, 24)).astype(np.int32)
        seg = np.ones_like(tokens)
        seg[:, 20:] = 0  # padding
        seg[::2, 10:20] = 2  # packed second example in every other row
        batch = dict(tokens_BT=tokens, segment_ids_BT=seg, loss_mask_BT=seg > 0)
        rows = slice(me * 16 // procs, (me + 1) * 16 // procs)
        local = {k: v[rows] for k, v in batch.items()}
        state, metrics = step(state, shard_batch(local, mesh))
        print(f"loss {i} {float(metrics['loss']):.8f}", flush=True)
    checksum = jax.jit(
        lambda p: sum(jnp.sum(x.astype(jnp.float64) ** 2) for x in jax.tree.leaves(p))
    )
    print(f"params {float(checksum(state.params)):.8f}", flush=True)
    leaf = jax.tree.leaves(state.params)[0]
    print(f"sharding {leaf.sharding.spec}", flush=True)


if __name__ == "__main__":
    main()
