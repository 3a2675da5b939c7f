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
# barrier) is far above glibc's mmap threshold; the child reports, for each of its last 10 of 60
# calls, whether the call faulted in new pages (over 1,000, of the block's 16,384). glibc's
# defaults fault the block in on every call. With the settings the heap settles: it still grows
# now and then when a freed block is split by smaller allocations or not yet freed as the next
# call starts (seen in 1 of 12 children as late as these calls, on 2 of the 10), so the test
# bounds how many calls fault rather than asking for none.
_CHILD = """
import json, resource
import jaxgrm, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cos(jax.lax.optimization_barrier(jnp.sin(x) * 2.0)).sum())
x = jnp.ones((1 << 24,), jnp.float32)
for _ in range(50):
    f(x).block_until_ready()
faulted = 0
for _ in range(10):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faulted += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0 > 1_000
print(json.dumps(dict(faulted_calls=faulted, host_malloc=jaxgrm.HOST_MALLOC)))
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
    assert default["faulted_calls"] >= 9, default
    assert tuned["faulted_calls"] <= 3, tuned
