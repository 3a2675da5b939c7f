import os
import subprocess
import sys
import textwrap

import pytest

# Tests run on the CPU with float32 matmuls at full precision so parities can be tight.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def run_in_subprocess():
    """Run a Python snippet in a fresh process (e.g. with a virtual device count); return stdout.

    Multi-device tests need XLA_FLAGS set before jax is imported, hence their own process.
    """

    def run(code: str, devices: int = 1, timeout: int = 300) -> str:
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"subprocess failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    return run
