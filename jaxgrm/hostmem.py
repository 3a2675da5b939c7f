"""Keep XLA's CPU temporaries in process memory from one step to the next (glibc malloc).

XLA's CPU backend takes each execution's temporary buffer (0.6 GiB for the 32 x 128 GRPO step of
the benchmark model, 2 GiB for the `small` preset at 8 x 512) from malloc and frees it when the
execution ends. glibc serves a block that large with a fresh mmap and gives it back with munmap,
so every step faults in and zeroes every page of it again: measured 170,000 page faults and
0.35 s of system time per 32 x 128 step, 600,000 faults and 1.1 s per `small` step, for steps of
1.2 s and 3.4 s (experiments/bench/perf.py; README, performance section).

`tune_host_malloc` sets three glibc options so freed memory stays in the process and is reused:
one malloc arena (the main heap; another thread's arena cannot grow past 64 MiB and falls back to
mmap for big blocks), no mmap, and no trimming of the heap top. With them the same steps take
0 faults in steady state. The cost: the process keeps its peak heap (reused, not returned to the
operating system) and can grow to several times a step's temporaries while it settles (a freed
block split by smaller allocations, or not yet freed when the next step starts, makes the heap
grow: a few slow steps early on). Measured: the `small` benchmark worker peaked at 6.9 GB
resident against 3.0 GB with glibc's defaults. Threads also share one arena lock. Runs short of
memory should set JAXGRM_HOST_MALLOC=off.

`jaxgrm` applies it on import when the host is the compute device: Linux with glibc, and either
JAX_PLATFORMS names only cpu or no accelerator plugin for JAX is installed. On GPU and TPU hosts
buffers live on the device and the defaults are left alone. JAXGRM_HOST_MALLOC=on / off forces
it either way. The arena setting only reaches threads that have not allocated yet, so import
jaxgrm before the first JAX computation (the CLI and the experiments do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform

ENV = "JAXGRM_HOST_MALLOC"

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: dict | None = None

# libtpu is found by import; GPU plugins register under the "jax_plugins" entry-point group or
# the `jax_plugins` namespace package, which covers plugins not named here.
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins")


def accelerator_plugin_installed() -> bool:
    """Whether JAX could find a GPU or TPU backend in this environment (without starting one)."""
    if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def should_tune(environ=os.environ) -> tuple[bool, str]:
    """(apply?, why) from JAXGRM_HOST_MALLOC, JAX_PLATFORMS and the installed plugins."""
    mode = environ.get(ENV, "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{ENV}={environ[ENV]!r}: expected auto, on or off")
    if mode != "auto":
        return mode == "on", f"{ENV}={mode}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False, "not Linux with glibc"
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        cpu_only = platforms == ["cpu"]
        return cpu_only, f"JAX_PLATFORMS={','.join(platforms)}"
    if accelerator_plugin_installed():
        return False, "an accelerator plugin for JAX is installed"
    return True, "CPU-only JAX"


def tune_host_malloc(environ=os.environ) -> dict:
    """Apply the malloc settings above once per process if `should_tune`; returns what was done:
    {"applied": bool, "reason": str}."""
    global _applied
    if _applied is not None:
        return _applied
    apply, reason = should_tune(environ)
    if apply:
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            mallopt = ctypes.CDLL(name).mallopt
        except (OSError, AttributeError) as e:
            apply, reason = False, f"no mallopt in {name}: {e}"
        else:
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            # -1 as the trim threshold is SIZE_MAX inside glibc: never trim.
            ok = [
                mallopt(p, v)
                for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
            ]
            if not all(ok):
                apply, reason = False, f"mallopt refused a setting ({ok})"
    _applied = {"applied": apply, "reason": reason}
    return _applied
