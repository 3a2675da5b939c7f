"""Batched sampling with a KV cache: one jitted prefill plus a jitted `lax.while_loop` decode.

Prompts are left-padded to a bucket length L, so every row's last prompt token sits at L - 1 and
all rows write the cache at the same index. The cache holds S = L + M slots (M new tokens); a
boolean `valid_BS` says which slots a row may attend to (its real prompt tokens and what it has
generated), which also makes decode causal without a separate mask.

Weights are an argument of both jitted functions, never closed over, so an RL learner can hand in
new policy weights without a recompile. The decode function donates its state, the KV cache
included, so XLA updates the cache in place.

Returned log-probabilities are those of the model itself (temperature 1, no top-k/top-p
filtering), i.e. log pi_theta(token | prefix), which is what a policy-gradient ratio needs and
what a teacher-forced forward pass reproduces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxgrm.model.decoder import Decoder, LayerCache, init_cache, segment_mask, segment_positions

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Changing any field compiles new functions; changing weights does not.

    temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters. `stop_ids` end a row
    (EOS, the closing answer tag); the stop token is kept and counted in the completion mask.
    `num_samples` is G, the number of traces drawn per prompt.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not self.prompt_buckets or sorted(self.prompt_buckets) != list(self.prompt_buckets):
            raise ValueError(f"prompt_buckets must be sorted and non-empty: {self.prompt_buckets}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    def bucket(self, prompt_len: int) -> int:
        """The padded prompt length for a longest prompt of `prompt_len` tokens."""
        for b in self.prompt_buckets:
            if prompt_len <= b:
                return b
        step = self.prompt_buckets[-1]
        return -(-prompt_len // step) * step


@struct.dataclass
class SamplingState:
    """Decode-loop carry. B rows (prompts x G), S cache slots, M new tokens.

    step: [] int32, tokens drawn so far (the prefill draws the first).   cache: per-layer
    LayerCache, holding every token before the last one drawn.   valid_BS: [B, S] bool
    attendable slots.   positions_B: [B] int32 position of the last token drawn.
    done_B: [B] bool, row has stopped.   tokens_BM: [B, M] int32.   logprobs_BM: [B, M] float32.
    mask_BM: [B, M] bool.   uniform_MB: [M, B] float32, the uniform in [0, 1) of each draw
    (draw i's from fold_in(key, i), so a draw does not depend on M), all made by the prefill.
    Each decode iteration feeds the last token drawn through the model and draws the next from
    its logits, so no [B, V] logits are carried between iterations, and the last token is never
    fed through the model (nothing would read its output).
    """

    step: jax.Array
    cache: tuple[LayerCache, ...]
    valid_BS: jax.Array
    positions_B: jax.Array
    done_B: jax.Array
    tokens_BM: jax.Array
    logprobs_BM: jax.Array
    mask_BM: jax.Array
    uniform_MB: jax.Array


@struct.dataclass
class SampleOutput:
    """Completions for B = num_prompts * G rows, prompt-major (row = prompt * G + sample).

    tokens_BM: [B, M] int32, pad after a stop.   logprobs_BM: [B, M] float32 log pi(token),
    0 where masked.   mask_BM: [B, M] bool, True for generated tokens up to and including the
    stop token.   prompt_tokens_BL / prompt_mask_BL: the left-padded prompts, [B, L].
    """

    tokens_BM: jax.Array
    logprobs_BM: jax.Array
    mask_BM: jax.Array
    prompt_tokens_BL: jax.Array
    prompt_mask_BL: jax.Array

    @property
    def lengths_B(self) -> jax.Array:
        return self.mask_BM.sum(axis=1)


def _bisect(lo_B1, hi_B1, measure, target_B1, iters: int = 32):
    """Per row, the largest t in [lo, hi) with measure(t) >= target, to float32 resolution.

    `measure` is non-increasing in t and measure(lo) >= target. A row stops early once
    measure(t) == target exactly (top-k: exactly k tokens kept); otherwise 32 halvings reach
    float32 resolution, so the result is exact up to values tied within ~1e-8. Replaces sorting:
    XLA's CPU top-k and sort cost ~10x more than these vector passes.
    """

    def cond(carry):
        i, _, _, done = carry
        return (i < iters) & ~jnp.all(done)

    def body(carry):
        i, lo, hi, done = carry
        mid = 0.5 * (lo + hi)
        m = measure(mid)
        ok = (m >= target_B1) & ~done
        lo = jnp.where(ok, mid, lo)
        hi = jnp.where(done | ok, hi, mid)
        return i + 1, lo, hi, done | (m == target_B1)

    done = measure(lo_B1) == target_B1
    return jax.lax.while_loop(cond, body, (0, lo_B1, hi_B1, done))[1]


def sampling_weights(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Unnormalised probabilities [B, V] after temperature, top-k and top-p; 0 = excluded.

    top-k keeps every token whose logit is >= the k-th largest; top-p keeps the smallest set of
    most likely tokens whose mass reaches p (both thresholds found by bisection).
    """
    x = logits_BV.astype(jnp.float32)
    x_max = x.max(axis=-1, keepdims=True)
    return _filtered_weights(x, x_max, jnp.exp((x - x_max) / cfg.temperature), cfg)


def _filtered_weights(x_BV, x_max_B1, weights_BV, cfg: SamplingConfig) -> jax.Array:
    """`weights_BV` (exp((x - x_max) / temperature) of the float32 logits x) with the tokens
    that top-k and top-p exclude set to 0."""
    weights = weights_BV
    if cfg.top_k and cfg.top_k < x_BV.shape[-1]:
        # Counting in float32 is exact below 2**24. Written as a converted comparison, a pass
        # costs ~25 us on [32, 4096] in the decode loop (a compare pass plus a YNNPACK sum);
        # where(x >= t, 1.0, 0.0) made a select pass plus a slower reduction (~47 us), an int32
        # sum a compare pass plus a reduce-window (~33 us). Measured by profile, XLA:CPU.
        kth = _bisect(
            x_BV.min(axis=-1, keepdims=True),
            x_max_B1,
            lambda t: (x_BV >= t).astype(jnp.float32).sum(-1, keepdims=True),
            jnp.full_like(x_max_B1, cfg.top_k),
        )
        weights = jnp.where(x_BV >= kth, weights, 0.0)
    if cfg.top_p < 1.0:
        cut = _bisect(
            jnp.zeros_like(x_max_B1),
            jnp.ones_like(x_max_B1),
            lambda t: jnp.where(weights >= t, weights, 0.0).sum(-1, keepdims=True),
            cfg.top_p * weights.sum(axis=-1, keepdims=True),
        )
        weights = jnp.where(weights >= cut, weights, 0.0)
    return weights


def first_argmax(x_BV: jax.Array) -> jax.Array:
    """argmax over the last axis (the first index of the maximum) as two plain reductions.

    XLA's CPU argmax is a variadic (value, index) reduce: ~270 us per call on [32, 4096] float32
    in a decode-like loop; with this, greedy decoding's per-step token choice and log-probability
    went 638 -> 187 us (measured). A row holding NaN gives index 0 (jnp.argmax gives the NaN's
    index); never an out-of-range index."""
    v = x_BV.shape[-1]
    is_max = x_BV == x_BV.max(axis=-1, keepdims=True)
    first = jnp.where(is_max, jnp.arange(v, dtype=jnp.int32), v).min(axis=-1)
    return jnp.where(first == v, 0, first)


def next_tokens(
    logits_BV: jax.Array,
    key: jax.Array | None,
    cfg: SamplingConfig,
    *,
    uniform_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Next tokens [B] by the rule in `cfg`, and their log-probabilities [B] under the model
    itself (temperature 1, unfiltered). One max and, at temperature 1, one exp pass over the
    logits serve both. `uniform_B` (one uniform in [0, 1) per row) replaces the draw from `key`
    (see `sample_from_weights`)."""
    x = logits_BV.astype(jnp.float32)
    x_max = x.max(axis=-1, keepdims=True)
    e = jnp.exp(x - x_max)
    logz_B = (x_max + jnp.log(e.sum(axis=-1, keepdims=True)))[:, 0]
    if cfg.temperature == 0.0:
        tok = first_argmax(x)
    else:
        weights = e if cfg.temperature == 1.0 else jnp.exp((x - x_max) / cfg.temperature)
        tok = sample_from_weights(
            _filtered_weights(x, x_max, weights, cfg), key, uniform_B=uniform_B
        )
    picked = jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0]
    return tok, picked - logz_B


def choose_tokens(logits_BV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next tokens [B] from float32 logits by the rule in `cfg`."""
    return next_tokens(logits_BV, key, cfg)[0]


def sample_from_weights(
    weights_BV: jax.Array,
    key: jax.Array | None,
    block: int = 64,
    *,
    uniform_B: jax.Array | None = None,
) -> jax.Array:
    """One draw per row from unnormalised non-negative weights [B, V], by inverting the CDF.

    One uniform per row instead of B x V Gumbel noise, and a two-level search (pick a block of
    `block` tokens by its mass, then a token inside it) instead of a V-long prefix sum. The
    uniforms are `uniform_B` when given (the sampler makes those of all its draws at once),
    else drawn from `key`.
    """
    b, v = weights_BV.shape
    pad = -v % block
    w = jnp.pad(weights_BV, ((0, 0), (0, pad))).reshape(b, -1, block)
    mass = w.sum(-1)  # [B, V / block]
    block_cdf = jnp.cumsum(mass, axis=-1)
    if key is None and uniform_B is None:
        raise ValueError("sample_from_weights needs a PRNG key or uniform_B")
    u = jax.random.uniform(key, (b, 1)) if uniform_B is None else uniform_B[:, None]
    u = u * block_cdf[:, -1:]
    blk = jnp.minimum((block_cdf <= u).sum(-1), block_cdf.shape[1] - 1)
    # Rounding in the sums can land on an empty block or a zero-weight token: fall back to the
    # heaviest block / token, which keeps every draw inside the filtered set.
    blk_mass = jnp.take_along_axis(mass, blk[:, None], axis=1)
    blk = jnp.where(blk_mass[:, 0] > 0, blk, first_argmax(mass))
    before = jnp.take_along_axis(block_cdf, blk[:, None], axis=1) - jnp.take_along_axis(
        mass, blk[:, None], axis=1
    )
    inner = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]  # [B, block]
    inner_cdf = jnp.cumsum(inner, axis=-1)
    pos = jnp.minimum((inner_cdf <= (u - before)).sum(-1), block - 1)
    picked = jnp.take_along_axis(inner, pos[:, None], axis=1)[:, 0]
    pos = jnp.where(picked > 0, pos, first_argmax(inner))
    return (blk * block + pos).astype(jnp.int32)


def gather_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """log softmax(logits)[token] for each position: [B, T] float32."""
    logz = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits_BTV, tokens_BT[..., None], axis=-1)[..., 0]
    return picked.astype(jnp.float32) - logz


