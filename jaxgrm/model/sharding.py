"""Born-sharded parameters: glossary letters on each weight -> mesh axes -> NamedSharding.

Each `nnx.Param` carries `axes`, e.g. ("D", "N", "H") for the query projection. A rules mapping
sends letters to mesh axis names. A dimension stays replicated when its rule names no axis, an
axis missing from the mesh, an axis already used by an earlier dimension of the same weight, or an
axis whose size does not divide the dimension (so any preset fits any mesh, e.g. K=2 kv heads on
a tensor axis of 4 replicates instead of failing).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgrm.model.config import ModelConfig

# Letters -> mesh axes. D (model width) is split over fsdp; heads, MLP hidden and vocab over tensor.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "V": "tensor",
    "D": "fsdp",
    "N": "tensor",
    "K": "tensor",
    "F": "tensor",
    "H": None,
}

Rules = Mapping[str, str | tuple[str, ...] | None]


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], devices=None) -> Mesh:
    """A device mesh with `Auto` axis types: XLA's partitioner places intermediates, and the
    model's code needs no per-op output shardings (explicit-sharding meshes would)."""
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules):
    """PartitionSpec for one weight with letter `axes` and `shape` on `mesh`."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for letter, dim in zip(axes, shape, strict=True):
        rule = rules.get(letter)
        names = (rule,) if isinstance(rule, str) else tuple(rule or ())
        names = tuple(a for a in names if a in mesh.shape and a not in used)
        size = 1
        for a in names:
            size *= mesh.shape[a]
        if not names or size == 1 or dim % size:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A State of NamedShardings matching `state` (concrete or abstract)."""

    def one(var: nnx.Variable):
        value = var.get_value()
        axes = var.get_metadata().get("axes")
        if axes is None:
            spec = PartitionSpec()
        else:
            spec = partition_spec(tuple(axes), tuple(value.shape), mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def create_model(
    cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
):
    """Build a `Decoder` whose parameters are created directly in their sharding on `mesh`.

    `jax.eval_shape` gives the abstract state; one jitted init with `out_shardings` materialises
    each weight on its devices, so no device ever holds the full unsharded model. Without a mesh
    the model is created on the default device.
    """
    from jaxgrm.model.decoder import Decoder

    def make():
        return Decoder(cfg, rngs=nnx.Rngs(seed))

    if mesh is None:
        return make()
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, seed: int = 0):
    """The model with ShapeDtypeStruct leaves: shapes and dtypes, nothing allocated."""
    from jaxgrm.model.decoder import Decoder

    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)))
