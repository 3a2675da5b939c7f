"""Generated tokens per second: jaxgrm's sampler against transformers `generate` on the CPU.

Both run the same random Qwen2-architecture weights (vocab 4096, hidden 256, 4 layers, 4 heads,
2 kv heads, MLP 1024): transformers builds and saves them, jaxgrm imports them through its
safetensors loader. Each batch size samples exactly 64 new tokens after 64 prompt tokens with
top-k 50 (no stop tokens); the median of `--runs` timed runs after one warm-up run is reported,
and jaxgrm's compile time (the warm-up minus a timed run) separately. torch runs with 2 threads
and OMP_WAIT_POLICY=PASSIVE.

    python -m experiments.bench.sampler_vs_transformers [--batches 1 8 32] [--runs 3]

Prints a markdown table and writes it, with the raw timings, as JSON to `--out`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.bench.perf import time_runs  # noqa: E402
from jaxgrm.model.hf import load_hf_checkpoint  # noqa: E402
from jaxgrm.sampling import Sampler, SamplingConfig  # noqa: E402

PROMPT_LEN = 64
NEW_TOKENS = 64
TOP_K = 50


def build_checkpoint(path: str) -> transformers.PreTrainedModel:
    cfg = transformers.Qwen2Config(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512,
        tie_word_embeddings=True, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def bench_jax(model, batch: int, runs: int):
    sampler = Sampler(
        model,
        SamplingConfig(
            max_new_tokens=NEW_TOKENS, top_k=TOP_K, temperature=1.0, prompt_buckets=(PROMPT_LEN,)
        ),
    )
    params = nnx.state(model)
    prompts = np.random.default_rng(0).integers(1, 4096, (batch, PROMPT_LEN)).tolist()

    def run(seed):
        out = sampler(params, prompts, jax.random.key(seed))
        jax.block_until_ready(out.tokens_BM)
        assert int(out.mask_BM.sum()) == batch * NEW_TOKENS

    return time_runs(run, runs)


def bench_torch(model, batch: int, runs: int):
    prompts = torch.from_numpy(np.random.default_rng(0).integers(1, 4096, (batch, PROMPT_LEN)))
    attention = torch.ones_like(prompts)

    def run(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                prompts, attention_mask=attention, do_sample=True, top_k=TOP_K, top_p=1.0,
                temperature=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        assert out.shape == (batch, PROMPT_LEN + NEW_TOKENS)

    return time_runs(run, runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="results/bench/sampler_vs_transformers.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_checkpoint(tmp)
        jax_model = load_hf_checkpoint(tmp)

    rows = []
    for batch in args.batches:
        j_warm, j_times = bench_jax(jax_model, batch, args.runs)
        t_warm, t_times = bench_torch(hf_model, batch, args.runs)
        tokens = batch * NEW_TOKENS
        j_tps, t_tps = tokens / statistics.median(j_times), tokens / statistics.median(t_times)
        rows.append(
            dict(
                batch=batch, jaxgrm_tokens_per_s=j_tps, transformers_tokens_per_s=t_tps,
                ratio=j_tps / t_tps, jaxgrm_compile_s=j_warm - statistics.median(j_times),
                jaxgrm_times_s=j_times, transformers_times_s=t_times,
            )
        )  # fmt: skip
        print(
            f"batch {batch}: jaxgrm {j_tps:,.0f} tok/s, transformers {t_tps:,.0f} tok/s", flush=True
        )

    print("\n| batch | jaxgrm tok/s | transformers tok/s | ratio | jaxgrm compile s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['jaxgrm_tokens_per_s']:,.0f} | "
            f"{r['transformers_tokens_per_s']:,.0f} | {r['ratio']:.2f}x | "
            f"{r['jaxgrm_compile_s']:.1f} |"
        )
    meta = dict(
        jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
        machine=platform.machine(), cpus=os.cpu_count(), device=str(jax.devices()[0]),
    )  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
