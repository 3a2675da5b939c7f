"""The RL learner: GRPO (+ SAM) on a sharded, resumable train loop.

Each step: draw prompts -> G rollouts from the sampler with the current weights -> parse ->
rewards and step verdicts -> advantages -> `num_passes` passes over mini-batches of the rollout
(old log-probs from the sampler, ratio clipped) -> the new weights go to the sampler on the next
call, which does not recompile. A reference model is kept only when kl_coef > 0.

Resume is exact: the prompts of a step and the sampler key are pure functions of (seed, step),
so the checkpoint holds only the train state, the step and the RNG key. SIGTERM finishes the
current step, saves and exits.

Compilations are logged every step as cumulative counts, so metrics.jsonl shows when one happens.
`compiles/*` are XLA compilations, counted through `jax.monitoring` (one backend-compile event
per compilation; a jit cache hit records none) and attributed by function name and by phase:
`sampler` (prefill + decode of the rollout sampler), `eval` (the greedy validation sampler, a
separate instance), `train_step`, `ref_logp` (only with a reference policy) and `xla` (every
compilation in the process since the learner was built, eager ops included). `traces/*` count
the traces of the same functions with Python counters bumped while tracing. A retrace always
compiles, but a compile can reuse a trace: the first call with uncommitted initial weights and a
later one with the train step's (committed) outputs trace once and compile twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxgrm.data.schema import RelevanceExample
from jaxgrm.prompts import PromptConfig, render_prompt
from jaxgrm.rl.advantages import AdvantageConfig
from jaxgrm.rl.losses import PolicyLossConfig
from jaxgrm.rl.rollout import evaluate_policy, rollout, rollout_stats, training_batch
from jaxgrm.sampling import Sampler, SamplingConfig
from jaxgrm.tokenizer import Tokenizer
from jaxgrm.train.checkpoint import Checkpointer
from jaxgrm.train.loop import Preemption
from jaxgrm.train.mesh import shard_batch
from jaxgrm.train.metrics import MetricsWriter
from jaxgrm.train.objectives import PolicyGradient, token_logprobs
from jaxgrm.train.state import OptimConfig, TrainState, make_optimizer
from jaxgrm.train.step import jit_train_step

# jax records this duration event once per XLA compilation, with the jitted function's name as
# `fun_name` ("jit(train_step)"); see jax._src.dispatch.BACKEND_COMPILE_EVENT. A persistent-cache
# hit records it too; an in-memory jit cache hit does not.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_XLA_COMPILES: Counter[str] = Counter()  # process-wide, by fun_name
_LISTENING = [False]


def _count_xla_compile(event: str, duration_secs: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        _XLA_COMPILES[str(kwargs.get("fun_name", ""))] += 1


def xla_compiles() -> Counter[str]:
    """A snapshot of the XLA compilations in this process by function name, counted from the
    first call (which registers the jax.monitoring listener)."""
    if not _LISTENING[0]:
        jax.monitoring.register_event_duration_secs_listener(_count_xla_compile)
        _LISTENING[0] = True
    return Counter(_XLA_COMPILES)


def _compiles_of(since: Counter[str], names: Sequence[str]) -> int:
    """Compilations of the functions called `names` since the snapshot `since`."""
    now = xla_compiles()
    keys = {k for n in names for k in (n, f"jit({n})")}
    return sum(now[k] - since[k] for k in keys)


_SAMPLER_FNS = ("_prefill_impl", "_decode_impl")  # Sampler's jitted functions


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """prompts_per_step x group_size rollouts per step; each of `num_passes` passes splits them
    into `minibatches` optimizer steps (mu = num_passes in GRPO terms). The learning-rate
    schedule spans all optimizer updates, steps x num_passes x minibatches; `optim.total_steps`
    is set from them (whatever the config says)."""

    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_passes: int = 1
    minibatches: int = 1
    accum_steps: int = 1
    filter_zero_variance: bool = False
    advantage: AdvantageConfig = AdvantageConfig()
    loss: PolicyLossConfig = PolicyLossConfig()
    optim: OptimConfig = OptimConfig(learning_rate=1e-5, warmup_steps=0, total_steps=100)
    prompt: PromptConfig = PromptConfig()
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    eval_every: int = 10
    eval_examples: int = 512
    save_every: int = 10
    keep_checkpoints: int = 3
    sample_every: int = 10
    seed: int = 0

    def __post_init__(self):
        rows = self.prompts_per_step * self.group_size
        if rows % self.minibatches or (rows // self.minibatches) % self.accum_steps:
            raise ValueError(
                f"{rows} rollouts per step do not split into {self.minibatches} mini-batches "
                f"of {self.accum_steps} micro-batches"
            )
        if self.group_size < 2:
            raise ValueError("group-relative advantages need group_size >= 2")


class Learner:
    """Owns the train state, the sampler, the reference policy and the run directory."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        train: Sequence[RelevanceExample],
        validation: Sequence[RelevanceExample],
        cfg: RLConfig,
        workdir: str | os.PathLike,
        mesh=None,
    ):
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self._xla_at_start = xla_compiles()
        self._xla = Counter()  # compilations per counted function, attributed by phase
        self.train, self.validation = list(train), list(validation)[: cfg.eval_examples]
        self.workdir = os.fspath(workdir)
        self.graphdef, params = nnx.split(model)
        updates = cfg.steps * cfg.num_passes * cfg.minibatches
        self.tx = make_optimizer(dataclasses.replace(cfg.optim, total_steps=updates))
        self.state = TrainState.create(params, self.tx, seed=cfg.seed)
        if mesh is None:  # commit the state to its device now: the train step's outputs are
            # committed, and an uncommitted first input would compile every function twice
            self.state = jax.device_put(self.state, jax.devices()[0])
        shardings = jax.tree.map(lambda x: x.sharding, self.state) if mesh is not None else None
        self.step_fn = jit_train_step(
            self.graphdef, PolicyGradient(cfg.loss), self.tx, cfg.accum_steps, shardings
        )
        self.ref_params = None
        self._ref_logp_traces = [0]
        if cfg.loss.kl_coef > 0:  # the initial weights; the train state holds its own copy
            self.ref_params = params
            graphdef, traces = self.graphdef, self._ref_logp_traces

            def ref_logp(p, tok, seg):
                traces[0] += 1  # runs only while tracing
                return token_logprobs(nnx.merge(graphdef, p), tok, seg)

            self._ref_logp = jax.jit(ref_logp)
        stop = (tokenizer.eos_id, tokenizer.token_id("</answer>"))
        common = dict(
            max_new_tokens=cfg.max_new_tokens, stop_ids=stop, pad_id=tokenizer.pad_id,
            prompt_buckets=cfg.prompt_buckets,
        )  # fmt: skip
        self.sampler = Sampler(
            model,
            SamplingConfig(
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                num_samples=cfg.group_size, **common,
            ),
        )  # fmt: skip
        self.greedy = Sampler(model, SamplingConfig(temperature=0.0, num_samples=1, **common))
        self._prompt_cache: dict[int, list[int]] = {}
        self.val_prompts = [render_prompt(ex, tokenizer, cfg.prompt).ids for ex in self.validation]

    # -- data ---------------------------------------------------------------------------------
    def prompts_for_step(self, step: int) -> tuple[list[RelevanceExample], list[list[int]]]:
        """The prompts of `step`: a pure function of (seed, step), so resume needs no state."""
        rng = np.random.default_rng([self.cfg.seed, step])
        idx = rng.choice(len(self.train), self.cfg.prompts_per_step, replace=False)
        for i in idx:
            if i not in self._prompt_cache:
                ex = self.train[i]
                self._prompt_cache[i] = render_prompt(ex, self.tokenizer, self.cfg.prompt).ids
        return [self.train[i] for i in idx], [self._prompt_cache[i] for i in idx]

    # -- one step -----------------------------------------------------------------------------
    def rl_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        examples, prompts = self.prompts_for_step(step)
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        before = xla_compiles()
        r = rollout(self.sampler, self.state.params, self.tokenizer, examples, prompts, key)
        self._xla["sampler"] += _compiles_of(before, _SAMPLER_FNS)
        t_rollout = time.perf_counter() - t0
        batch, batch_stats = training_batch(
            r, cfg.group_size, cfg.advantage, cfg.filter_zero_variance
        )
        if self.ref_params is not None:
            before = xla_compiles()
            batch["ref_logp_BT"] = np.asarray(
                self._ref_logp(self.ref_params, batch["tokens_BT"], batch["segment_ids_BT"])
            )
            self._xla["ref_logp"] += _compiles_of(before, ["ref_logp"])
        t1 = time.perf_counter()
        before = xla_compiles()
        rows = batch["tokens_BT"].shape[0]
        per_mb = rows // cfg.minibatches
        train_metrics: list[dict] = []
        for p in range(cfg.num_passes):
            order = np.random.default_rng([cfg.seed, step, p, 1]).permutation(rows)
            for m in range(cfg.minibatches):
                sel = order[m * per_mb : (m + 1) * per_mb]
                mb = {k: v[sel] for k, v in batch.items()}
                if self.mesh is not None:
                    mb = shard_batch(mb, self.mesh)
                self.state, metrics = self.step_fn(self.state, mb)
                train_metrics.append(metrics)
        train_metrics = jax.device_get(train_metrics)
        self._xla["train_step"] += _compiles_of(before, ["train_step"])
        t_train = time.perf_counter() - t1
        out = rollout_stats(r) | batch_stats
        for k in train_metrics[0]:
            out[k] = float(np.mean([m[k] for m in train_metrics]))
        out["entropy"] = out.pop("neg_logp", float("nan"))
        out["accuracy"] = out["reward_mean"]
        out["rollout_s"], out["train_s"] = t_rollout, t_train
        out["tokens_per_s"] = float(r.mask_BM.sum()) / max(t_rollout + t_train, 1e-9)
        out["sampler_compiles"] = float(self.sampler.num_compiles)  # bounded by the buckets
        out |= self.compile_counts()
        if cfg.sample_every and step % cfg.sample_every == 0:
            self._last_samples = self._format_samples(r)
        return out

    def compile_counts(self) -> dict[str, float]:
        """Cumulative compilations (`compiles/*`) and traces (`traces/*`) of the sampler, the
        evaluation sampler, the train step and the reference policy, plus all compilations in
        the process since the learner was built (`compiles/xla`); see the module docstring."""
        traces = {
            "sampler": self.sampler.num_compiles,
            "eval": self.greedy.num_compiles,
            "train_step": self.step_fn.num_compiles,
        }
        if self.ref_params is not None:
            traces["ref_logp"] = self._ref_logp_traces[0]
        out = {f"compiles/{k}": float(self._xla[k]) for k in traces}
        out["compiles/xla"] = float((xla_compiles() - self._xla_at_start).total())
        return out | {f"traces/{k}": float(v) for k, v in traces.items()}

    def _format_samples(self, r, n: int = 3) -> str:
        lines = []
        for i in range(0, min(len(r.parsed), n * self.cfg.group_size), self.cfg.group_size):
            ex = r.examples[i]
            text = self.tokenizer.decode(r.tokens_BM[i][r.mask_BM[i]].tolist())
            lines.append(
                f"query: {ex.query}\nlabel: {ex.label}  reward: {r.rewards_B[i]:.0f}  "
                f"verdicts: {r.verdicts_BP[i].tolist()}\n{text}\n"
            )
        return "\n".join(lines)

    def evaluate(self, step: int) -> dict[str, float]:
        key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
        before = xla_compiles()
        report = evaluate_policy(
            self.greedy, self.state.params, self.tokenizer, self.validation, self.val_prompts, key
        )
        self._xla["eval"] += _compiles_of(before, _SAMPLER_FNS)
        return {f"val/{k}": v for k, v in report.summary().items() if v is not None}

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train to cfg.steps, resuming from the newest checkpoint in workdir. Returns metrics."""
        cfg = self.cfg
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.keep_checkpoints)
        start = 0
        restored = ckpt.restore(self.state)
        if restored is not None:
            self.state, _, extra = restored
            start = int(extra["next_step"])
        lead = jax.process_index() == 0
        writer = MetricsWriter(self.workdir, resume_step=start or None) if lead else None
        if lead and start == 0:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                mesh = dict(self.mesh.shape) if self.mesh is not None else None
                json.dump(_jsonable({**dataclasses.asdict(cfg), "mesh": mesh}), f, indent=2)
        history = []
        if start == 0 and cfg.eval_every:  # where the policy starts, for the learning curves
            metrics = self.evaluate(0) | self.compile_counts()
            history.append({"step": 0, **metrics})
            if writer is not None:
                writer.write(0, metrics)
        with Preemption() as preempt:
            try:
                bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="rl")
                for step in bar:
                    metrics = self.rl_step(step)
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                        metrics |= self.evaluate(step + 1) | self.compile_counts()
                    history.append({"step": step + 1, **metrics})
                    if writer is not None:
                        writer.write(step + 1, metrics)
                        if cfg.sample_every and step % cfg.sample_every == 0:
                            writer.samples(step + 1, self._last_samples)
                    bar.set_postfix(
                        reward=f"{metrics['reward_mean']:.2f}", loss=f"{metrics['loss']:.3f}"
                    )
                    if preempt.should_save(step + 1, cfg.steps, cfg.save_every):
                        ckpt.save(step + 1, self.state, extra={"next_step": step + 1}, force=True)
                    preempt.exit_if_requested(ckpt)
            finally:
                ckpt.close()
                if writer is not None:
                    writer.close()
        return history


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "value") and not isinstance(x, int | float | str | bool):
        return x.value  # enums
    return x
