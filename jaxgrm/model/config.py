"""Model configuration: one frozen dataclass for the Llama/Qwen decoder family, with presets.

Presets `tiny` and `small` are for CPU tests and experiments; the others equal the published
configs of open-weight checkpoints so that `jaxgrm.model.hf` can import them.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @property
    def jnp(self) -> jnp.dtype:
        return jnp.dtype(self.value)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of RoPE (the `rope_type: llama3` block of a HF config)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int

    def __post_init__(self):
        if self.factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"invalid RopeScaling {self}: need factor > 0, high > low freq factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters. Letters follow the glossary in `jaxgrm/__init__.py`.

    vocab_size (V), d_model (D), n_layers, n_heads (N), n_kv_heads (K), head_dim (H),
    mlp_dim (F). `qkv_bias` is Qwen2's, `qk_norm` is Qwen3's per-head RMSNorm on q and k.
    `param_dtype` is the storage dtype of weights, `dtype` the compute dtype of activations;
    norms, softmax and logits are computed in float32 whatever `dtype` is. `matmul_dtype`, when
    set, is the operand dtype of the weight matmuls only (the q/k/v/o, MLP and vocabulary
    projections): both operands are cast to it, the product accumulates in float32 and comes
    back in `dtype`; attention, the KV cache, norms and everything else stay in `dtype`.
    `matmul_dtype="bfloat16"` with float32 params and `dtype` is mixed precision for CPUs with
    bfloat16 dot-product instructions (AVX512_BF16, AMX) and for TPUs; None (the default)
    multiplies in `dtype`.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    param_dtype: DType = DType.FLOAT32
    dtype: DType = DType.FLOAT32
    matmul_dtype: DType | None = None
    name: str = "custom"

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                value = getattr(self, field)
                raise ValueError(f"ModelConfig.{field} must be positive, got {value}")
        if self.mlp_dim <= 0:
            raise ValueError(f"ModelConfig.mlp_dim must be positive, got {self.mlp_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        # Accept plain strings for the dtypes (from JSON or the command line).
        object.__setattr__(self, "param_dtype", DType(self.param_dtype))
        object.__setattr__(self, "dtype", DType(self.dtype))
        if self.matmul_dtype is not None:
            object.__setattr__(self, "matmul_dtype", DType(self.matmul_dtype))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count computed from the config alone (tests compare it with eval_shape)."""
        d, n, k, h, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.qkv_bias:
            attn += n * h + 2 * k * h
        if self.qk_norm:
            attn += 2 * h
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + d

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 512, **kw) -> ModelConfig:
        """About 1M parameters, for CPU tests."""
        base = dict(
            vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
            head_dim=32, mlp_dim=384, max_seq_len=1024, name="tiny",
        )  # fmt: skip
        return cls(**(base | kw))

    @classmethod
    def small(cls, vocab_size: int = 4096, **kw) -> ModelConfig:
        """About 14M parameters, for CPU experiments."""
        base = dict(
            vocab_size=vocab_size, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2,
            head_dim=64, mlp_dim=1536, max_seq_len=2048, name="small",
        )  # fmt: skip
        return cls(**(base | kw))

    @classmethod
    def qwen2_5_0_5b(cls, **kw) -> ModelConfig:
        base = dict(
            vocab_size=151_936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
            head_dim=64, mlp_dim=4864, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
            tie_embeddings=True, max_seq_len=32_768, name="qwen2.5-0.5b",
        )  # fmt: skip
        return cls(**(base | kw))

    @classmethod
    def qwen2_5_1_5b(cls, **kw) -> ModelConfig:
        base = dict(
            vocab_size=151_936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
            head_dim=128, mlp_dim=8960, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
            tie_embeddings=True, max_seq_len=32_768, name="qwen2.5-1.5b",
        )  # fmt: skip
        return cls(**(base | kw))

    @classmethod
    def qwen3_0_6b(cls, **kw) -> ModelConfig:
        base = dict(
            vocab_size=151_936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
            head_dim=128, mlp_dim=3072, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True,
            tie_embeddings=True, max_seq_len=40_960, name="qwen3-0.6b",
        )  # fmt: skip
        return cls(**(base | kw))

    @classmethod
    def llama3_2_1b(cls, **kw) -> ModelConfig:
        base = dict(
            vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
            head_dim=64, mlp_dim=8192, rope_theta=500_000.0, norm_eps=1e-5,
            rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True,
            max_seq_len=131_072, name="llama3.2-1b",
        )  # fmt: skip
        return cls(**(base | kw))

    @classmethod
    def preset(cls, name: str, **kw) -> ModelConfig:
        """A preset by name: one of `PRESETS`."""
        try:
            factory = PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}"
            ) from None
        return factory(**kw)


PRESETS = {
    "tiny": ModelConfig.tiny,
    "small": ModelConfig.small,
    "qwen2.5-0.5b": ModelConfig.qwen2_5_0_5b,
    "qwen2.5-1.5b": ModelConfig.qwen2_5_1_5b,
    "qwen3-0.6b": ModelConfig.qwen3_0_6b,
    "llama3.2-1b": ModelConfig.llama3_2_1b,
}
