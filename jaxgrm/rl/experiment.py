"""RL on the synthetic world, end to end: world -> tokenizer -> SFT warm-up on teacher traces ->
GRPO for each SAM mode from the same warm-up -> evaluation, learning curves and a summary.

Every stage writes into the run directory and is skipped when its output exists, so a rerun
resumes (stages that train also resume mid-way from their own checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from jaxgrm.bundle import save_bundle
from jaxgrm.data.world import WorldConfig, generate
from jaxgrm.model import ModelConfig, create_model
from jaxgrm.prompts import (
    PromptConfig,
    TraceFormat,
    render_prompt,
    render_target,
)
from jaxgrm.rl.advantages import SamMode
from jaxgrm.rl.learner import Learner, RLConfig
from jaxgrm.traces import trace_tokenizer, world_traces
from jaxgrm.train.mesh import MeshConfig, auto_mesh
from jaxgrm.train.metrics import read_metrics
from jaxgrm.train.sft import SFTConfig, response_encoder, run_sft


@dataclasses.dataclass(frozen=True)
class WorldRLExperiment:
    """world: the generator's config. model: the decoder (vocab_size is set from the tokenizer).
    sam_modes: one RL run per mode, all from the same SFT warm-up and with the same seeds."""

    world: WorldConfig = WorldConfig.small()
    model: ModelConfig = ModelConfig.tiny()
    vocab_size: int = 1024
    tokenizer_texts: int = 3000
    prompt: PromptConfig = PromptConfig(instructions=False, doc_budget=96)
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    sam_modes: tuple[SamMode, ...] = (SamMode.OFF, SamMode.BOTH)
    teacher_seed: int = 0
    teacher_prose: bool = True
    mesh: MeshConfig = MeshConfig()  # axes over all devices (unused on one device)


def _save(model, tok, cfg: WorldRLExperiment, path: str, stage: str, step: int) -> None:
    """The trained model as a bundle, ready for `jaxgrm score --ckpt path` (process 0 only)."""
    if jax.process_index() == 0:
        provenance = {"stage": stage, "step": step, "world_seed": cfg.world.seed}
        save_bundle(model, tok, cfg.prompt, path, scale="xhs5", provenance=provenance)


def run(cfg: WorldRLExperiment, workdir: str | os.PathLike) -> dict:
    """Run (or resume) the experiment; returns {mode: [metrics per logged step]}."""
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    splits = generate(cfg.world)
    records = world_traces(
        splits["train"], cfg.world.teacher_error_rate, seed=cfg.teacher_seed,
        prose=cfg.teacher_prose,
    )  # fmt: skip
    train = [r.to_example() for r in records]
    tok = trace_tokenizer(
        train,
        cfg.prompt,
        cfg.vocab_size,
        cfg.tokenizer_texts,
        os.path.join(workdir, "tokenizer.model"),
    )
    model_cfg = cfg.model.replace(vocab_size=tok.vocab_size)
    mesh = auto_mesh(cfg.mesh)

    def fresh_model():
        return create_model(model_cfg, seed=cfg.sft.seed, mesh=mesh)

    def prompt_ids(ex):
        return render_prompt(ex, tok, cfg.prompt).ids

    def target_ids(ex):  # the teacher's trace, or the grade alone for the label-only format
        if cfg.prompt.format == TraceFormat.LABEL_ONLY:
            return tok.encode(render_target(ex, cfg.prompt))
        return tok.encode(ex.meta["trace"])

    encode = response_encoder(prompt_ids, target_ids, tok.eos_id)
    sft_dir = os.path.join(workdir, "sft")
    model = fresh_model()
    params, _ = run_sft(model, train, encode, cfg.sft, sft_dir, mesh=mesh)
    nnx.update(model, params)
    _save(model, tok, cfg, os.path.join(sft_dir, "bundle"), "sft", cfg.sft.steps)
    results = {}
    for mode in cfg.sam_modes:
        model = fresh_model()
        nnx.update(model, params)
        rl_cfg = dataclasses.replace(
            cfg.rl, advantage=dataclasses.replace(cfg.rl.advantage, sam=mode)
        )
        rl_dir = os.path.join(workdir, f"rl-{mode}")
        learner = Learner(model, tok, train, splits["validation"], rl_cfg, rl_dir, mesh=mesh)
        learner.run()
        nnx.update(model, learner.state.params)
        _save(model, tok, cfg, os.path.join(rl_dir, "bundle"), f"rl-{mode}", rl_cfg.steps)
        results[str(mode)] = read_metrics(rl_dir)  # the whole curve, also after a resume
        jax.clear_caches()
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_curves(results, os.path.join(workdir, "curves.png"))
    return results


CURVES = (
    ("val/accuracy", "validation grade accuracy"),
    ("val/step_accuracy", "validation step accuracy"),
    ("val/all_steps_right", "validation all-steps-right"),
    ("reward_mean", "training reward (rollouts)"),
)


def plot_curves(results: dict[str, list[dict]], path: str) -> None:
    """One panel per metric in CURVES, one line per run (e.g. per SAM mode)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(CURVES), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, title) in zip(fig.subplots(1, len(CURVES)), CURVES, strict=True):
        for name, history in results.items():
            points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(title="SAM mode", fontsize=8)
    fig.savefig(path, dpi=110)
