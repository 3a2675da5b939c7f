"""Masked and segmented reductions: the one place where sums, counts and spans are computed.

Losses return (sum, denominator) pairs built here so that gradient accumulation and data
sharding reduce sums and counts first and divide once, which keeps the full-batch value exact.
Segment counts are static, so step-segmented code compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of x where mask is true (mask broadcast to x)."""
    return jnp.sum(jnp.where(mask, x, 0), axis=axis)


def masked_count(mask: jax.Array, axis=None) -> jax.Array:
    """Number of true entries, as float32 (a denominator)."""
    return jnp.sum(mask.astype(jnp.float32), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean over masked entries; 0 where nothing is masked in."""
    return safe_divide(masked_sum(x, mask, axis), masked_count(mask, axis))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, with 0 where den == 0."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


def spans_to_mask(spans_BP2: jax.Array, length: int) -> jax.Array:
    """Token membership [B, P, T] of P half-open spans [start, end) per row; (0, 0) = absent."""
    t = jnp.arange(length)
    start, end = spans_BP2[..., 0:1], spans_BP2[..., 1:2]
    return (t >= start) & (t < end)


def segment_sum(values_BT: jax.Array, segment_ids_BT: jax.Array, num_segments: int) -> jax.Array:
    """Per-row sums of values over segment ids 0..num_segments-1: [B, num_segments]."""
    one_hot = jax.nn.one_hot(segment_ids_BT, num_segments, dtype=values_BT.dtype)
    return jnp.einsum("BT,BTS->BS", values_BT, one_hot)
