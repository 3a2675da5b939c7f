"""TFDS builder of the synthetic relevance world (`jaxgrm.data.world`)."""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from jaxgrm.data.schema import tfds_features, to_tfds_record
from jaxgrm.data.world import SPLITS, WorldConfig, generate

_CITATION = """\
@article{grm_rl_2025,
  title   = {Optimizing Generative Ranking Relevance via Reinforcement Learning in Xiaohongshu
             Search},
  journal = {arXiv preprint arXiv:2512.00968},
  year    = {2025}
}"""


@dataclasses.dataclass(eq=False)
class WorldBuilderConfig(tfds.core.BuilderConfig):
    """A named `WorldConfig`: the world a builder config generates."""

    world: WorldConfig = WorldConfig()


class World(tfds.core.GeneratorBasedBuilder):
    """The synthetic relevance world: generated notes and queries in five domains, graded -1..3
    (scale `xhs5`) by domain-dependent business criteria, with the truth of every reasoning step
    in `steps` and the domain, criteria lines and firing rule in `meta` (JSON text).

    Splits: train, validation, random (the same distribution, disjoint queries) and longtail
    (held-out subjects whose names reuse sub-word pieces of training names, or pairs of
    constraint values that no other split's query has). Configs: `default` (20k/2k/2k/2k pairs)
    and `small` (3k/300/600/600); pass `config=WorldBuilderConfig(name=..., world=WorldConfig(...))`
    for any other world. No download: everything is generated, deterministically per config.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        WorldBuilderConfig(
            name="default", description="the default world (20k train pairs)", world=WorldConfig()
        ),
        WorldBuilderConfig(
            name="small", description="a small world for tests", world=WorldConfig.small()
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        world = self.builder_config.world
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or self.name).strip(),
            features=tfds_features(),
            homepage="https://arxiv.org/abs/2512.00968",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(world_config=dataclasses.asdict(world)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        data = generate(self.builder_config.world)
        return {split: self._generate_examples(data[split]) for split in SPLITS}

    def _generate_examples(self, examples):
        for i, example in enumerate(examples):
            yield f"{i:07d}", to_tfds_record(example)
