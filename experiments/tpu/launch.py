"""Run one `jaxgrm` command as one process of a multi-process JAX job (one process per host).

    python -m experiments.tpu.launch [LAUNCH OPTIONS] -- JAXGRM_SUBCOMMAND [ITS ARGUMENTS]

Every host runs the same line. The launcher joins the processes with `jax.distributed`, then runs
the `jaxgrm` click command in-process and exits with its status, so the trainers see all devices
of all hosts in `jax.devices()`. How the processes find each other:

* no options: `jax.distributed.initialize()` with no arguments, which detects a Cloud TPU VM pod
  slice (also Slurm and Open MPI) by itself; an error if it detects nothing;
* `--coordinator HOST:PORT --num-processes N --process-id I` (or the environment variables
  JAXGRM_COORDINATOR, JAXGRM_NUM_PROCESSES, JAXGRM_PROCESS_ID; a flag wins over its variable):
  all three or none;
* `--single-process`: no jax.distributed at all (one host, or a quick local run).

`--check` only joins and prints one JSON line per process (process_index, process_count,
local_device_count, device_count, platform). For tests on the CPU, `--cpu-collectives gloo` and
`--local-devices N` (virtual CPU devices per process), e.g. two processes over loopback:

    python -m experiments.tpu.launch --coordinator 127.0.0.1:7777 --num-processes 2 \\
        --process-id 0 --cpu-collectives gloo --local-devices 2 --check &
    python -m experiments.tpu.launch --coordinator 127.0.0.1:7777 --num-processes 2 \\
        --process-id 1 --cpu-collectives gloo --local-devices 2 --check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

PROG = "python -m experiments.tpu.launch"
ENV_COORDINATOR = "JAXGRM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXGRM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXGRM_PROCESS_ID"
_HOST_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """What the launcher does. `coordinator`, `num_processes` and `process_id` are all set or all
    None; `command` is what follows `--`, handed to `jaxgrm` unchanged."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    single_process: bool = False
    cpu_collectives: str | None = None
    local_devices: int | None = None
    check: bool = False
    command: tuple[str, ...] = ()

    @property
    def distributed(self) -> str:
        """ "explicit" (the three values), "auto" (JAX detects the cluster) or "off"."""
        if self.single_process:
            return "off"
        return "explicit" if self.coordinator is not None else "auto"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [options] -- JAXGRM_SUBCOMMAND [ARGS ...]",
        description="Join a multi-process JAX job (one process per host), then run a jaxgrm "
        "command in it, e.g. `-- rl --config experiments/configs/world_rl.py --workdir DIR`.",
    )
    p.add_argument(
        "--coordinator", metavar="HOST:PORT",
        help=f"address of process 0's coordinator service [env {ENV_COORDINATOR}]",
    )  # fmt: skip
    p.add_argument(
        "--num-processes", metavar="N", help=f"processes in the job [env {ENV_NUM_PROCESSES}]"
    )
    p.add_argument(
        "--process-id", metavar="I", help=f"this process, 0 to N-1 [env {ENV_PROCESS_ID}]"
    )
    p.add_argument(
        "--single-process", action="store_true",
        help="do not use jax.distributed (ignores the JAXGRM_* variables)",
    )  # fmt: skip
    p.add_argument(
        "--cpu-collectives", choices=("gloo", "mpi"),
        help="cross-process collectives for CPU devices (tests on the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--local-devices", metavar="N", type=int,
        help="virtual CPU devices in this process (sets XLA_FLAGS before jax is imported)",
    )  # fmt: skip
    p.add_argument(
        "--check", action="store_true",
        help="only join and print one JSON line about this process, then exit",
    )  # fmt: skip
    return p


