"""The training mesh: named axes (data, fsdp, tensor) and the shardings of batches on it."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgrm.model.sharding import make_mesh

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 on one axis takes the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        free = [i for i, s in enumerate(sizes) if s == -1]
        if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"at most one mesh axis may be -1 and none 0: {self}")
        fixed = 1
        for s in sizes:
            fixed *= s if s != -1 else 1
        if free:
            if num_devices % fixed:
                raise ValueError(f"{num_devices} devices do not divide into {self}")
            sizes[free[0]] = num_devices // fixed
        if sizes[0] * sizes[1] * sizes[2] != num_devices:
            raise ValueError(f"mesh {tuple(sizes)} does not use the {num_devices} devices")
        return tuple(sizes)


def make_train_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return make_mesh(cfg.shape(len(devices)), AXES, devices=devices)


def auto_mesh(cfg: MeshConfig = MeshConfig()) -> Mesh | None:
    """The training mesh over every device of every process, or None with a single device
    (then everything runs unsharded on the default device)."""
    if jax.device_count() == 1:
        return None
    return make_train_mesh(cfg)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch, mesh: Mesh):
    """Place this process's rows of a batch on the mesh, split over the data axes.

    Each process passes its local rows (the global batch is their concatenation in process
    order); with one process that is the whole batch. Works the same on one host or many.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
