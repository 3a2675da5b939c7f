"""Distil the world SFT model (experiments/configs/world_sft.py, tiny: 4 layers, d_model 128)
into a 2-layer, d_model 64 student by sequence-level KD: the teacher samples 4 traces per
training pair, the first with the right grade is kept, and the student does SFT on them.

    jaxgrm sft --config experiments/configs/world_sft.py --workdir runs/world_sft
    jaxgrm distill --config experiments/configs/world_distill.py --workdir runs/world_distill

Variants: `-- --mode LOGIT` (token-level forward-KL on the teacher's traces; `--targets WORLD`
for the world teacher's traces instead), `--label-only True` (a grade-only student), `--teacher
PATH` for another bundle. Hardware: 2 CPU cores. Runtime: an estimate, not timed: about 15
minutes (trace sampling of 1000 pairs x 4 samples, 300 student steps, two timed evaluations).
Writes WORKDIR/traces.jsonl, WORKDIR/bundle and WORKDIR/report.json (teacher vs student
accuracy per grade scale, pairs/s and the speed-up).
"""

from jaxgrm.data.world import WorldConfig
from jaxgrm.distill import KDConfig
from jaxgrm.distill_run import DistillExperiment, DistillMode
from jaxgrm.model import ModelConfig
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig

STEPS = 300


def get_config() -> DistillExperiment:
    return DistillExperiment(
        teacher="runs/world_sft/bundle",
        student=ModelConfig.tiny(
            d_model=64,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            head_dim=32,
            mlp_dim=192,
            max_seq_len=1024,
            name="student",
        ),  # fmt: skip
        mode=DistillMode.SEQUENCE,
        world=WorldConfig.small(),  # the teacher's world (same seed: same splits)
        train_pairs=1000,
        kd=KDConfig(temperature=1.0),
        sft=SFTConfig(
            steps=STEPS,
            batch_size=8,
            max_len=512,
            pack=False,
            optim=OptimConfig(learning_rate=2e-3, warmup_steps=20, total_steps=STEPS),
            save_every=100,
        ),
        samples_per_pair=4,
        temperature=1.0,
        max_new_tokens=80,
        eval_examples=200,
        eval_max_new_tokens=80,
        eval_batch_size=32,
        eval_buckets=(320, 384, 448),
    )
