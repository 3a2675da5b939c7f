"""google-tunix side of the jaxgrm / tunix / transformers benchmark: a command-line worker.

Runs under tunix's own virtual environment (it must not import jaxgrm):

    /tmp/tunixvenv/bin/python experiments/bench/tunix_side.py --ckpt DIR --task sample --batch B \
        [--prompt-len 64 --new-tokens 64 --top-k 50 --runs 3 --dtype float32|bfloat16]
    /tmp/tunixvenv/bin/python experiments/bench/tunix_side.py --ckpt DIR --task train \
        [--batch 32 --seq 128 --runs 3]
    /tmp/tunixvenv/bin/python experiments/bench/tunix_side.py --ckpt DIR --task logits \
        --ids IDS.npy --out LOGITS.npy

The HF (transformers-written) safetensors checkpoint in DIR is loaded with tunix's own Qwen2
loader (`tunix.models.qwen2.params.create_model_from_safe_tensors`), the tunix `ModelConfig`
being built from DIR/config.json, with weights and compute in `--dtype` (tunix's `dtype` and
`param_dtype`; float32 by default, bfloat16 for the benchmark's bfloat16 rows).

- sample: `tunix.generate.sampler.Sampler` (its native JAX sampler with a KV cache) samples
  exactly `--new-tokens` tokens after `--prompt-len` random prompt tokens per row, with top-k
  `--top-k` at temperature 1 (tunix's "top_p" mode with top_p=1.0, which keeps all of the top k).
  tunix's sampler takes strings, so a tokenizer adapter turns a string of space-separated ids
  into those ids. The pad id is `vocab` and the eos id `vocab + 1`: neither can ever be sampled,
  so no row stops early and no generated token is mistaken for padding. One warm-up call, then
  `--runs` timed calls; tokens/s = batch * new_tokens / median seconds.
- train: one GRPO step as tunix's GRPO learner runs it: tunix's registered "grpo" policy loss
  (`function_registry.get_policy_loss_fn("grpo")`, beta 0, so no KL term) over per-token
  advantages, old per-token log-probs and a completion mask, inside tunix's RL actor trainer
  (`tunix.rl.trainer.Trainer`, i.e. PeftTrainer's `nnx.value_and_grad` + `nnx.Optimizer`
  update under `nnx.jit`, got from `jit_train_and_eval_step`), with optax AdamW. Each row has
  seq // 2 prompt tokens and seq - seq // 2 completion tokens (random ids, fixed seed).
  tokens/s = batch * seq / median seconds.
- logits: full-sequence logits of the token ids in `--ids` (an int array [B, L] in a .npy) with
  a causal mask, written to `--out`, for checking the loaded weights against transformers.

Prints one JSON line on stdout; logging goes to stderr. No XLA or thread settings are changed
(JAX CPU defaults), like the rest of the benchmark.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import logging
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.generate import utils as gen_utils
from tunix.models.qwen2 import model as qwen2_model
from tunix.models.qwen2 import params as qwen2_params
from tunix.rl import common as rl_common
from tunix.rl import function_registry
from tunix.rl import trainer as rl_trainer
from tunix.rl.grpo import grpo_learner
from tunix.sft import peft_trainer

log = logging.getLogger("tunix_side")


def model_config(ckpt: str, dtype=jnp.float32) -> tuple[qwen2_model.ModelConfig, dict]:
    with open(os.path.join(ckpt, "config.json")) as f:
        hf = json.load(f)
    rope = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
    heads = hf["num_attention_heads"]
    cfg = qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        rope_theta=rope_theta,
        norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
    )
    return cfg, hf


def load_model(ckpt: str, dtype=jnp.float32) -> qwen2_model.Qwen2:
    """The checkpoint in tunix's Qwen2, with weights and compute in `dtype` (tunix's own
    dtype / param_dtype)."""
    cfg, _ = model_config(ckpt, dtype)
    log.info("tunix ModelConfig: %s", cfg)
    return qwen2_params.create_model_from_safe_tensors(ckpt, cfg, mesh=None, dtype=dtype)


class IdTokenizer:
    """What tunix's TokenizerAdapter needs (encode/decode/bos_id/eos_id/pad_id) over raw ids.

    A "string" is the prompt's token ids separated by spaces. There is no bos token (tunix adds
    none when bos_id() is falsy); pad and eos are ids outside the vocabulary.
    """

    def __init__(self, vocab_size: int):
        self._pad = vocab_size
        self._eos = vocab_size + 1

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad


def time_calls(fn, runs: int) -> tuple[float, list[float]]:
    """(warm-up seconds, seconds of each timed call); fn(i) must block until its result is ready."""
    t0 = time.perf_counter()
    fn(0)
    warm = time.perf_counter() - t0
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - t0)
    return warm, times


def task_sample(args, model) -> tuple[dict, float, list[float]]:
    cfg = model.config
    tok = IdTokenizer(cfg.vocab_size)
    sampler = sampler_lib.Sampler(
        model,
        tok,
        sampler_lib.CacheConfig(
            cache_size=args.prompt_len + args.new_tokens,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
        ),
    )
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (args.batch, args.prompt_len))
    strings = [" ".join(map(str, row)) for row in prompts.tolist()]

    def run(seed: int):
        out = sampler(
            strings,
            max_generation_steps=args.new_tokens,
            max_prompt_length=args.prompt_len,
            eos_tokens=[tok.eos_id()],
            temperature=1.0,
            top_p=1.0,
            top_k=args.top_k,
            seed=seed,
        )
        # tunix returns host numpy arrays (it device_gets the token buffer), so this is complete.
        lengths = [len(t) for t in out.tokens]
        if lengths != [args.new_tokens] * args.batch:
            raise RuntimeError(f"expected {args.new_tokens} new tokens per row, got {lengths}")
        if any(int(np.max(t)) >= cfg.vocab_size for t in out.tokens):
            raise RuntimeError("sampled an id outside the vocabulary")

    warm, times = time_calls(run, args.runs)
    info = {
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "top_k": args.top_k,
        "temperature": 1.0,
        "tokens_per_call": args.batch * args.new_tokens,
        "notes": (
            "tunix.generate.sampler.Sampler, top_p mode with top_p=1.0 and top_k (i.e. plain "
            "top-k) at temperature 1; fixed length: pad id = vocab and eos id = vocab + 1 "
            "(never sampled), each row checked to hold exactly new_tokens tokens; prompts passed "
            "as space-separated id strings through a minimal tokenizer adapter; KV cache size "
            "= prompt_len + new_tokens; timing covers tunix's whole __call__ (host-side "
            "tokenize/pad, prefill jit, decode while_loop jit, device_get)."
        ),
    }
    return info, warm, times


def task_train(args, model) -> tuple[dict, float, list[float]]:
    cfg = model.config
    pad_id, eos_id = cfg.vocab_size, cfg.vocab_size + 1
    prompt_len = args.seq // 2
    comp_len = args.seq - prompt_len
    rng = np.random.default_rng(0)
    prompt_ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, prompt_len)), jnp.int32)
    completion_ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, comp_len)), jnp.int32)
    completion_mask = jnp.ones((args.batch, comp_len), jnp.int32)
    advantages = jnp.asarray(rng.standard_normal((args.batch, comp_len)), jnp.float32)

    algo = grpo_learner.GRPOConfig(num_generations=2, num_iterations=1, beta=0.0, epsilon=0.2)
    algo.temperature = 1.0  # GRPOLearner sets this from the rollout config
    policy_loss_fn = function_registry.get_policy_loss_fn(algo.policy_loss_fn)

    # Old log-probs: the initial policy's own (tunix's helper), nudged so the ratio is not 1.
    graphdef, state = nnx.split(model)
    logps = rl_common.compute_per_token_logps(
        graphdef,
        state,
        prompt_tokens=prompt_ids,
        completion_tokens=completion_ids,
        pad_id=pad_id,
        eos_id=eos_id,
        stop_gradient=True,
    )
    old_logps = logps + 0.1 * jnp.asarray(rng.standard_normal(logps.shape), jnp.float32)
    example = grpo_learner.TrainExample(
        prompt_ids=prompt_ids,
        prompt_mask=jnp.ones_like(prompt_ids),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=advantages,
        ref_per_token_logps=None,
        old_per_token_logps=old_logps,
    )

    trainer = rl_trainer.Trainer(
        model,
        optax.adamw(learning_rate=1e-6),
        peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=args.runs + 1),
        custom_checkpoint_metadata_fn=lambda: {},
    )
    # Same wiring as GRPOLearner.__init__.
    trainer.with_loss_fn(
        lambda model, train_example, algo_config: policy_loss_fn(
            model, train_example, algo_config=algo, pad_id=pad_id, eos_id=eos_id
        ),
        has_aux=True,
    )
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
    # Commit the fresh optimizer state and the batch to the device, as PeftTrainer's
    # _shard_optimizer does on a mesh (it skips an empty mesh): otherwise the first step sees
    # uncommitted arrays, the second committed ones, and nnx.jit compiles the step twice.
    device = jax.devices()[0]
    opt_state = nnx.state(trainer.optimizer, nnx.optimizer.OptState)
    nnx.update(trainer.optimizer, jax.device_put(opt_state, device))
    example = jax.device_put(example, device)
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    losses = []

    def run(_):
        loss, aux, grad_norm = train_step(example)
        jax.block_until_ready((loss, aux, grad_norm, nnx.state(trainer.model, nnx.Param)))
        losses.append(float(loss))

    warm, times = time_calls(run, args.runs)
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss {losses}")
    info = {
        "seq": args.seq,
        "prompt_len": prompt_len,
        "completion_len": comp_len,
        "tokens_per_call": args.batch * args.seq,
        "losses": losses,
        "notes": (
            "tunix.rl.trainer.Trainer (PeftTrainer) jitted train step (nnx.jit, donated "
            "optimizer; nnx.value_and_grad + nnx.Optimizer.update with optax.adamw lr 1e-6) on "
            "tunix's registered 'grpo' policy loss (GRPOConfig beta=0, epsilon=0.2, "
            "loss_agg_mode sequence-mean-token-mean, temperature 1), wired as GRPOLearner does; "
            "per-token advantages [B, completion]; completion mask all ones; old log-probs = "
            "initial policy's + N(0, 0.1) noise; the loss also computes tunix's entropy aux; "
            "optimizer state and batch committed to the device before the first step (as "
            "_shard_optimizer does on a mesh) so the step compiles once, not twice."
        ),
    }
    return info, warm, times


def task_logits(args, model) -> None:
    ids = jnp.asarray(np.load(args.ids), jnp.int32)
    batch, length = ids.shape
    mask = gen_utils.make_causal_attn_mask(jnp.ones((batch, length), jnp.bool_), length)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    logits, _ = model(ids, positions, None, mask)
    np.save(args.out, np.asarray(logits))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="HF Qwen2 checkpoint dir (safetensors)")
    p.add_argument("--task", required=True, choices=("sample", "train", "logits"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="tunix's dtype and param_dtype: weights and compute (default float32)",
    )
    p.add_argument("--ids", help="logits task: .npy of int token ids [B, L]")
    p.add_argument("--out", help="logits task: .npy to write float32 logits [B, L, V] to")
    p.add_argument(
        "--jaxgrm-malloc",
        action="store_true",
        help="apply jaxgrm.hostmem's glibc settings (one arena, no mmap, no trim) first",
    )
    args = p.parse_args(argv)
    if args.jaxgrm_malloc:
        # The three mallopt calls of jaxgrm.hostmem (this script cannot import jaxgrm), before
        # the first JAX computation starts XLA's threads. M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD.
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        if not all(mallopt(k, v) for k, v in ((-8, 1), (-4, 0), (-1, -1))):
            raise SystemExit("mallopt refused a setting")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)

    t0 = time.perf_counter()
    model = load_model(args.ckpt, jnp.dtype(args.dtype))
    load_s = time.perf_counter() - t0
    if args.task == "logits":
        if not (args.ids and args.out):
            p.error("--task logits needs --ids and --out")
        task_logits(args, model)
        return

    run_task = task_sample if args.task == "sample" else task_train
    info, warm, times = run_task(args, model)
    median = statistics.median(times)
    result = {
        "system": "tunix",
        "task": args.task,
        "batch": args.batch,
        **{k: v for k, v in info.items() if k not in ("tokens_per_call", "notes")},
        "warmup_s": warm,
        "runs_s": times,
        "median_s": median,
        "tokens_per_s": info["tokens_per_call"] / median,
        "compile_s": warm - median,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jaxgrm_malloc": args.jaxgrm_malloc,
        "dtype": args.dtype,
        "tunix_version": importlib.metadata.version("google-tunix"),
        "jax_version": jax.__version__,
        "flax_version": importlib.metadata.version("flax"),
        "backend": jax.default_backend(),
        "notes": info["notes"],
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
