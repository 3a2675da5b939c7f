"""Supervised fine-tuning (warm-up on teacher traces, the SFT-Label baseline, sequence-level
distillation): masked cross-entropy on response tokens, packed rows, the shared train step, and
exact resume (train state + data-iterator state in one checkpoint)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxgrm.data.pipeline import Mode, PipelineConfig, make_iterator
from jaxgrm.data.schema import RelevanceExample
from jaxgrm.train.checkpoint import Checkpointer
from jaxgrm.train.loop import Preemption
from jaxgrm.train.mesh import shard_batch
from jaxgrm.train.metrics import MetricsWriter
from jaxgrm.train.objectives import CrossEntropy
from jaxgrm.train.state import OptimConfig, TrainState, make_optimizer
from jaxgrm.train.step import jit_train_step

EncodeFn = Callable[[RelevanceExample], tuple[list[int], list[int]]]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One optimizer update per step; the schedule's `optim.total_steps` is set to `steps`."""

    steps: int = 500
    batch_size: int = 16
    max_len: int = 512
    pack: bool = True
    accum_steps: int = 1
    optim: OptimConfig = OptimConfig(learning_rate=1e-3, warmup_steps=20, total_steps=500)
    save_every: int = 100
    eval_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0


def response_encoder(prompt_fn, target_fn, eos_id: int) -> EncodeFn:
    """encode(example) = prompt ids + target ids + eos, loss on the target and eos only."""

    def encode(ex: RelevanceExample) -> tuple[list[int], list[int]]:
        prompt, target = prompt_fn(ex), target_fn(ex) + [eos_id]
        return prompt + target, [0] * len(prompt) + [1] * len(target)

    return encode


def run_sft(
    model,
    examples: Sequence[RelevanceExample],
    encode: EncodeFn,
    cfg: SFTConfig,
    workdir: str | os.PathLike,
    mesh=None,
    evaluate: Callable[[nnx.State, int], dict] | None = None,
    objective=None,
    batch_hook: Callable[[dict], dict] | None = None,
    desc: str = "sft",
) -> tuple[nnx.State, list[dict]]:
    """Train `model` on `examples`; resumes from workdir's newest checkpoint. Returns the final
    params and the metrics history. `evaluate(params, step)` runs every cfg.eval_every steps.

    `objective` defaults to masked cross-entropy (`CrossEntropy()`); `batch_hook(batch) ->
    batch` adds whatever else the objective reads (logit distillation: the teacher's logits)."""
    workdir = os.fspath(workdir)
    graphdef, params = nnx.split(model)
    tx = make_optimizer(dataclasses.replace(cfg.optim, total_steps=cfg.steps))
    state = TrainState.create(params, tx, seed=cfg.seed)
    shardings = jax.tree.map(lambda x: x.sharding, state) if mesh is not None else None
    objective = CrossEntropy() if objective is None else objective
    step_fn = jit_train_step(graphdef, objective, tx, cfg.accum_steps, shardings)
    shard = None
    if jax.process_count() > 1:
        import grain

        shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    pipe = PipelineConfig(
        batch_size=cfg.batch_size // jax.process_count(),
        max_len=cfg.max_len,
        mode=Mode.PACK if cfg.pack else Mode.PAD,
        seed=cfg.seed,
        num_epochs=None,
    )
    it = make_iterator(list(examples), encode, pipe, shard_options=shard)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
    start = 0
    restored = ckpt.restore(state)
    if restored is not None:
        state, data_state, extra = restored
        it.set_state(data_state)
        start = int(extra["next_step"])
    lead = jax.process_index() == 0
    writer = MetricsWriter(workdir, resume_step=start or None) if lead else None
    history = []
    with Preemption() as preempt:
        try:
            bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc)
            for step in bar:
                batch = {k: np.asarray(v) for k, v in next(it).items() if k != "positions_BT"}
                if batch_hook is not None:
                    batch = batch_hook(batch)
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                state, metrics = step_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    metrics |= evaluate(state.params, step + 1)
                history.append({"step": step + 1, **metrics})
                if writer is not None:
                    writer.write(step + 1, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                if preempt.should_save(step + 1, cfg.steps, cfg.save_every):
                    ckpt.save(step + 1, state, data=it.get_state(), extra={"next_step": step + 1})
                preempt.exit_if_requested(ckpt)
        finally:
            ckpt.close()
            if writer is not None:
                writer.close()
    return state.params, history