def _int(parser, value: str, what: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        parser.error(f"{what} must be an integer, got {value!r}")
    return int(value)


def parse_launch_args(argv: Sequence[str], env: Mapping[str, str]) -> LaunchSpec:
    """The launch options before the first `--` and the jaxgrm command after it. Values missing
    from the flags come from `env`. Errors exit with status 2 and a usage message."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], tuple(argv[cut + 1 :])
    else:
        own, command = argv, ()
    parser = _parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)} "
            "(the jaxgrm command and its arguments go after `--`)"
        )

    flags = {
        "coordinator": ("--coordinator", ENV_COORDINATOR),
        "num_processes": ("--num-processes", ENV_NUM_PROCESSES),
        "process_id": ("--process-id", ENV_PROCESS_ID),
    }
    given = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    if args.single_process:
        if given:
            names = ", ".join(flags[k][0] for k in given)
            parser.error(f"--single-process does not go with {names}")
        raw = {}
    else:
        raw = dict(given)
        for key, (_, var) in flags.items():
            if key not in raw and env.get(var, "").strip():
                raw[key] = env[var]
    if raw and len(raw) < len(flags):
        absent = [f"{flag} (or {var})" for key, (flag, var) in flags.items() if key not in raw]
        missing = " and ".join(absent)
        parser.error(
            f"--coordinator, --num-processes and --process-id go together: missing {missing}"
        )

    def source(key: str) -> str:
        flag, var = flags[key]
        return flag if key in given else f"{var} (from the environment)"

    coordinator = num_processes = process_id = None
    if raw:
        coordinator = raw["coordinator"].strip()
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host:
            parser.error(f"{source('coordinator')} must be HOST:PORT, got {coordinator!r}")
        if not re.fullmatch(r"[0-9]+", port) or not 0 < int(port) < 65536:
            parser.error(
                f"{source('coordinator')}: the port must be a number from 1 to 65535, got {port!r}"
            )
        num_processes = _int(parser, raw["num_processes"], source("num_processes"))
        if num_processes < 1:
            parser.error(f"{source('num_processes')} must be at least 1, got {num_processes}")
        process_id = _int(parser, raw["process_id"], source("process_id"))
        if not 0 <= process_id < num_processes:
            parser.error(
                f"{source('process_id')} must be in [0, {num_processes}) for {num_processes} "
                f"processes, got {process_id}"
            )
    if args.local_devices is not None and args.local_devices < 1:
        parser.error(f"--local-devices must be at least 1, got {args.local_devices}")
    if not args.check and not command:
        parser.error("nothing to run: put the jaxgrm command after `--` (or pass --check)")
    if args.check and command:
        parser.error("--check runs no command; drop what follows `--`")
    return LaunchSpec(
        coordinator=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        single_process=args.single_process,
        cpu_collectives=args.cpu_collectives,
        local_devices=args.local_devices,
        check=args.check,
        command=command,
    )


def xla_flags_with_devices(flags: str, count: int) -> str:
    """XLA_FLAGS with the host-platform device count set to `count` (replacing any earlier)."""
    kept = [f for f in flags.split() if not f.startswith(_HOST_COUNT_FLAG)]
    return " ".join([*kept, f"{_HOST_COUNT_FLAG}={count}"])


def initialize(spec: LaunchSpec) -> None:
    """Configure jax for `spec` and join the job. Call before any other use of jax."""
    if spec.local_devices is not None:
        os.environ["XLA_FLAGS"] = xla_flags_with_devices(
            os.environ.get("XLA_FLAGS", ""), spec.local_devices
        )
    import jax

    if spec.cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", spec.cpu_collectives)
    if spec.distributed == "explicit":
        jax.distributed.initialize(
            coordinator_address=spec.coordinator,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
        )
    elif spec.distributed == "auto":
        try:
            jax.distributed.initialize()
        except ValueError as err:  # JAX found no TPU pod, Slurm or Open MPI job
            _parser().error(
                f"no cluster detected ({err}): pass --coordinator, --num-processes and "
                "--process-id, or --single-process"
            )


def describe() -> dict:
    """This process's place in the job."""
    import jax

    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "platform": jax.devices()[0].platform,
    }


def run_command(command: Sequence[str]) -> int:
    """Run `jaxgrm COMMAND...` in this process; its exit status."""
    from jaxgrm.cli import main as jaxgrm

    try:
        jaxgrm.main(args=list(command), prog_name="jaxgrm", standalone_mode=True)
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    spec = parse_launch_args(
        sys.argv[1:] if argv is None else argv, os.environ if env is None else env
    )
    initialize(spec)
    if spec.check:
        print(json.dumps(describe()), flush=True)
        return 0
    if spec.distributed != "off":
        info = describe()
        print(
            f"launch: process {info['process_index']} of {info['process_count']}, "
            f"{info['local_device_count']} of {info['device_count']} {info['platform']} devices; "
            f"running jaxgrm {' '.join(spec.command)}",
            file=sys.stderr,
            flush=True,
        )
    return run_command(spec.command)


if __name__ == "__main__":
    sys.exit(main())
