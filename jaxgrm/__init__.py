"""jaxgrm: generative relevance models trained with reinforcement learning, in pure JAX.

Dimension glossary. Array names carry their shape in these letters (`logits_BTV`, `adv_BT`), and
so do einsum strings and the `axes` of every weight:

    B batch            T sequence          S cache (key) length
    D model width      N query heads       K kv heads          H head dim
    R query heads per kv head (N // K)     F MLP hidden        V vocabulary
    G traces per prompt                    P reasoning steps
"""

from jaxgrm.hostmem import tune_host_malloc

# First, before any JAX computation starts XLA's CPU threads (see jaxgrm.hostmem).
HOST_MALLOC = tune_host_malloc()

from jaxgrm.bundle import load_bundle, save_bundle
from jaxgrm.model import (
    Decoder,
    ModelConfig,
    create_model,
    load_hf_checkpoint,
    make_mesh,
    save_hf_checkpoint,
)
from jaxgrm.sampling import SampleOutput, Sampler, SamplingConfig
from jaxgrm.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "Decoder",
    "HFTokenizer",
    "ModelConfig",
    "SampleOutput",
    "Sampler",
    "SamplingConfig",
    "SentencePieceTokenizer",
    "Tokenizer",
    "__version__",
    "create_model",
    "load_bundle",
    "load_hf_checkpoint",
    "load_tokenizer",
    "make_mesh",
    "save_bundle",
    "save_hf_checkpoint",
]
