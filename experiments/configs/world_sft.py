"""SFT warm-up on the synthetic world's teacher traces (imperfect: 15% of steps wrong), with
greedy validation every 100 steps; ends in a bundle for `jaxgrm score` / `jaxgrm rl`.

    jaxgrm sft --config experiments/configs/world_sft.py --workdir runs/world_sft

Hardware: 2 CPU cores. Runtime: about 10 minutes (estimated from the SFT stage of world_rl.py,
which has the same model and batch; not yet timed on its own). Expected: validation accuracy
rises well above the majority grade; step accuracy stays near the teacher's (~85%).
Traces go to WORKDIR/traces.jsonl (+ .meta.json), the model to WORKDIR/bundle.
"""

from jaxgrm.data.world import WorldConfig
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig
from jaxgrm.traces import SFTExperiment
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig

STEPS = 300


def get_config() -> SFTExperiment:
    # As world_rl.py: no constant instructions, a 64-token note, traces of conclusion lines only.
    return SFTExperiment(
        world=WorldConfig.small(),
        model=ModelConfig.tiny(max_seq_len=1024),
        vocab_size=1024,
        prompt=PromptConfig(instructions=False, doc_budget=64),
        sft=SFTConfig(
            steps=STEPS,
            batch_size=8,
            max_len=512,  # prompt (<= ~370 tokens) + trace (<= ~70): one example per row
            pack=False,
            optim=OptimConfig(learning_rate=2e-3, warmup_steps=20, total_steps=STEPS),
            save_every=100,
            eval_every=100,
        ),
        teacher_prose=False,
        eval_examples=200,
        eval_max_new_tokens=80,
        eval_buckets=(320, 384, 448),
    )
