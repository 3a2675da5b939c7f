"""One performance benchmark: sampling, RL train step and achieved FLOP/s, with peak memory.

    python -m experiments.bench.perf [--batches 1 8 32 128] [--runs 5] [--sample-rounds 3]
                                     [--sample-dtypes float32 bfloat16]
                                     [--only sample|train|flops] [--skip-tunix] [--skip-torch]
                                     [--out PATH]

All systems run the same Qwen2-architecture weights (vocab 4096, hidden 256, 4 layers, 4 heads,
2 kv heads, MLP 1024, tied embeddings, float32), built once by transformers into one safetensors
checkpoint; jaxgrm imports it with `load_hf_checkpoint`, transformers and tunix read the same
directory. Every (system, task, batch) runs in its own subprocess (`--worker NAME`, printing one
JSON line), so each reports its own peak RSS (`ru_maxrss`; for JAX this includes the XLA
compiler). Timings are the median of `--runs` timed runs after one warm-up run; compile time is
reported separately. Sampling runs every system `--sample-rounds` times (default 3), round-robin
with the order rotated, and takes the median over all rounds' timed runs: on a shared machine a
burst of load from elsewhere then falls on every system alike instead of on whichever ran
during it; each round's own ratios are kept too.

1. Sampling tokens/s at each batch (64 prompt tokens, exactly 64 new tokens, top-k 50): jaxgrm's
   `Sampler`, transformers `generate` (torch CPU, 2 threads, OMP_WAIT_POLICY=PASSIVE) and tunix
   (`experiments/bench/tunix_side.py` run by `--tunix-python`), once per `--sample-dtypes`
   entry. float32: every system in float32. bfloat16: each system's own bfloat16 mode on the
   same float32 checkpoint: jaxgrm with `matmul_dtype="bfloat16"` (bfloat16 operands of the
   weight matmuls, float32 accumulation, float32 weights, activations and KV cache), tunix
   with dtype = param_dtype = bfloat16 (weights, activations and cache in bfloat16),
   transformers with torch_dtype bfloat16.
2. RL train-step tokens/s (GRPO clipped surrogate, token mean over completion tokens, forward +
   backward + AdamW with global-norm clipping; 32 rows of 128 tokens, the second half of each row
   is completion): jaxgrm's `jit_train_step` with `PolicyGradient`, a plain torch loop over the
   transformers model, and tunix. jaxgrm and torch see identical batches (fixed seed), and both
   report their loss before the first update as a cross-check. Tokens/s counts all B*T tokens.
   Three more rows show what jaxgrm's host malloc settings (`jaxgrm.hostmem`, applied on
   import) are worth: jaxgrm with glibc's defaults (JAXGRM_HOST_MALLOC=off), and torch and tunix
   with jaxgrm's settings. With the settings the heap reaches its steady state after a step or
   two, which is one reason for five timed runs: the median is the steady state. One more row
   trains jaxgrm with `matmul_dtype="bfloat16"` (mixed precision: float32 weights and
   optimizer, bfloat16 matmul operands forward and backward, float32 accumulation).
3. Achieved FLOP/s of jaxgrm's train step for the `small` preset at sequence 512 (batch 8), as a
   fraction of (a) this machine's jitted float32 `dot_general` throughput on exactly the matmul
   shapes the step runs (forward, input-gradient and weight-gradient forms), weighted by FLOPs,
   i.e. the time the step's matmuls alone would take at measured speed, and (b) a 2048^3 matmul.
   FLOPs are counted analytically (see `analytic_flops`) and by XLA's cost analysis.

Prints markdown tables and writes everything, with machine facts, as JSON to `--out`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is ever imported

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

PROMPT_LEN = 64
NEW_TOKENS = 64
TOP_K = 50
VOCAB = 4096
TORCH_THREADS = 2
LEARNING_RATE = 1e-5
CLIP = 0.2
HOST_MALLOC_ENV = "JAXGRM_HOST_MALLOC"  # jaxgrm.hostmem.ENV (not imported: torch workers)
TUNIX_SIDE = Path(__file__).with_name("tunix_side.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TUNIX_PYTHON = "/tmp/tunixvenv/bin/python"
MEMORY_NOTE = (
    "peak_rss_mb is ru_maxrss of the worker process that ran the measurement; for JAX it "
    "includes the XLA compiler, for torch the transformers import"
)


# ---- shared helpers -----------------------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def time_runs(fn, runs: int) -> tuple[float, list[float]]:
    """(warm-up seconds, timed seconds per run); fn(i) must block until its result is ready."""
    t0 = time.perf_counter()
    fn(0)
    warm = time.perf_counter() - t0
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - t0)
    return warm, times


def rl_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The RL batch both jaxgrm and torch train on: random tokens, one segment per row, loss on
    the second half; old log-probs near log(1/V) (the random model's), standard-normal advantages.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, seq)).astype(np.int32)
    seg = np.ones((batch, seq), np.int32)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq // 2 :] = True
    old = (-np.log(vocab) + 0.1 * rng.standard_normal((batch, seq))).astype(np.float32)
    adv = rng.standard_normal((batch, seq)).astype(np.float32)
    return dict(
        tokens_BT=tokens, segment_ids_BT=seg, loss_mask_BT=loss_mask, old_logp_BT=old, adv_BT=adv
    )


# ---- workers: each prints one JSON line ---------------------------------------------------------
def worker_build(args) -> dict:
    import torch
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512,
        tie_word_embeddings=True, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(args.ckpt)
    return dict(files=sorted(os.listdir(args.ckpt)))


def _matmul_dtype(args) -> str | None:
    """jaxgrm's `matmul_dtype` for a worker's `--dtype`: None (float32 throughout) or bfloat16."""
    return None if args.dtype == "float32" else args.dtype


def _jax_info() -> dict:
    import jax

    import jaxgrm

    return dict(
        device=str(jax.devices()[0]), n_devices=jax.device_count(), host_malloc=jaxgrm.HOST_MALLOC
    )


def worker_ours_sample(args) -> dict:
    import jax
    from flax import nnx

    from jaxgrm.model.hf import load_hf_checkpoint
    from jaxgrm.sampling import Sampler, SamplingConfig

    model = load_hf_checkpoint(args.ckpt, matmul_dtype=_matmul_dtype(args))
    sampler = Sampler(
        model,
        SamplingConfig(
            max_new_tokens=NEW_TOKENS, top_k=TOP_K, temperature=1.0, prompt_buckets=(PROMPT_LEN,)
        ),
    )
    params = nnx.state(model)
    prompts = np.random.default_rng(0).integers(1, VOCAB, (args.batch, PROMPT_LEN)).tolist()

    def run(seed):
        out = sampler(params, prompts, jax.random.key(seed))
        jax.block_until_ready(out.tokens_BM)
        assert int(out.mask_BM.sum()) == args.batch * NEW_TOKENS

    warm, times = time_runs(run, args.runs)
    med = statistics.median(times)
    return dict(
        tokens_per_s=args.batch * NEW_TOKENS / med, step_s=med, compile_s=warm - med,
        times_s=times, num_compiles=sampler.num_compiles, peak_rss_mb=peak_rss_mb(),
        dtype=args.dtype, matmul_dtype=_matmul_dtype(args), **_jax_info(),
    )  # fmt: skip


def _torch_setup():
    import torch

    torch.set_num_threads(TORCH_THREADS)
    return torch


def worker_hf_sample(args) -> dict:
    torch = _torch_setup()
    import transformers

    dtype = getattr(torch, args.dtype)
    model = transformers.Qwen2ForCausalLM.from_pretrained(args.ckpt, dtype=dtype).eval()
    prompts = np.random.default_rng(0).integers(1, VOCAB, (args.batch, PROMPT_LEN))
    prompts = torch.from_numpy(prompts)
    attention = torch.ones_like(prompts)

    def run(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                prompts, attention_mask=attention, do_sample=True, top_k=TOP_K, top_p=1.0,
                temperature=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        assert out.shape == (args.batch, PROMPT_LEN + NEW_TOKENS)

    warm, times = time_runs(run, args.runs)
    med = statistics.median(times)
    return dict(
        tokens_per_s=args.batch * NEW_TOKENS / med, step_s=med, warmup_s=warm, times_s=times,
        threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb(), dtype=args.dtype,
    )  # fmt: skip


def _ours_train_setup(model, batch_np):
    """(compiled step, state, device batch, compile seconds, XLA cost analysis or None)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxgrm.rl.losses import PolicyLossConfig
    from jaxgrm.train import OptimConfig, PolicyGradient, TrainState, jit_train_step, make_optimizer

    graphdef, params = nnx.split(model)
    tx = make_optimizer(OptimConfig(learning_rate=LEARNING_RATE, warmup_steps=0, total_steps=1000))
    state = TrainState.create(params, tx, seed=0)
    objective = PolicyGradient(PolicyLossConfig(clip_low=CLIP, clip_high=CLIP))
    step = jit_train_step(graphdef, objective, tx)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else None
        cost = {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed")}
    except Exception as e:  # cost analysis is best effort
        cost = dict(error=repr(e))
    return compiled, state, batch, compile_s, cost, (graphdef, objective)


def _time_ours_train(compiled, state, batch, runs):
    import jax

    holder = dict(state=state)
    losses = []

    def run(_):
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
        losses.append(float(metrics["loss"]))

    warm, times = time_runs(run, runs)
    return warm, times, losses, holder["state"]


def worker_ours_train(args) -> dict:
    from jaxgrm.model.hf import load_hf_checkpoint

    model = load_hf_checkpoint(args.ckpt, matmul_dtype=_matmul_dtype(args))
    batch_np = rl_batch(args.batch, args.seq, model.cfg.vocab_size)
    compiled, state, batch, compile_s, cost, _ = _ours_train_setup(model, batch_np)
    warm, times, losses, _ = _time_ours_train(compiled, state, batch, args.runs)
    med = statistics.median(times)
    return dict(
        tokens_per_s=args.batch * args.seq / med, step_s=med, compile_s=compile_s,
        first_call_s=warm, times_s=times, first_loss=losses[0], losses=losses,
        xla_cost=cost, peak_rss_mb=peak_rss_mb(), matmul_dtype=_matmul_dtype(args),
        **_jax_info(),
    )  # fmt: skip


def worker_torch_train(args) -> dict:
    host_malloc = None
    if os.environ.get(HOST_MALLOC_ENV) == "on":
        # The same glibc settings jaxgrm applies to itself (jaxgrm.hostmem), for a like-for-like
        # row; importing jaxgrm applies them before torch allocates anything.
        import jaxgrm

        host_malloc = jaxgrm.HOST_MALLOC
    torch = _torch_setup()
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    model.train()
    b = {k: torch.from_numpy(v) for k, v in rl_batch(args.batch, args.seq, VOCAB).items()}
    tokens = b["tokens_BT"].long()
    # jaxgrm's target mask: loss tokens that have a predecessor in their own segment.
    seg = b["segment_ids_BT"]
    same = torch.nn.functional.pad(seg[:, 1:] == seg[:, :-1], (1, 0))
    mask = (b["loss_mask_BT"] & same & (seg != 0)).float()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)],
        lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    losses = []

    def run(_):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        logp = logp.gather(-1, tokens[:, 1:, None])[..., 0]
        logp = torch.nn.functional.pad(logp, (1, 0))
        ratio = torch.exp(logp - b["old_logp_BT"])
        adv = b["adv_BT"]
        surrogate = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
        loss = (surrogate * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))

    warm, times = time_runs(run, args.runs)
    med = statistics.median(times)
    return dict(
        tokens_per_s=args.batch * args.seq / med, step_s=med, warmup_s=warm, times_s=times,
        first_loss=losses[0], losses=losses, threads=torch.get_num_threads(),
        peak_rss_mb=peak_rss_mb(), host_malloc=host_malloc,
    )  # fmt: skip


