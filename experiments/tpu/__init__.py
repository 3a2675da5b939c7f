"""Launching `jaxgrm` on a multi-host TPU VM: one process per host, joined by jax.distributed."""
