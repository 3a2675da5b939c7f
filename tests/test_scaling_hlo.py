"""The scaling benchmark's HLO check: the data-parallel train step on 2 virtual devices compiles
to gradient all-reduces only (no resharding, no host transfers); the FSDP one gathers parameters.
Also unit tests of the HLO parser on a hand-written module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench.scaling import inspect_hlo, parse_replica_groups, shape_variants

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_devices():
    """One worker run: 2 virtual CPU devices, tiny model, 4 x 24 tokens, one timed step."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "experiments.bench.scaling", "--worker", "--n-devices", "2"]
    cmd += ["--runs", "1", "--model", "tiny", "--seq", "24", "--global-batch", "4"]
    cmd += ["--modes", "strong", "--layouts", "dp", "fsdp"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_parallel_only_all_reduces_gradients(two_devices):
    run = two_devices["layouts"]["dp"]["strong"]
    hlo = run["hlo"]
    assert run["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert hlo["counts"]["all-reduce"] >= 1
    for kind in ("all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        assert hlo["counts"][kind] == 0, (kind, hlo["collectives"])
    assert hlo["unexpected"] == []
    assert hlo["host_transfers"] == []
    assert all(c["axes"] == ["data"] for c in hlo["collectives"])
    # Gradient all-reduces move about the parameters' bytes (the tied embedding's two gradient
    # contributions may be reduced separately, hence a little over 1).
    assert 0.9 <= run["grad_allreduce_bytes_over_param_bytes"] <= 1.5
    assert hlo["total_bytes_per_step"] <= 1.5 * run["param_bytes"]
    assert all(x == x for x in run["losses"])  # the step ran and the loss is not NaN


def test_fsdp_gathers_parameters(two_devices):
    run = two_devices["layouts"]["fsdp"]["strong"]
    hlo = run["hlo"]
    assert run["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert hlo["counts"]["all-gather"] > 0
    # Every collective runs over the fsdp axis (the only axis of size > 1).
    assert all(c["axes"] == ["fsdp"] for c in hlo["collectives"])
    assert hlo["counts"]["collective-permute"] == 0
    assert hlo["host_transfers"] == []


def test_fsdp_has_no_unexpected_collectives(two_devices):
    # The decoder pins activations to the batch split and gathers the embedding's D for the
    # lookup (constrain_batch, gather_fsdp); without that XLA resharded activations (all-to-alls,
    # all-gathers of [B*T, D] rows and of the token ids).
    assert two_devices["layouts"]["fsdp"]["strong"]["hlo"]["unexpected"] == []


def test_gradient_accumulation_keeps_the_batch_split():
    """Micro-batches interleave rows, so every micro-batch stays split over the devices: with
    accum_steps 2 the step still only all-reduces gradients (no all-gather of the batch)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "experiments.bench.scaling", "--worker", "--n-devices", "2"]
    cmd += ["--runs", "1", "--model", "tiny", "--seq", "24", "--global-batch", "8"]
    cmd += ["--modes", "strong", "--layouts", "dp", "--accum-steps", "2"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hlo = json.loads(proc.stdout.strip().splitlines()[-1])["layouts"]["dp"]["strong"]["hlo"]
    assert hlo["counts"]["all-gather"] == 0 and hlo["counts"]["all-to-all"] == 0, hlo
    assert hlo["counts"]["all-reduce"] >= 1 and hlo["unexpected"] == []


HLO = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %a2a = f32[8,16]{1,0} all-to-all(%x), channel_id=3, replica_groups=[2,2]<=[4], dimensions={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %a2a)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (w: f32[64,32], g: f32[16,32]) -> f32[64,32] {
  %w = f32[64,32]{1,0} parameter(0)
  %g = f32[16,32]{1,0} parameter(1)
  %ar = (f32[64,32]{1,0}, f32[]) all-reduce(%w, %c0), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global_device_ids=true, to_apply=%add
  %ag = f32[64,32]{1,0} all-gather(%g), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
  %init = (s32[], f32[8,16]) tuple(%i0, %z)
  %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %cb = f32[] custom-call(%w), custom_call_target="xla_ffi_python_cpu_callback"
  %snd = (f32[4], u32[], token[]) send(%v, %tok), channel_id=9
  ROOT %r = f32[64,32]{1,0} add(%w, %ag)
}
"""  # noqa: E501


def test_inspect_hlo_on_a_hand_written_module():
    mesh = {"data": 2, "tensor": 2}
    hlo = inspect_hlo(HLO, mesh, shape_variants((64, 32)) | shape_variants((16, 32)))
    assert hlo["counts"] == {
        "all-reduce": 1, "all-gather": 1, "reduce-scatter": 0, "all-to-all": 1,
        "collective-permute": 0,
    }  # fmt: skip
    by_kind = {c["kind"]: c for c in hlo["collectives"]}
    ar, ag, a2a = by_kind["all-reduce"], by_kind["all-gather"], by_kind["all-to-all"]
    assert ar["axes"] == ["data"] and ar["tags"] == ["param", "scalar"] and ar["expected"]
    assert ar["bytes"] == 64 * 32 * 4 + 4
    assert ag["axes"] == ["data", "tensor"] and not ag["expected"]  # gather over a non-fsdp axis
    assert a2a["times_per_step"] == 5 and a2a["axes"] == ["tensor"] and not a2a["expected"]
    assert hlo["bytes_per_step"]["all-to-all"] == 5 * 8 * 16 * 4
    assert {c["name"] for c in hlo["unexpected"]} == {"ag", "a2a"}
    ops = {h["op"] for h in hlo["host_transfers"]}
    assert ops == {"xla_ffi_python_cpu_callback", "send"}


def test_replica_group_forms():
    assert parse_replica_groups("{{0,2},{1,3}}", 4) == [[0, 2], [1, 3]]
    assert parse_replica_groups("{}", 4) == [[0, 1, 2, 3]]
    assert parse_replica_groups("[2,2]<=[2,2]T(1,0)", 4) == [[0, 2], [1, 3]]
    assert parse_replica_groups("mesh['a'=2,'b'=2] {'b'}", 4) == [[0, 1], [2, 3]]
    transposed = "mesh['a'=1,'b'=2,'c'=2], device_ids=([2,2]T(1,0)) {'b'}"
    assert parse_replica_groups(transposed, 4) == [[0, 1], [2, 3]]