class Sampler:
    """Draw completions from a `Decoder` given its parameters.

        sampler = Sampler(model, SamplingConfig(max_new_tokens=64, top_k=50, num_samples=8))
        out = sampler(nnx.state(model), prompts, jax.random.key(0))

    `params` may be any state of the same structure (new RL weights): compiled functions are
    reused. `num_compiles` counts traces of the prefill and decode functions.
    """

    def __init__(self, model: Decoder, config: SamplingConfig):
        self.graphdef, _ = nnx.split(model)
        self.model_cfg = model.cfg
        self.config = config
        self.num_compiles = 0
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))

    # -- host side --------------------------------------------------------------------------
    def pad_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad and repeat each prompt G times: tokens and mask [B, L] as numpy.

        L is the prompt bucket; B is the number of rows (prompts x G) rounded up to a power of
        two, so a run with varying prompt counts compiles O(log B) times. Filler rows have an
        all-False mask; they start finished and are dropped from the output.
        """
        if not prompts:
            raise ValueError("no prompts to sample from")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs a token")
        cfg = self.config
        # A bucket past the model's room shrinks to the room when the prompts still fit (one
        # more shape, at most, instead of an error for prompts that can be sampled).
        room = self.model_cfg.max_seq_len - cfg.max_new_tokens
        bucket = cfg.bucket(max(lengths))
        if bucket > room >= max(lengths):
            bucket = room
        total = bucket + cfg.max_new_tokens
        if total > self.model_cfg.max_seq_len:
            raise ValueError(
                f"prompt bucket {bucket} + max_new_tokens {cfg.max_new_tokens} = {total} exceeds "
                f"the model's max_seq_len {self.model_cfg.max_seq_len}"
            )
        g = cfg.num_samples
        rows = 1 << (len(prompts) * g - 1).bit_length()
        tokens = np.full((rows, bucket), cfg.pad_id, np.int32)
        mask = np.zeros((rows, bucket), bool)
        for i, p in enumerate(prompts):
            sl = slice(i * g, (i + 1) * g)
            tokens[sl, bucket - len(p) :] = np.asarray(p, np.int32)
            mask[sl, bucket - len(p) :] = True
        return tokens, mask

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], key) -> SampleOutput:
        tokens, mask = self.pad_prompts(prompts)
        state = self._prefill(params, jnp.asarray(tokens), jnp.asarray(mask), key)
        state = self._decode(params, state)
        n = len(prompts) * self.config.num_samples
        return SampleOutput(
            tokens_BM=state.tokens_BM[:n],
            logprobs_BM=state.logprobs_BM[:n],
            mask_BM=state.mask_BM[:n],
            prompt_tokens_BL=jnp.asarray(tokens[:n]),
            prompt_mask_BL=jnp.asarray(mask[:n]),
        )

    # -- traced -----------------------------------------------------------------------------
    def _prefill_impl(self, params, tokens_BL, mask_BL, key) -> SamplingState:
        self.num_compiles += 1
        model = nnx.merge(self.graphdef, params)
        cfg = self.config
        b, length = tokens_BL.shape
        m = cfg.max_new_tokens
        s = length + m
        valid_BS = jnp.pad(mask_BL, ((0, 0), (0, m)))
        mask_BLS = jnp.pad(segment_mask(mask_BL.astype(jnp.int32)), ((0, 0), (0, 0), (0, m)))
        positions = segment_positions(mask_BL.astype(jnp.int32))
        cache = init_cache(self.model_cfg, b, s)
        hidden, cache = model(tokens_BL, positions, mask_BLS, cache, 0, last_only=True)
        filler_B = ~mask_BL[:, -1]  # real rows always end in a prompt token
        state = SamplingState(
            step=jnp.zeros((), jnp.int32),
            cache=cache,
            valid_BS=valid_BS,
            positions_B=mask_BL.sum(axis=1).astype(jnp.int32),
            done_B=filler_B,
            tokens_BM=jnp.full((b, m), cfg.pad_id, jnp.int32),
            logprobs_BM=jnp.zeros((b, m), jnp.float32),
            mask_BM=jnp.zeros((b, m), bool),
            # One threefry call for every draw of the call, instead of a split and a draw per
            # decode step (~75 us of a ~4 ms step at batch 32, by profile).
            uniform_MB=jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (b,)))(
                jnp.arange(m)
            ),
        )
        return self._emit(state, model.logits(hidden[:, -1]))

    def _emit(self, st: SamplingState, logits_BV: jax.Array) -> SamplingState:
        """Draw every live row's next token from `logits_BV` and record it at column st.step
        (pad, log-prob 0 and mask False for rows that have stopped)."""
        cfg = self.config
        stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)
        uniform_B = jax.lax.dynamic_index_in_dim(st.uniform_MB, st.step, keepdims=False)
        tok, logp = next_tokens(logits_BV, None, cfg, uniform_B=uniform_B)
        live = ~st.done_B
        tok = jnp.where(live, tok, cfg.pad_id)
        col = (0, st.step)
        return st.replace(
            step=st.step + 1,
            done_B=st.done_B | (live & jnp.isin(tok, stop_ids)),
            tokens_BM=jax.lax.dynamic_update_slice(st.tokens_BM, tok[:, None], col),
            logprobs_BM=jax.lax.dynamic_update_slice(
                st.logprobs_BM, jnp.where(live, logp, 0.0)[:, None], col
            ),
            mask_BM=jax.lax.dynamic_update_slice(st.mask_BM, live[:, None], col),
        )

    def _decode_impl(self, params, state: SamplingState) -> SamplingState:
        self.num_compiles += 1
        model = nnx.merge(self.graphdef, params)
        m = self.config.max_new_tokens
        prompt_len = state.valid_BS.shape[1] - m
        # RoPE tables for every cache position, built once outside the loop; each step gathers
        # its rows. Computing sin and cos inside the step let XLA fuse them into every head's
        # rotation, recomputed per element.
        cos_S11H, sin_S11H = model.rope(jnp.arange(state.valid_BS.shape[1])[:, None])
        head_DV = model.head_DV()  # loop-invariant: a tied table is transposed once per call

        def body(st: SamplingState) -> SamplingState:
            # Feed the last token drawn (column step - 1): it occupies cache slot
            # prompt_len + step - 1. Rows that had stopped feed padding, never attended to.
            col = st.step - 1
            tok = jax.lax.dynamic_slice_in_dim(st.tokens_BM, col, 1, axis=1)
            live = jax.lax.dynamic_slice_in_dim(st.mask_BM, col, 1, axis=1)
            slot = prompt_len + col
            valid_BS = jax.lax.dynamic_update_slice(st.valid_BS, live, (0, slot))
            rope = (cos_S11H[st.positions_B], sin_S11H[st.positions_B])  # [B, 1, 1, H/2]
            hidden, cache = model(
                tok, st.positions_B[:, None], valid_BS[:, None, :], st.cache, slot, rope=rope
            )
            st = st.replace(cache=cache, valid_BS=valid_BS, positions_B=st.positions_B + 1)
            return self._emit(st, model.logits(hidden[:, 0], head_DV))

        # m - 1 forward passes at most: the last token drawn is never fed (1/m of the work).
        return jax.lax.while_loop(lambda st: (st.step < m) & ~jnp.all(st.done_B), body, state)
