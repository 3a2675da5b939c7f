"""Strong and weak scaling of the GRPO train step on 1, 2, 4, 8 virtual CPU devices, with an
inspection of the compiled HLO for unexpected collectives and host transfers.

    python -m experiments.bench.scaling [--devices 1 2 4 8] [--runs 3] [--model tiny|small]
        [--seq 128] [--per-device-batch 4] [--global-batch 32] [--layouts dp fsdp mixed]
        [--out experiments/results/perf/scaling.json]

Each device count N runs in its own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N (set before jax is imported; `--worker` mode
prints one JSON line). The step is `jit_train_step`
with the `PolicyGradient` objective (GRPO clipped surrogate), AdamW + global-norm clipping, on a
batch with tokens_BT, segment_ids_BT, loss_mask_BT, old_logp_BT and adv_BT (loss on the second
half of each row), parameters born sharded by `create_model(cfg, mesh=...)`.

Layouts (mesh axes data x fsdp x tensor):
  dp     N x 1 x 1       pure data parallel: params replicated, batch split N ways.
  fsdp   1 x N x 1       FSDP/ZeRO-3: D dim of every weight split over fsdp, batch split N ways.
  mixed  N/2 x 1 x 2     (N >= 4) data parallel x 2-way tensor parallel (heads, MLP hidden, vocab).
N = 1 runs only `dp` (all layouts are the same single device) and is the baseline of all of them.

Scaling modes:
  strong  fixed global batch (--global-batch rows of --seq tokens).
  weak    fixed per-device batch (--per-device-batch rows, global = per-device x N).
Reported: median step time of --runs timed steps after one warm-up step, tokens/s (all B*T tokens),
and efficiency against N = 1 (dp, same mode): the usual strong T1 / (N * TN) and weak T1 / TN.
IMPORTANT: virtual CPU devices share the same cores, so no speed-up is expected (ideal shared-core
values are strong 1/N, weak 1/N); the useful numbers are `time_per_token_vs_1` (step time per
token over N = 1's: 1.0 = partitioning costs nothing) and the HLO check.

HLO check, from `jitted.lower(state, batch).compile().as_text()`: every all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute (and their -start/-done async forms), with the
result shapes, bytes, the mesh axes its replica groups span, and how many times it runs (collectives
inside while loops are multiplied by the loop's known trip count). Each buffer of a collective is
tagged `param` (shape equals a parameter's global or per-device shape), `scalar`, or `other`
(activation / batch shaped). Expected per layout:
  all-reduce     over batch axes (data, fsdp) of param/scalar buffers (gradients, loss sums);
                 over the tensor axis of anything (Megatron partial sums, vocab softmax stats).
  all-gather     of param buffers over fsdp (FSDP parameter gathers).
  reduce-scatter of param buffers over fsdp (FSDP gradient scatters).
Everything else is `unexpected` and listed: all-to-all, collective-permute, all-gathers of
activations or of batch rows, all-reduces of activation-shaped buffers over the batch axes.
Host transfers: send/recv, infeed/outfeed, host-callback custom calls and host memory space S(5).
The shape tags are a heuristic: an activation whose shape equals a parameter's would be tagged
`param` (the default shapes avoid such collisions).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LEARNING_RATE = 1e-5
COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
HOST_OPCODES = ("send", "send-done", "recv", "recv-done", "infeed", "outfeed")
BATCH_AXES = ("data", "fsdp")
LOAD_WARNING = (
    "virtual CPU devices share the same physical cores: no speed-up is expected from more "
    "devices; wall-clock numbers also depend on the machine's load at the time of the run"
)
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
DTYPE_BYTES |= {"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


# ---- layouts ------------------------------------------------------------------------------------
def layout_shape(name: str, n: int) -> tuple[int, int, int] | None:
    """(data, fsdp, tensor) of a layout on n devices, or None where it does not apply."""
    if name == "dp":
        return (n, 1, 1)
    if n == 1:
        return None  # fsdp and mixed on one device are the dp run
    if name == "fsdp":
        return (1, n, 1)
    if name == "mixed":
        return (n // 2, 1, 2) if n >= 4 and n % 2 == 0 else None
    raise ValueError(f"unknown layout {name}")


# ---- HLO parsing --------------------------------------------------------------------------------
_SHAPE = re.compile(r"\b(pred|[sufc]\d+|bf16|f8\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, 'opcode(...)...'); TYPE may be a nested tuple."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def shapes_of(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(type_str)
    ]


def nbytes(shape: tuple[str, tuple[int, ...]]) -> int:
    dt, dims = shape
    return DTYPE_BYTES.get(dt, 4) * math.prod(dims)


def _attr(text: str, key: str) -> str | None:
    """The value of `key=` in an instruction's attributes, braces/brackets balanced."""
    i = text.find(key + "=")
    if i < 0:
        return None
    j = i + len(key) + 1
    depth, k = 0, j
    while k < len(text):
        c = text[k]
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
            if depth < 0:
                break
        elif c == "," and depth == 0:
            # mesh[...] {'axis'} has a space before its axis set: keep going
            if not text[j:k].startswith("mesh["):
                break
            if text[j:k].rstrip().endswith("}"):
                break
        k += 1
    return text[j:k].strip()


