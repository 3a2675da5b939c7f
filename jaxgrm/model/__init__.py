"""The decoder, its configuration, sharding and checkpoint import/export."""

from jaxgrm.model.config import PRESETS, DType, ModelConfig, RopeScaling
from jaxgrm.model.decoder import (
    Decoder,
    LayerCache,
    init_cache,
    segment_mask,
    segment_positions,
)
from jaxgrm.model.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from jaxgrm.model.sharding import (
    DEFAULT_RULES,
    abstract_model,
    create_model,
    make_mesh,
    state_shardings,
)

__all__ = [
    "CheckpointError",
    "DEFAULT_RULES",
    "PRESETS",
    "DType",
    "Decoder",
    "LayerCache",
    "ModelConfig",
    "RopeScaling",
    "abstract_model",
    "create_model",
    "init_cache",
    "load_hf_checkpoint",
    "make_mesh",
    "segment_mask",
    "save_hf_checkpoint",
    "segment_positions",
    "state_shardings",
]
