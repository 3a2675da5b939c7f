"""experiments/tpu: the launcher's option parsing, a two-process jax.distributed check over
loopback, the passthrough to the `jaxgrm` command, and the command run_pod.sh builds."""

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.tpu.launch import LaunchSpec, main, parse_launch_args, xla_flags_with_devices

ROOT = Path(__file__).resolve().parents[1]
ENV3 = {
    "JAXGRM_COORDINATOR": "10.0.0.2:8476",
    "JAXGRM_NUM_PROCESSES": "4",
    "JAXGRM_PROCESS_ID": "3",
}


def usage_error(capsys, argv, env=None) -> str:
    """parse_launch_args must exit 2; its stderr."""
    with pytest.raises(SystemExit) as done:
        parse_launch_args(argv, env or {})
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:")
    return err


def test_flags():
    argv = ["--coordinator", "host-0:1234", "--num-processes", "2", "--process-id", "1",
            "--cpu-collectives", "gloo", "--local-devices", "2",
            "--", "rl", "--config", "c.py", "--workdir", "w", "--", "--rl.steps", "3"]  # fmt: skip
    spec = parse_launch_args(argv, {})
    command = ("rl", "--config", "c.py", "--workdir", "w", "--", "--rl.steps", "3")
    assert spec == LaunchSpec(
        coordinator="host-0:1234", num_processes=2, process_id=1, cpu_collectives="gloo",
        local_devices=2, command=command,
    )  # fmt: skip
    assert spec.distributed == "explicit"


def test_no_addressing_is_auto_detection_and_single_process_is_off():
    spec = parse_launch_args(["--", "data", "list"], {})
    assert (spec.coordinator, spec.num_processes, spec.process_id) == (None, None, None)
    assert spec.distributed == "auto" and spec.command == ("data", "list")
    spec = parse_launch_args(["--single-process", "--", "data", "list"], ENV3)
    assert spec.distributed == "off" and spec.coordinator is None  # the variables are ignored
    assert parse_launch_args(["--check"], {}).check


def test_environment_fallback_and_flags_win():
    spec = parse_launch_args(["--check"], ENV3)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("10.0.0.2:8476", 4, 3)
    spec = parse_launch_args(["--process-id", "0", "--coordinator", "me:1", "--check"], ENV3)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("me:1", 4, 0)
    # one flag completes the two variables; empty variables count as unset
    env = {**ENV3, "JAXGRM_PROCESS_ID": ""}
    spec = parse_launch_args(["--process-id", "2", "--check"], env)
    assert spec.process_id == 2


@pytest.mark.parametrize(
    "argv, env, missing",
    [
        (["--coordinator", "h:1"], {}, ["--num-processes", "--process-id"]),
        (["--coordinator", "h:1", "--num-processes", "2"], {}, ["--process-id"]),
        (["--num-processes", "2", "--process-id", "0"], {}, ["--coordinator"]),
        ([], {"JAXGRM_PROCESS_ID": "0"}, ["--coordinator", "--num-processes"]),
    ],
)
def test_addressing_goes_together(capsys, argv, env, missing):
    err = usage_error(capsys, [*argv, "--check"], env)
    assert "go together" in err
    for name in missing:
        assert f"{name} (or JAXGRM_" in err
    named = {"--coordinator", "--num-processes", "--process-id"}
    for name in named - set(missing):
        assert f"{name} (or" not in err


@pytest.mark.parametrize(
    "coordinator, process_id, num, message",
    [
        ("host", "0", "2", "must be HOST:PORT"),
        (":80", "0", "2", "must be HOST:PORT"),
        ("host:http", "0", "2", "the port must be a number"),
        ("host:", "0", "2", "the port must be a number"),
        ("host:70000", "0", "2", "the port must be a number"),
        ("host:1", "2", "2", "--process-id must be in [0, 2)"),
        ("host:1", "-1", "2", "--process-id must be in [0, 2)"),
        ("host:1", "0", "0", "--num-processes must be at least 1"),
        ("host:1", "0", "two", "--num-processes must be an integer"),
        ("host:1", "x", "2", "--process-id must be an integer"),
    ],
)
def test_bad_values(capsys, coordinator, process_id, num, message):
    argv = ["--coordinator", coordinator, "--process-id", process_id, "--num-processes", num]
    assert message in usage_error(capsys, [*argv, "--check"])


def test_bad_value_from_the_environment_names_the_variable(capsys):
    err = usage_error(capsys, ["--check"], {**ENV3, "JAXGRM_PROCESS_ID": "4"})
    assert "JAXGRM_PROCESS_ID (from the environment) must be in [0, 4)" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to run"),
        (["--check", "--", "data", "list"], "--check runs no command"),
        (["rl", "--config", "c.py"], "go after `--`"),
        (["--single-process", "--process-id", "0", "--check"], "does not go with --process-id"),
        (["--local-devices", "0", "--check"], "--local-devices must be at least 1"),
        (["--cpu-collectives", "nccl", "--check"], "invalid choice"),
    ],
)
def test_other_usage_errors(capsys, argv, message):
    assert message in usage_error(capsys, argv)


def test_xla_flags_with_devices():
    flags = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
    assert xla_flags_with_devices(flags, 2) == (
        "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
    )
    assert xla_flags_with_devices("", 4) == "--xla_force_host_platform_device_count=4"


def test_passthrough_runs_the_click_command(capsys):
    assert main(["--single-process", "--", "--help"], {}) == 0
    assert "Usage: jaxgrm" in capsys.readouterr().out
    assert main(["--single-process", "--", "rl", "--help"], {}) == 0
    assert "--workdir" in capsys.readouterr().out
    assert main(["--single-process", "--", "no-such-command"], {}) == 2
    assert "No such command" in capsys.readouterr().err


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXGRM_", "XLA_FLAGS"))}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_module_exit_status():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.tpu.launch", "--single-process", "--", "data", "list"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "world" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.tpu.launch", "--num-processes", "2", "--check"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "missing --coordinator" in proc.stderr


def test_two_processes_over_loopback():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.tpu.launch",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--cpu-collectives",
                "gloo",
                "--local-devices",
                "2",
                "--check",
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err
        info = json.loads(out.strip().splitlines()[-1])
        assert info == {
            "process_index": i, "process_count": 2, "local_device_count": 2,
            "device_count": 4, "platform": "cpu",
        }  # fmt: skip


def test_run_pod_builds_the_remote_command(tmp_path):
    fake = tmp_path / "gcloud"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    script = ROOT / "experiments" / "tpu" / "run_pod.sh"
    env = {**_env(), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    args = [
        "--",
        "rl",
        "--config",
        "my config.py",
        "--workdir",
        "/mnt/s/r",
        "--",
        "--rl.steps",
        "2",
    ]
    proc = subprocess.run(
        ["bash", str(script), "run", "tpu1", "zone-a", "proj", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
    assert lines[4:11] == [
        "tpu1",
        "--zone",
        "zone-a",
        "--project",
        "proj",
        "--worker=all",
        "--command",
    ]
    remote = lines[11]
    assert remote.startswith("cd jaxgrm && .venv/bin/python -m experiments.tpu.launch -- rl")
    # the remote shell gets the arguments back exactly
    echoed = subprocess.run(
        ["bash", "-c", 'printf "%s\\n" ' + remote.split("experiments.tpu.launch ", 1)[1]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert echoed.stdout.splitlines() == args
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