def parse_replica_groups(value: str | None, num_partitions: int):
    """Explicit groups of partition ids from the three printed forms: {{0,1},{2,3}},
    iota [G,S]<=[dims]T(perm), and mesh['a'=2,'b'=2] {'a'}. None if unknown/absent."""
    import numpy as np

    if value is None:
        return None
    value = value.strip()
    if value.startswith("mesh["):
        m = re.match(r"mesh\[(.*?)\](.*?)\{(.*?)\}\s*$", value)
        if not m:
            return None
        names, sizes = [], []
        for part in m.group(1).split(","):
            mm = re.match(r"\s*'?([^'=]+)'?\s*=\s*(\d+)", part)
            if not mm:
                return None
            names.append(mm.group(1))
            sizes.append(int(mm.group(2)))
        chosen = [a.strip().strip("'") for a in m.group(3).split(",") if a.strip()]
        if any(a not in names for a in chosen):
            return None  # sub-axis notation etc.: leave unclassified
        ids = np.arange(math.prod(sizes))
        dev = re.search(r"device_ids=\(?\[([\d,]+)\](?:T\(([\d,]+)\))?", m.group(2))
        if dev:  # the mesh's devices in order: iota over dims, transposed, or an explicit list
            listed = [int(x) for x in dev.group(1).split(",")]
            if dev.group(2) or math.prod(listed) == ids.size and len(listed) != ids.size:
                ids = ids.reshape(listed)
                if dev.group(2):
                    ids = ids.transpose([int(x) for x in dev.group(2).split(",")])
                ids = ids.reshape(-1)
            elif len(listed) == ids.size:
                ids = np.array(listed)
            else:
                return None
        ids = ids.reshape(sizes)
        keep = [i for i, a in enumerate(names) if a not in chosen]
        grouped = [names.index(a) for a in chosen]
        size = math.prod(sizes[i] for i in grouped) if grouped else 1
        return ids.transpose(keep + grouped).reshape(-1, size).tolist()
    if value.startswith("["):
        m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", value)
        if not m:
            return None
        out = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(out).tolist()
    if value.startswith("{"):
        groups = re.findall(r"\{([\d,\s]*)\}", value[1:-1] if value.startswith("{{") else value)
        parsed = [[int(x) for x in g.split(",") if x.strip()] for g in groups]
        parsed = [g for g in parsed if g]
        return parsed or [list(range(num_partitions))]
    return None


def mesh_axes_of_groups(groups, mesh_shape: dict[str, int]) -> list[str] | None:
    """Mesh axes along which the devices of a group differ (partition id i = i-th device of the
    mesh in row-major order, which is the device assignment jax compiles with)."""
    import numpy as np

    if groups is None:
        return None
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    axes: set[str] = set()
    for g in groups:
        coords = np.array([np.unravel_index(i, sizes) for i in g])
        for k, name in enumerate(names):
            if len(set(coords[:, k].tolist())) > 1:
                axes.add(name)
    return [a for a in names if a in axes]


