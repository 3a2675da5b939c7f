"""Scoring latency and throughput: a reasoning teacher against a label-only student.

Both are random-weight bundles sharing one tokenizer (trained here on world text): the teacher
is the `small` preset writing a reasoning trace of up to `--max-new-tokens` tokens, the student
the `tiny` preset answering label-only. Random weights never stop early, so the teacher's numbers
are the full-trace worst case. For batch sizes 1 and 32 it times `GradeScorer` calls on world
validation prompts: p50/p99 latency per call and pairs/s, after one warm-up call (compile time
reported separately).

    python -m experiments.bench.score_latency [--calls 20] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from jaxgrm.bundle import load_bundle, save_bundle
from jaxgrm.data.world import WorldConfig, generate
from jaxgrm.model import ModelConfig, create_model
from jaxgrm.prompts import PromptConfig, TraceFormat, render_prompt
from jaxgrm.score import GradeScorer
from jaxgrm.traces import trace_tokenizer, world_traces


def measure(scorer: GradeScorer, prompts, batch: int, calls: int) -> dict:
    chunks = [prompts[(i * batch) % len(prompts) :][:batch] for i in range(calls + 1)]
    chunks = [c if len(c) == batch else prompts[:batch] for c in chunks]
    t0 = time.perf_counter()
    scorer(chunks[0], ["xhs5"] * batch)
    first = time.perf_counter() - t0
    times = []
    for c in chunks[1:]:
        t0 = time.perf_counter()
        scorer(c, ["xhs5"] * batch)
        times.append(time.perf_counter() - t0)
    return {
        "batch": batch,
        "p50_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * float(np.percentile(times, 99)),
        "pairs_per_s": batch * len(times) / sum(times),
        "compile_s": first - statistics.median(times),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", default="results/bench/score_latency.json")
    args = parser.parse_args()

    world = generate(WorldConfig.small())
    reasoning = PromptConfig(instructions=False, doc_budget=64)
    label_only = PromptConfig(format=TraceFormat.LABEL_ONLY, instructions=False, doc_budget=64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train = [r.to_example() for r in world_traces(world["train"][:2000], 0.15, prose=False)]
        tok = trace_tokenizer(train, reasoning, 1024, 2000, os.path.join(tmp, "tok.model"))
        systems = {
            "teacher (small, reasoning)": (ModelConfig.small(vocab_size=tok.vocab_size), reasoning),
            "student (tiny, label-only)": (ModelConfig.tiny(vocab_size=tok.vocab_size), label_only),
        }
        for name, (cfg, prompt) in systems.items():
            path = os.path.join(tmp, name.split()[0])
            save_bundle(create_model(cfg), tok, prompt, path, scale="xhs5")
            bundle = load_bundle(path)
            prompts = [render_prompt(ex, tok, prompt).ids for ex in world["validation"][:64]]
            for batch in (1, 32):
                scorer = GradeScorer(bundle, batch_size=batch, max_new_tokens=args.max_new_tokens)
                row = {"system": name, **measure(scorer, prompts, batch, args.calls)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| system | batch | p50 ms | p99 ms | pairs/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['system']} | {r['batch']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['pairs_per_s']:.1f} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
