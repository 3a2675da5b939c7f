"""A seconds-long version of world_rl.py for tests and CI: a tiny world, a 2-layer model, a short
SFT warm-up on the label-only format (so rewards vary from the first RL step), a few RL steps.

    jaxgrm rl --config experiments/configs/world_rl_smoke.py --workdir /tmp/smoke

Hardware: 2 CPU cores. Runtime: under a minute. Expected: it runs; the numbers mean nothing.
"""

from jaxgrm.data.world import WorldConfig
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig, TraceFormat
from jaxgrm.rl.advantages import SamMode
from jaxgrm.rl.experiment import WorldRLExperiment
from jaxgrm.rl.learner import RLConfig
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig


def get_config() -> WorldRLExperiment:
    prompt = PromptConfig(
        format=TraceFormat.LABEL_ONLY, criteria=False, instructions=False, doc_budget=32
    )
    return WorldRLExperiment(
        world=WorldConfig(train_size=300, validation_size=16, random_size=16, longtail_size=16),
        model=ModelConfig.tiny(
            d_model=64,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            head_dim=32,
            mlp_dim=128,
            max_seq_len=512,
        ),  # fmt: skip
        vocab_size=400,
        tokenizer_texts=300,
        prompt=prompt,
        sft=SFTConfig(
            steps=30,
            batch_size=8,
            max_len=256,
            pack=False,
            optim=OptimConfig(learning_rate=3e-3, warmup_steps=3, total_steps=30),
            save_every=30,
        ),
        rl=RLConfig(
            steps=6,
            prompts_per_step=4,
            group_size=4,
            max_new_tokens=8,
            minibatches=2,
            optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=6),
            prompt=prompt,
            prompt_buckets=(128, 256),
            eval_every=3,
            eval_examples=16,
            save_every=1,
            sample_every=3,
        ),
        sam_modes=(SamMode.BOTH,),
    )