def parse_hlo(text: str):
    """(instructions, computation multiplicities). Each instruction: dict(comp, name, type,
    opcode, rest). A computation's multiplicity is how often it runs per step (while bodies
    times their known trip count; unknown trip counts count once and are flagged)."""
    instrs, comp, entry = [], None, None
    for line in text.splitlines():
        if line and not line[0].isspace():
            m = _COMP.match(line)
            if m:
                comp = m.group(1)
                if line.startswith("ENTRY"):
                    entry = comp
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        type_str, tail = _split_type(m.group(2))
        opcode = tail.split("(", 1)[0].strip()
        instrs.append(dict(comp=comp, name=m.group(1), type=type_str, opcode=opcode, rest=tail))
    edges: dict[str, list[tuple[str, int | None]]] = {}
    for ins in instrs:
        rest = ins["rest"]
        if ins["opcode"] == "while":
            trip = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', rest)
            n = int(trip.group(1)) if trip else None
            for key in ("body", "condition"):
                callee = _attr(rest, key)
                if callee:
                    edges.setdefault(callee.lstrip("%"), []).append((ins["comp"], n))
        elif ins["opcode"] in ("call", "conditional", "async-start"):
            for callee in re.findall(
                r"(?:to_apply|calls|branch_computations|_computation)=\{?([^}]*)", rest
            ):
                for c in callee.split(","):
                    c = c.strip().lstrip("%").split(" ")[0]
                    if c:
                        edges.setdefault(c, []).append((ins["comp"], 1))
    mult: dict[str, tuple[int, bool]] = {}

    def multiplicity(c: str, seen=()) -> tuple[int, bool]:
        if c == entry or c not in edges or c in seen:
            return (1, False)
        if c not in mult:
            total, unknown = 0, False
            for caller, n in edges[c]:
                m, u = multiplicity(caller, seen + (c,))
                total += m * (n or 1)
                unknown |= u or n is None
            mult[c] = (total, unknown)
        return mult[c]

    return instrs, multiplicity


