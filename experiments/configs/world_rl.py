"""RL on the synthetic world: SFT warm-up on imperfect teacher traces, then OutcomeRL (SAM off)
and ProcessRL (SAM on) from the same warm-up with the same seeds.

    jaxgrm rl --config experiments/configs/world_rl.py --workdir runs/world_rl

Hardware: 2 CPU cores. Runtime: about 20 minutes (see the README's RL section for the measured
time and numbers). Expected: validation accuracy rises above the SFT starting point for both;
SAM keeps the steps right (per-step accuracy, all-steps-right) at least as well as outcome RL.
"""

from jaxgrm.data.world import WorldConfig
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig
from jaxgrm.rl.advantages import AdvantageConfig, SamMode
from jaxgrm.rl.experiment import WorldRLExperiment
from jaxgrm.rl.learner import RLConfig
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig

SFT_STEPS = 500
RL_STEPS = 30


def get_config() -> WorldRLExperiment:
    # Small model, small budget: no constant instructions, a 64-token note, traces without prose
    # (conclusion lines only, ~56 tokens), so SFT sees more examples per minute.
    prompt = PromptConfig(instructions=False, doc_budget=64)
    return WorldRLExperiment(
        world=WorldConfig.small(),
        model=ModelConfig.tiny(max_seq_len=1024),
        vocab_size=1024,
        prompt=prompt,
        sft=SFTConfig(
            steps=SFT_STEPS,
            batch_size=8,
            max_len=512,  # prompt (<= ~370 tokens) + trace (<= ~70): one example per row
            pack=False,
            optim=OptimConfig(learning_rate=2e-3, warmup_steps=20, total_steps=SFT_STEPS),
            save_every=100,
        ),
        rl=RLConfig(
            steps=RL_STEPS,
            prompts_per_step=8,
            group_size=8,
            max_new_tokens=80,
            temperature=1.0,
            num_passes=1,
            minibatches=2,
            advantage=AdvantageConfig(mode="std"),
            optim=OptimConfig(learning_rate=2e-4, warmup_steps=0, total_steps=RL_STEPS),
            prompt=prompt,
            prompt_buckets=(320, 384, 448),
            eval_every=10,
            eval_examples=300,
            save_every=10,
            sample_every=10,
        ),
        sam_modes=(SamMode.OFF, SamMode.BOTH),
        teacher_prose=False,
    )