# ---- FLOPs ------------------------------------------------------------------------------------
def analytic_flops(cfg, batch: int, seq: int) -> dict:
    """FLOPs of one train step, matmuls only (norms, softmax, RoPE, AdamW are O(tokens * D) or
    O(params) and ignored):

        P_layer  = D*N*H + 2*D*K*H + N*H*D + 3*D*F      (q, k, v, o, gate, up, down)
        forward  = 2*B*T*(L*P_layer + D*V)              (projections + vocab projection)
                 + L * 4*B*T^2*N*H                      (q k^T and p v, full T x T as computed)
        backward = 2 * forward;  step = 3 * forward
    """
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    layers, v, bt = cfg.n_layers, cfg.vocab_size, batch * seq
    p_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    proj = 2 * bt * (layers * p_layer + d * v)
    attn = layers * 4 * batch * seq * seq * n * h
    forward = proj + attn
    return dict(
        formula="3 * (2*B*T*(L*(D*N*H + 2*D*K*H + N*H*D + 3*D*F) + D*V) + L*4*B*T^2*N*H)",
        matmul_params_per_token=layers * p_layer + d * v, forward=forward,
        forward_projections=proj, forward_attention=attn, backward=2 * forward, step=3 * forward,
    )  # fmt: skip


def step_matmuls(cfg, batch: int, seq: int) -> list[dict]:
    """Every matmul of the train step as (count, batch dims, m, k, n) of its forward form.

    Each appears three times in the step: forward y = x W, input gradient dx = dy W^T and weight
    gradient dW = x^T dy, each 2*b*m*k*n FLOPs; `matmul_throughput` measures all three forms."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    layers, m, r = cfg.n_layers, batch * seq, n // k
    return [
        dict(name="q [BT,D]x[D,NH]", count=layers, b=1, m=m, k=d, n=n * h),
        dict(name="k,v [BT,D]x[D,KH]", count=2 * layers, b=1, m=m, k=d, n=k * h),
        dict(name="o [BT,NH]x[NH,D]", count=layers, b=1, m=m, k=n * h, n=d),
        dict(name="gate,up [BT,D]x[D,F]", count=2 * layers, b=1, m=m, k=d, n=f),
        dict(name="down [BT,F]x[F,D]", count=layers, b=1, m=m, k=f, n=d),
        dict(name="vocab [BT,D]x[D,V]", count=1, b=1, m=m, k=d, n=cfg.vocab_size),
        dict(name="scores [BK: TR,H]x[H,T]", count=layers, b=batch * k, m=seq * r, k=h, n=seq),
        dict(name="p.v [BK: TR,T]x[T,H]", count=layers, b=batch * k, m=seq * r, k=seq, n=h),
    ]


def _dot_forms(b: int, m: int, k: int, n: int):
    """(form, lhs shape, rhs shape, dimension numbers) for y = x W, dx = dy W^T, dW = x^T dy."""
    bd = ((0,), (0,)) if b > 1 else ((), ())
    pre = (b,) if b > 1 else ()
    o = len(pre)
    return [
        ("fwd", pre + (m, k), pre + (k, n), (((o + 1,), (o,)), bd)),
        ("dx", pre + (m, n), pre + (k, n), (((o + 1,), (o + 1,)), bd)),
        ("dw", pre + (m, k), pre + (m, n), (((o,), (o,)), bd)),
    ]


def _time_jitted(fn, arrays, runs: int, min_time: float = 0.3) -> float:
    """Median seconds per call after one warm-up: at least `runs` calls and `min_time` seconds."""
    import jax

    jax.block_until_ready(fn(*arrays))
    times, start = [], time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*arrays))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_throughput(b: int, m: int, k: int, n: int, runs: int) -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    key = jax.random.key(0)
    for form, ls, rs, dims in _dot_forms(b, m, k, n):
        k1, k2, key = jax.random.split(key, 3)
        x = jax.random.normal(k1, ls, jnp.float32)
        y = jax.random.normal(k2, rs, jnp.float32)
        fn = jax.jit(lambda a, c, dims=dims: jax.lax.dot_general(a, c, dims))
        sec = _time_jitted(fn, (x, y), runs)
        out[form] = dict(seconds=sec, flops_per_s=2 * b * m * k * n / sec)
        del x, y
    return out


def worker_flops(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgrm.model import ModelConfig, create_model

    cfg = ModelConfig.preset(args.preset)
    if args.seq > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=args.seq)
    analytic = analytic_flops(cfg, args.batch, args.seq)
    model = create_model(cfg, seed=0)
    batch_np = rl_batch(args.batch, args.seq, cfg.vocab_size)
    compiled, state, batch, compile_s, cost, (graphdef, objective) = _ours_train_setup(
        model, batch_np
    )
    warm, times, losses, state = _time_ours_train(compiled, state, batch, args.runs)
    step_s = statistics.median(times)
    achieved = analytic["step"] / step_s

    # Where the step's time goes: forward only, forward + backward, full step (with AdamW).
    def loss_fn(params, batch):
        (total, den), _ = objective(nnx.merge(graphdef, params), batch)
        return total / den

    params = state.params
    breakdown = {}
    for name, fn in (("forward", loss_fn), ("forward_backward", jax.grad(loss_fn))):
        t0 = time.perf_counter()
        fn_c = jax.jit(fn).lower(params, batch).compile()
        c_s = time.perf_counter() - t0
        secs = _time_jitted(fn_c, (params, batch), args.runs, 0.0)
        breakdown[name] = dict(seconds=secs, compile_s=c_s)
    breakdown["train_step"] = dict(seconds=step_s, compile_s=compile_s)
    del params, state

    shapes, matmul_time, matmul_flops = [], 0.0, 0
    for mm in step_matmuls(cfg, args.batch, args.seq):
        forms = matmul_throughput(mm["b"], mm["m"], mm["k"], mm["n"], args.runs)
        flops_one = 2 * mm["b"] * mm["m"] * mm["k"] * mm["n"]
        secs = sum(mm["count"] * f["seconds"] for f in forms.values())
        matmul_time += secs
        matmul_flops += 3 * mm["count"] * flops_one
        shapes.append(dict(mm, flops_each_form=flops_one, forms=forms, total_seconds=secs))
    for s in shapes:
        s["flop_share"] = 3 * s["count"] * s["flops_each_form"] / matmul_flops
    weighted = matmul_flops / matmul_time
    ref = matmul_throughput(1, 2048, 2048, 2048, args.runs)["fwd"]["flops_per_s"]
    cost_flops = cost.get("flops") if isinstance(cost, dict) else None
    return dict(
        preset=args.preset, batch=args.batch, seq=args.seq, runs=args.runs,
        analytic=analytic, xla_cost=cost, matmul_flops_listed=matmul_flops,
        step_s=step_s, step_times_s=times, compile_s=compile_s, first_call_s=warm,
        tokens_per_s=args.batch * args.seq / step_s, achieved_flops_per_s=achieved,
        achieved_xla_flops_per_s=(cost_flops / step_s) if cost_flops else None,
        weighted_matmul_flops_per_s=weighted, matmul_only_step_s=matmul_time,
        ref_2048_flops_per_s=ref, fraction_of_weighted_matmul=achieved / weighted,
        fraction_of_2048_matmul=achieved / ref, shapes=shapes, breakdown=breakdown,
        first_loss=losses[0], num_params=cfg.num_params(), peak_rss_mb=peak_rss_mb(),
        **_jax_info(), jnp_default_dtype=str(jnp.zeros(()).dtype),
    )  # fmt: skip


WORKERS = {
    "build": worker_build,
    "ours-sample": worker_ours_sample,
    "hf-sample": worker_hf_sample,
    "ours-train": worker_ours_train,
    "torch-train": worker_torch_train,
    "flops": worker_flops,
}


# ---- parent -------------------------------------------------------------------------------------
def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_cmd(cmd: list[str], label: str, timeout: float, env: dict | None = None) -> dict:
    """Run one measurement subprocess (with `env` added to the environment); its JSON line, or
    an `error` entry."""
    print(f"[perf] {label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    wall = time.perf_counter() - t0
    result = _last_json(proc.stdout) if proc.returncode == 0 else None
    if result is None:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        print(f"[perf] {label} FAILED (rc {proc.returncode})", file=sys.stderr, flush=True)
        return dict(error=f"rc {proc.returncode}", tail=tail)
    result["worker_wall_s"] = wall
    shown = {k: result[k] for k in ("tokens_per_s", "peak_rss_mb") if k in result}
    print(f"[perf] {label}: {shown}", file=sys.stderr, flush=True)
    return result


def worker_cmd(name: str, args, **kw) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench.perf",
        "--worker",
        name,
        "--runs",
        str(args.runs),
    ]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def machine_facts() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        cpu_model=cpu, cores=os.cpu_count(),
        affinity_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        machine=platform.machine(), python=platform.python_version(),
        load_avg=os.getloadavg(), torch_threads=TORCH_THREADS,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        **{p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")},
    )  # fmt: skip


def merge_rounds(results: list[dict], tokens: int) -> dict:
    """One system's sampling results from several rounds as one: tokens/s from the median of
    all timed runs of all rounds, peak memory the largest, the first round's other fields, and
    each round's own tokens/s under `rounds_tokens_per_s`. A round that failed is kept under
    `failed_rounds`; all failing gives the first failure."""
    ok = [r for r in results if isinstance(r, dict) and "error" not in r]
    if not ok:
        return results[0]
    times = [t for r in ok for t in (r.get("times_s") or r.get("runs_s") or [])]
    merged = dict(ok[0])
    med = statistics.median(times)
    merged.update(
        tokens_per_s=tokens / med, step_s=med, times_s=times,
        peak_rss_mb=max(r.get("peak_rss_mb") or 0 for r in ok),
        rounds_tokens_per_s=[r.get("tokens_per_s") for r in ok],
    )  # fmt: skip
    merged.pop("runs_s", None)
    merged.pop("median_s", None)
    if len(ok) < len(results):
        merged["failed_rounds"] = [r for r in results if r not in ok]
    return merged


def _ratio(a, b):
    return a / b if a and b else None


def _fmt(x, spec=",.0f", empty="–"):
    return empty if x is None else format(x, spec)


def _get(d, key):
    return d.get(key) if isinstance(d, dict) else None


def _span(ratios) -> str:
    vals = [x for x in ratios or [] if x is not None]
    return f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else ""


def print_sample_table(rows):
    print("\n### Sampling (64 prompt + 64 new tokens, top-k 50), tokens/s\n")
    print("Medians over all rounds' timed runs; in brackets, the range of the per-round ratios.\n")
    print(
        "| dtype | batch | jaxgrm | transformers | tunix | ours/transformers | ours/tunix "
        "| jaxgrm compile s | tunix compile s | peak MB jaxgrm / transformers / tunix |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, h, t = r["jaxgrm"], r.get("transformers"), r.get("tunix")
        peaks = " / ".join(_fmt(_get(x, "peak_rss_mb")) for x in (o, h, t))
        vs_h = _fmt(r["ours_over_transformers"], ".2f") + _span(
            r.get("ours_over_transformers_per_round")
        )
        vs_t = _fmt(r["ours_over_tunix"], ".2f") + _span(r.get("ours_over_tunix_per_round"))
        print(
            f"| {r.get('dtype', 'float32')} | {r['batch']} | {_fmt(_get(o, 'tokens_per_s'))} "
            f"| {_fmt(_get(h, 'tokens_per_s'))} "
            f"| {_fmt(_get(t, 'tokens_per_s'))} | {vs_h} | {vs_t} "
            f"| {_fmt(_get(o, 'compile_s'), '.1f')} | {_fmt(_get(t, 'compile_s'), '.1f')} "
            f"| {peaks} |"
        )


def print_train_table(train):
    b, t = train["batch"], train["seq"]
    print(f"\n### RL train step (GRPO clipped, fwd + bwd + AdamW), {b} x {t} tokens\n")
    print("| system | tokens/s | step s | compile s | peak MB | ours / system |")
    print("|---|---:|---:|---:|---:|---:|")
    ours = _get(train.get("jaxgrm"), "tokens_per_s")
    names = ("jaxgrm", "jaxgrm_bf16_matmul", "jaxgrm_glibc_default_malloc", "torch")
    for name in (*names, "torch_jaxgrm_malloc", "tunix", "tunix_jaxgrm_malloc"):
        r = train.get(name)
        if r is None:
            continue
        tps = _get(r, "tokens_per_s")
        vs = "–" if name == "jaxgrm" else _fmt(_ratio(ours, tps), ".2f")
        print(
            f"| {name} | {_fmt(tps)} | {_fmt(_get(r, 'step_s') or _get(r, 'median_s'), '.3f')} "
            f"| {_fmt(_get(r, 'compile_s'), '.1f')} | {_fmt(_get(r, 'peak_rss_mb'))} "
            f"| {vs} |"
        )
    o, tr = train.get("jaxgrm"), train.get("torch")
    if _get(o, "first_loss") is not None and _get(tr, "first_loss") is not None:
        print(f"\nloss before the first update: jaxgrm {o['first_loss']:.6f}, "
              f"torch {tr['first_loss']:.6f}")  # fmt: skip


def print_flops(f):
    if "error" in f:
        print(f"\n### FLOP/s: failed ({f['error']})")
        return
    a = f["analytic"]
    print(f"\n### Achieved FLOP/s: jaxgrm train step, preset {f['preset']}, "
          f"batch {f['batch']} x seq {f['seq']}\n")  # fmt: skip
    print(f"- FLOPs per step (analytic, {a['formula']}): {a['step'] / 1e9:,.2f} GFLOP "
          f"(forward {a['forward'] / 1e9:,.2f}: projections {a['forward_projections'] / 1e9:,.2f},"
          f" attention {a['forward_attention'] / 1e9:,.2f})")  # fmt: skip
    xla = _get(f["xla_cost"], "flops")
    print(f"- FLOPs per step (XLA cost analysis): {_fmt(xla and xla / 1e9, ',.2f')} GFLOP")
    print(f"- step {f['step_s']:.3f} s (compile {f['compile_s']:.1f} s), "
          f"{f['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    bd = f["breakdown"]
    print(f"- forward {bd['forward']['seconds']:.3f} s, forward+backward "
          f"{bd['forward_backward']['seconds']:.3f} s, full step {f['step_s']:.3f} s (so clip + "
          f"AdamW + skip-guard ~{f['step_s'] - bd['forward_backward']['seconds']:.3f} s); the "
          f"step's matmuls alone at measured speed: {f['matmul_only_step_s']:.3f} s")  # fmt: skip
    print(f"- achieved: {f['achieved_flops_per_s'] / 1e9:,.2f} GFLOP/s analytic"
          + (f", {f['achieved_xla_flops_per_s'] / 1e9:,.2f} GFLOP/s by XLA's count"
             if f.get("achieved_xla_flops_per_s") else ""))  # fmt: skip
    print(f"- jitted fp32 matmul on the step's shapes (FLOP-weighted): "
          f"{f['weighted_matmul_flops_per_s'] / 1e9:,.2f} GFLOP/s; 2048^3: "
          f"{f['ref_2048_flops_per_s'] / 1e9:,.2f} GFLOP/s")  # fmt: skip
    print(f"- **fraction of shape-weighted matmul throughput: "
          f"{f['fraction_of_weighted_matmul']:.1%}; of 2048^3 matmul: "
          f"{f['fraction_of_2048_matmul']:.1%}**")  # fmt: skip
    print("\n| matmul | count | share | fwd GFLOP/s | dx GFLOP/s | dw GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in f["shapes"]:
        g = [s["forms"][k]["flops_per_s"] / 1e9 for k in ("fwd", "dx", "dw")]
        print(f"| {s['name']} | {s['count']} | {s['flop_share']:.1%} | "
              f"{g[0]:,.1f} | {g[1]:,.1f} | {g[2]:,.1f} |")  # fmt: skip
    print(f"\nflops worker peak RSS {f['peak_rss_mb']:,.0f} MB")


def tunix_status(args) -> str | None:
    """None when tunix can run, else why not."""
    if args.skip_tunix:
        return "skipped (--skip-tunix)"
    if not (os.path.isfile(args.tunix_python) and os.access(args.tunix_python, os.X_OK)):
        return f"skipped: tunix interpreter {args.tunix_python} not found"
    if not TUNIX_SIDE.is_file():
        return f"skipped: {TUNIX_SIDE} not found"
    return None


def main_parent(args):
    tasks = [args.only] if args.only else ["sample", "train", "flops"]
    results: dict = dict(
        meta=machine_facts(), notes=[MEMORY_NOTE], args=vars(args),
        config=dict(vocab=VOCAB, hidden=256, layers=4, heads=4, kv_heads=2, mlp=1024,
                    tied=True, checkpoint_dtype="float32", sample_dtypes=args.sample_dtypes),
    )  # fmt: skip
    load, cores = results["meta"]["load_avg"][0], results["meta"]["cores"] or 1
    if load > 0.5 * cores:
        results["notes"].append(
            f"machine busy at start: 1-minute load average {load:.1f} on {cores} cores; "
            "timings may be unreliable"
        )
    tunix_note = tunix_status(args)
    if tunix_note:
        results["notes"].append(f"tunix {tunix_note}")
        print(f"[perf] tunix {tunix_note}", file=sys.stderr, flush=True)

    def tunix(task, jaxgrm_malloc=False, **kw):
        cmd = [args.tunix_python, str(TUNIX_SIDE), "--ckpt", ckpt, "--task", task]
        for k, v in dict(kw, runs=args.runs).items():
            cmd += [f"--{k}", str(v)]
        cmd += ["--jaxgrm-malloc"] if jaxgrm_malloc else []
        return run_cmd(cmd, f"tunix {task} {kw}", args.worker_timeout)

    with tempfile.TemporaryDirectory(prefix="perf_ckpt_") as ckpt:
        if "sample" in tasks or "train" in tasks:
            built = run_cmd(worker_cmd("build", args, ckpt=ckpt), "build", args.worker_timeout)
            if "error" in built:
                raise SystemExit(f"could not build the checkpoint: {built}")

        if "sample" in tasks:
            systems = {
                "jaxgrm": lambda batch, dtype: run_cmd(
                    worker_cmd("ours-sample", args, ckpt=ckpt, batch=batch, dtype=dtype),
                    f"jaxgrm sample b={batch} {dtype}", args.worker_timeout,
                ),
                "transformers": lambda batch, dtype: run_cmd(
                    worker_cmd("hf-sample", args, ckpt=ckpt, batch=batch, dtype=dtype),
                    f"transformers sample b={batch} {dtype}", args.worker_timeout,
                ),
                "tunix": lambda batch, dtype: tunix("sample", batch=batch, dtype=dtype),
            }  # fmt: skip
            if args.skip_torch:
                del systems["transformers"]
            if tunix_note:
                del systems["tunix"]
            rows = []
            for dtype, batch in ((d, b) for d in args.sample_dtypes for b in args.batches):
                # Rounds: every system once per round, the order rotated, so a burst of load
                # from elsewhere on a shared machine falls on all of them alike.
                per_round: dict[str, list] = {name: [] for name in systems}
                names = list(systems)
                for r in range(args.sample_rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        per_round[name].append(systems[name](batch, dtype))
                row = dict(dtype=dtype, batch=batch)
                for name, results_ in per_round.items():
                    row[name] = merge_rounds(results_, batch * NEW_TOKENS)
                ours = _get(row["jaxgrm"], "tokens_per_s")
                for name in ("transformers", "tunix"):
                    row[f"ours_over_{name}"] = _ratio(ours, _get(row.get(name), "tokens_per_s"))
                    other = per_round.get(name) or [None] * args.sample_rounds
                    row[f"ours_over_{name}_per_round"] = [
                        _ratio(_get(a, "tokens_per_s"), _get(b_, "tokens_per_s"))
                        for a, b_ in zip(per_round["jaxgrm"], other, strict=True)
                    ]
                rows.append(row)
            results["sample"] = rows

        if "train" in tasks:
            b, t = args.train_batch, args.train_seq
            train = dict(batch=b, seq=t, tokens_per_step=b * t)
            # Besides each system as it runs by default, jaxgrm with glibc's malloc defaults and
            # torch with jaxgrm's malloc settings (jaxgrm.hostmem), so the table shows what
            # those settings are worth to each.
            for name, worker, malloc, dtype in (
                ("jaxgrm", "ours-train", None, "float32"),
                ("jaxgrm_bf16_matmul", "ours-train", None, "bfloat16"),
                ("jaxgrm_glibc_default_malloc", "ours-train", "off", "float32"),
                ("torch", "torch-train", None, "float32"),
                ("torch_jaxgrm_malloc", "torch-train", "on", "float32"),
            ):
                if worker == "torch-train" and args.skip_torch:
                    continue
                train[name] = run_cmd(
                    worker_cmd(worker, args, ckpt=ckpt, batch=b, seq=t, dtype=dtype),
                    f"{name} train", args.worker_timeout,
                    env={HOST_MALLOC_ENV: malloc} if malloc else None,
                )  # fmt: skip
            if not tunix_note:
                train["tunix"] = tunix("train", batch=b, seq=t)
                train["tunix_jaxgrm_malloc"] = tunix("train", jaxgrm_malloc=True, batch=b, seq=t)
            ours = _get(train["jaxgrm"], "tokens_per_s")
            for name in ("torch", "torch_jaxgrm_malloc", "tunix", "tunix_jaxgrm_malloc"):
                train[f"ours_over_{name}"] = _ratio(ours, _get(train.get(name), "tokens_per_s"))
            results["train"] = train

    if "flops" in tasks:
        results["flops"] = run_cmd(
            worker_cmd(
                "flops", args, preset=args.flops_preset, batch=args.flops_batch,
                seq=args.flops_seq,
            ),
            "flops", args.worker_timeout,
        )  # fmt: skip

    print(f"\n## perf: {results['meta']['cpu_model']}, {results['meta']['cores']} cores, "
          f"runs={args.runs} (median after warm-up)")  # fmt: skip
    for note in results["notes"][1:]:
        print(f"\n_{note}_")
    if "sample" in results:
        print_sample_table(results["sample"])
    if "train" in results:
        print_train_table(results["train"])
    if "flops" in results:
        print_flops(results["flops"])
    print(f"\n_{MEMORY_NOTE}._")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument(
        "--sample-rounds", type=int, default=3,
        help="sampling: run every system this many times, interleaved; medians over all runs",
    )  # fmt: skip
    parser.add_argument(
        "--sample-dtypes", nargs="+", choices=["float32", "bfloat16"],
        default=["float32", "bfloat16"], help="sampling: one table section per dtype",
    )  # fmt: skip
    parser.add_argument("--only", choices=["sample", "train", "flops"])
    parser.add_argument("--skip-tunix", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--tunix-python", default=os.environ.get("TUNIX_PYTHON", DEFAULT_TUNIX_PYTHON)
    )
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--flops-preset", default="small")
    parser.add_argument("--flops-batch", type=int, default=8)
    parser.add_argument("--flops-seq", type=int, default=512)
    parser.add_argument("--worker-timeout", type=float, default=3600.0)
    parser.add_argument("--out", default="experiments/results/perf/perf.json")
    # Worker mode (one measurement per subprocess).
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.sample_rounds < 1:
        parser.error("--sample-rounds must be >= 1")
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args), default=str), flush=True)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
