"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG key), the
data-iterator state and a JSON record of anything else needed to resume exactly (sampler seed,
metrics position, config). Saves are asynchronous; the newest `keep` are kept.

Restoring targets the shardings of a freshly built state, so a run resumes on any mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgrm.train.state import TrainState


def _to_saveable(state: TrainState) -> dict[str, Any]:
    # Typed PRNG keys are stored as their raw uint32 data.
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    fields["key"] = jax.random.key_data(state.key)
    return fields


def _from_saveable(tree: dict[str, Any], like: TrainState) -> TrainState:
    impl = jax.random.key_impl(like.key)
    return TrainState(**{**tree, "key": jax.random.wrap_key_data(tree["key"], impl=impl)})


def _abstract(tree):
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class Checkpointer:
    """save(step, state, data=..., extra=...) / restore(like) -> (state, data, extra) or None."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self,
        step: int,
        state: TrainState,
        data: dict | None = None,
        extra: dict | None = None,
        force: bool = False,
    ) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            data=ocp.args.JsonSave(data or {}),
            extra=ocp.args.JsonSave(extra or {}),
        )
        return self.manager.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None):
        """The checkpoint at `step` (default: latest) shaped and sharded like `like`, or None."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(_to_saveable(like))),
            data=ocp.args.JsonRestore(),
            extra=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return _from_saveable(dict(out["state"]), like), dict(out["data"]), dict(out["extra"])

    def wait(self):
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self):
        """Finish pending saves and release the manager (safe to call twice)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None


def tree_equal(a, b) -> bool:
    """Exact equality of two pytrees of arrays (keys compared by their data)."""

    def data(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(data(x), data(y)) for x, y in zip(la, lb, strict=True)
    )