def shape_variants(shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """A shape and every shape made by merging runs of adjacent dimensions or dropping 1s, in any
    order of the dimensions (XLA bitcasts [D, K, H] gradients to [D, K*H] or [K*H, D])."""
    dims = tuple(d for d in shape if d != 1) or ()
    out = {tuple(shape), dims}
    for cuts in range(1 << max(len(dims) - 1, 0)):
        merged, cur = [], dims[0] if dims else 1
        for i, d in enumerate(dims[1:]):
            if cuts >> i & 1:
                cur *= d
            else:
                merged.append(cur)
                cur = d
        if dims:
            merged.append(cur)
        out.add(tuple(merged))
    return {p for v in out for p in itertools.permutations(v)}


def _tag(shape, param_shapes: set) -> str:
    if not shape[1] or math.prod(shape[1]) == 1:
        return "scalar"
    return "param" if shape[1] in param_shapes else "other"


def _expected(kind: str, axes: list[str] | None, tags: list[str]) -> tuple[bool, str]:
    if axes is None:
        return False, "replica groups not understood"
    spans = set(axes)
    params_only = all(t in ("param", "scalar") for t in tags)
    if kind == "all-reduce":
        if "tensor" in spans:
            return True, "tensor-parallel partial sums / replicated-param gradients"
        if params_only:
            return True, "gradient / loss-sum reduction over the batch axes"
        return False, "all-reduce of an activation/batch-shaped buffer over the batch axes"
    if kind == "all-gather":
        if spans <= {"fsdp"} and params_only:
            return True, "FSDP parameter all-gather"
        return False, "all-gather of activations/batch rows or over a non-fsdp axis"
    if kind == "reduce-scatter":
        if spans <= {"fsdp"} and params_only:
            return True, "FSDP gradient reduce-scatter"
        return False, "reduce-scatter of a non-parameter buffer or over a non-fsdp axis"
    return False, f"{kind} (resharding between layouts)"


def inspect_hlo(text: str, mesh_shape: dict[str, int], param_shapes: set) -> dict:
    """Collectives (with classification) and host transfers of a compiled HLO module."""
    num_partitions = math.prod(mesh_shape.values())
    instrs, multiplicity = parse_hlo(text)
    starts = {ins["name"]: ins for ins in instrs if ins["opcode"].endswith("-start")}
    collectives, host = [], []
    for ins in instrs:
        op, rest = ins["opcode"], ins["rest"]
        base = op.removesuffix("-start").removesuffix("-done")
        if base in COLLECTIVE_KINDS and not op.endswith("-start"):
            src = ins
            if op.endswith("-done"):  # groups live on the matching -start
                operand = re.match(r"[\w\-]+\(\s*%?([\w.\-]+)", rest)
                src = starts.get(operand.group(1), ins) if operand else ins
            shapes = shapes_of(ins["type"])
            groups_attr = (
                "source_target_pairs" if base == "collective-permute" else "replica_groups"
            )
            raw_groups = _attr(src["rest"], groups_attr)
            if base == "collective-permute":
                pairs = re.findall(r"\{(\d+),(\d+)\}", raw_groups or "")
                groups = [[int(a), int(b)] for a, b in pairs] or None
            else:
                groups = parse_replica_groups(raw_groups, num_partitions)
            group_size = len(groups[0]) if groups else num_partitions
            axes = mesh_axes_of_groups(groups, mesh_shape)
            tags = [_tag(s, param_shapes) for s in shapes]
            logical = sum(nbytes(s) for s in shapes)
            if base == "reduce-scatter":
                logical *= group_size
            times, unknown_trip = multiplicity(ins["comp"])
            ok, why = _expected(base, axes, tags)
            op_name = re.search(r'op_name="([^"]*)"', src["rest"])
            collectives.append(
                dict(
                    kind=base, name=ins["name"], is_async=op.endswith("-done"),
                    shapes=[f"{dt}[{','.join(map(str, d))}]" for dt, d in shapes], tags=tags,
                    buffer_bytes=[nbytes(s) for s in shapes],
                    bytes=logical, axes=axes, group_size=group_size, times_per_step=times,
                    unknown_trip_count=unknown_trip, expected=ok, reason=why,
                    op_name=op_name.group(1) if op_name else None,
                )
            )  # fmt: skip
        target = re.search(r'custom_call_target="([^"]+)"', rest) if op == "custom-call" else None
        host_call = target and re.search(r"callback|host|python", target.group(1), re.I)
        if op in HOST_OPCODES or host_call or "S(5)" in ins["type"]:
            what = target.group(1) if target else op
            host.append(dict(name=ins["name"], op=what, shapes=ins["type"][:200]))
    counts = {k: 0 for k in COLLECTIVE_KINDS}
    bytes_by_kind = {k: 0 for k in COLLECTIVE_KINDS}
    for c in collectives:
        counts[c["kind"]] += 1
        bytes_by_kind[c["kind"]] += c["bytes"] * c["times_per_step"]
    unexpected = [c for c in collectives if not c["expected"]]
    custom_targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    return dict(
        counts=counts,
        bytes_per_step=bytes_by_kind,
        total_bytes_per_step=sum(bytes_by_kind.values()),
        collectives=collectives,
        unexpected=unexpected,
        host_transfers=host,
        custom_call_targets=custom_targets,
        num_instructions=len(instrs),
    )


# ---- worker (one process, N virtual devices) ----------------------------------------------------
def measure(layout: str, shape, global_batch: int, args) -> dict:
    import jax
    from flax import nnx

    from jaxgrm.model import ModelConfig, create_model
    from jaxgrm.rl.losses import PolicyLossConfig
    from jaxgrm.train import (
        MeshConfig,
        OptimConfig,
        PolicyGradient,
        TrainState,
        batch_sharding,
        jit_train_step,
        make_optimizer,
        make_train_mesh,
        shard_batch,
    )

    data, fsdp, tensor = shape
    if global_batch % (data * fsdp):
        return dict(skipped=f"batch {global_batch} does not split over data x fsdp = {data * fsdp}")
    mesh = make_train_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    cfg = getattr(ModelConfig, args.model)()
    model = create_model(cfg, seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    leaves = jax.tree.leaves(params)
    param_shapes = set()
    for x in leaves:
        param_shapes |= shape_variants(tuple(x.shape))
        param_shapes |= shape_variants(tuple(x.sharding.shard_shape(x.shape)))
    param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    tx = make_optimizer(OptimConfig(learning_rate=LEARNING_RATE, warmup_steps=0, total_steps=1000))
    state = TrainState.create(params, tx, seed=0)
    del model, params
    step = jit_train_step(
        graphdef,
        PolicyGradient(PolicyLossConfig()),
        tx,
        accum_steps=args.accum_steps,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        batch_shardings=batch_sharding(mesh),
    )
    from experiments.bench.perf import rl_batch  # the batch the perf benchmark trains on

    batch = shard_batch(rl_batch(global_batch, args.seq, cfg.vocab_size), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    hlo = inspect_hlo(compiled.as_text(), dict(mesh.shape), param_shapes)
    if args.dump_hlo:
        Path(args.dump_hlo).mkdir(parents=True, exist_ok=True)
        name = f"{layout}_n{jax.device_count()}_b{global_batch}.hlo.txt"
        Path(args.dump_hlo, name).write_text(compiled.as_text())
    times, losses = [], []
    for i in range(args.runs + 1):  # the first run is the warm-up
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    med = statistics.median(times) if times else None
    tokens = global_batch * args.seq
    return dict(
        mesh=dict(mesh.shape), global_batch=global_batch, seq=args.seq, tokens=tokens,
        compile_s=compile_s, step_s=med, times_s=times,
        tokens_per_s=tokens / med if med else None, losses=losses,
        param_bytes=param_bytes, num_params=sum(x.size for x in leaves),
        grad_allreduce_bytes_over_param_bytes=grad_reduce_ratio(hlo, param_bytes),
        hlo=hlo,
    )  # fmt: skip


def grad_reduce_ratio(hlo: dict, param_bytes: int) -> float:
    """Bytes of param-shaped buffers all-reduced over a batch axis (gradients), per step, over
    the parameters' bytes. About 1 for data parallelism; tensor-axis reductions are left out."""
    total = 0
    for c in hlo["collectives"]:
        if c["kind"] == "all-reduce" and set(c["axes"] or ()) & set(BATCH_AXES):
            param = sum(
                b for b, t in zip(c["buffer_bytes"], c["tags"], strict=True) if t == "param"
            )
            total += param * c["times_per_step"]
    return total / param_bytes


def worker(args) -> dict:
    import jax

    n = jax.device_count()
    if n != args.n_devices:
        raise RuntimeError(f"expected {args.n_devices} devices, jax sees {n} (XLA_FLAGS unset?)")
    out = dict(n_devices=n, device=str(jax.devices()[0]), layouts={})
    for layout in args.layouts:
        shape = layout_shape(layout, n)
        if shape is None:
            continue
        res = {}
        batches = dict(strong=args.global_batch, weak=args.per_device_batch * n)
        for mode in args.modes:
            same = [m for m in res if batches[m] == batches[mode] and "skipped" not in res[m]]
            if same:  # identical configuration already measured (e.g. N = 8: 4 x 8 = 32)
                res[mode] = dict(res[same[0]], same_as=same[0])
                continue
            print(f"[worker n={n}] {layout} {mode} batch {batches[mode]}", file=sys.stderr)
            res[mode] = measure(layout, shape, batches[mode], args)
        out["layouts"][layout] = dict(
            shape=dict(zip(("data", "fsdp", "tensor"), shape, strict=True)), **res
        )
    return out


# ---- parent -------------------------------------------------------------------------------------
def worker_cmd(n: int, args) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.bench.scaling", "--worker", "--n-devices", str(n)]
    cmd += ["--runs", str(args.runs), "--model", args.model, "--seq", str(args.seq)]
    cmd += ["--per-device-batch", str(args.per_device_batch)]
    cmd += ["--global-batch", str(args.global_batch), "--layouts", *args.layouts]
    cmd += ["--modes", *args.modes, "--accum-steps", str(args.accum_steps)]
    if args.dump_hlo:
        cmd += ["--dump-hlo", args.dump_hlo]
    return cmd


def run_worker(n: int, args) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = worker_cmd(n, args)
    print(f"[scaling] N={n}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.worker_timeout, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.worker_timeout:.0f} s")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result["worker_wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-20:]
    return dict(error=f"rc {proc.returncode}", tail=tail)


def add_efficiency(results: dict) -> None:
    """Efficiency of each (layout, mode, N) against N = 1 dp in the same mode."""
    base = results.get("1", {}).get("layouts", {}).get("dp", {})
    for res in results.values():
        for lay in res.get("layouts", {}).values():
            for mode in ("strong", "weak"):
                r, b = lay.get(mode), base.get(mode)
                if not r or not b or not r.get("step_s") or not b.get("step_s"):
                    continue
                n = math.prod(r["mesh"].values())
                per_token = (r["step_s"] / r["tokens"]) / (b["step_s"] / b["tokens"])
                r["time_per_token_vs_1"] = per_token
                # Standard definitions: strong T1 / (N TN); weak T1 / TN (work per device fixed).
                r["efficiency"] = b["step_s"] / (
                    n * r["step_s"] if mode == "strong" else r["step_s"]
                )


def _mib(b) -> str:
    return f"{b / 2**20:.2f}"


def print_tables(results: dict) -> None:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A"}
    short["collective-permute"] = "CP"
    print(f"\nNOTE: {LOAD_WARNING}.\n")
    for mode in ("strong", "weak"):
        print(f"### {mode} scaling\n")
        print(
            "| layout | N | mesh d/f/t | batch | step ms | tokens/s | eff. | t/tok vs 1 "
            "| AR | AG | RS | A2A | CP | coll. MiB | AR/param | unexpected | host |"
        )
        print("|" + "---|" * 17)
        for n, res in results.items():
            if "error" in res:
                print(f"| – | {n} | error: {res['error']} |")
                continue
            for layout, lay in res["layouts"].items():
                r = lay.get(mode)
                if not r:
                    continue
                if "skipped" in r:
                    print(f"| {layout} | {n} | skipped: {r['skipped']} |")
                    continue
                h = r["hlo"]
                counts = " | ".join(str(h["counts"][k]) for k in short)
                unexpected = {}
                for c in h["unexpected"]:
                    key = f"{short[c['kind']]} {'+'.join(c['shapes'])}"
                    unexpected[key] = unexpected.get(key, 0) + 1
                unexp = "; ".join(f"{v}x {k}" for k, v in unexpected.items()) or "none"
                if len(unexp) > 160:
                    unexp = f"{len(h['unexpected'])} ops (see JSON)"
                mesh = "/".join(str(v) for v in r["mesh"].values())
                print(
                    f"| {layout} | {n} | {mesh} | {r['global_batch']}x{r['seq']} "
                    f"| {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} "
                    f"| {r.get('efficiency', float('nan')):.2f} "
                    f"| {r.get('time_per_token_vs_1', float('nan')):.2f} | {counts} "
                    f"| {_mib(h['total_bytes_per_step'])} "
                    f"| {r['grad_allreduce_bytes_over_param_bytes']:.2f} | {unexp} "
                    f"| {len(h['host_transfers'])} |"
                )
        print()


def main_parent(args) -> None:
    results = {}
    for n in args.devices:
        results[str(n)] = run_worker(n, args)
        if "error" in results[str(n)]:
            print(f"[scaling] N={n} FAILED: {results[str(n)]}", file=sys.stderr)
    add_efficiency(results)
    print_tables(results)
    out = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join(["python", "-m", "experiments.bench.scaling", *sys.argv[1:]]),
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), python=sys.version),
        note=LOAD_WARNING,
        config=dict(vars(args)),
        layouts={k: "data x fsdp x tensor = " + v for k, v in
                 dict(dp="N x 1 x 1", fsdp="1 x N x 1", mixed="N/2 x 1 x 2 (N >= 4)").items()},
        results=results,
    )  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--runs", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--per-device-batch", type=int, default=4, help="weak scaling rows/device")
    parser.add_argument("--global-batch", type=int, default=32, help="strong scaling rows")
    parser.add_argument("--layouts", nargs="+", default=["dp", "fsdp", "mixed"])
    parser.add_argument(
        "--modes", nargs="+", choices=["strong", "weak"], default=["strong", "weak"]
    )
    parser.add_argument("--accum-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--dump-hlo", help="folder to write each compiled HLO text into")
    parser.add_argument("--worker-timeout", type=float, default=3600.0)
    parser.add_argument("--out", default="experiments/results/perf/scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n-devices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
