"""jaxgrm.hostmem: when the malloc settings apply, and that they stop per-step page faults."""

import json
import platform
import subprocess
import sys

import pytest

from jaxgrm import hostmem


def test_env_forces_either_way():
    assert hostmem.should_tune({"JAXGRM_HOST_MALLOC": "on", "JAX_PLATFORMS": "cuda"})[0]
    assert not hostmem.should_tune({"JAXGRM_HOST_MALLOC": "off"})[0]
    with pytest.raises(ValueError, match="JAXGRM_HOST_MALLOC='yes': expected auto, on or off"):
        hostmem.should_tune({"JAXGRM_HOST_MALLOC": "yes"})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_auto_follows_jax_platforms():
    assert hostmem.should_tune({"JAX_PLATFORMS": "cpu"}) == (True, "JAX_PLATFORMS=cpu")
    assert not hostmem.should_tune({"JAX_PLATFORMS": "cuda,cpu"})[0]
    assert not hostmem.should_tune({"JAX_PLATFORMS": "tpu"})[0]


def test_applied_on_import_in_this_cpu_test_run():
    import jaxgrm

    expected, _ = hostmem.should_tune()
    assert jaxgrm.HOST_MALLOC["applied"] == expected
    assert hostmem.tune_host_malloc() is jaxgrm.HOST_MALLOC  # once per process


# A jitted function whose temporary buffer (a 64 MiB array kept apart by an optimisation
# barrier) is far above glibc's mmap threshold; the child prints the page faults of its last 10
# of 60 calls. With the settings the heap can take a few calls to settle (a freed block split by
# smaller allocations, or not yet freed when the next call starts, makes the heap grow; seen
# settling by call 25 at most, at up to six blocks), so only the end is compared.
_CHILD = """
import json, resource
import jaxgrm, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cos(jax.lax.optimization_barrier(jnp.sin(x) * 2.0)).sum())
x = jnp.ones((1 << 24,), jnp.float32)
for _ in range(50):
    f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
print(json.dumps(dict(faults=faults, host_malloc=jaxgrm.HOST_MALLOC)))
"""


def _faults(mode: str) -> dict:
    env = {"JAXGRM_HOST_MALLOC": mode, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tuned_malloc_reuses_xla_temporaries():
    tuned, default = _faults("on"), _faults("off")
    assert tuned["host_malloc"]["applied"] and not default["host_malloc"]["applied"]
    # 64 MiB is 16,384 pages: glibc's defaults fault it in again on every call, the settled
    # heap reuses it.
    assert default["faults"] > 10 * 16_384 * 0.9, default
    assert tuned["faults"] < 2_000, tuned
