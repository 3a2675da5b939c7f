import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrm.model import (
    PRESETS,
    ModelConfig,
    abstract_model,
    create_model,
    init_cache,
    segment_mask,
    segment_positions,
)
from jaxgrm.model.decoder import project


def _tokens(key, b, t, v):
    return jax.random.randint(jax.random.key(key), (b, t), 0, v)


@pytest.fixture(scope="module")
def tiny():
    return create_model(ModelConfig.tiny(qkv_bias=True, qk_norm=True, tie_embeddings=False))


def test_tiny_is_about_one_million_params():
    cfg = ModelConfig.tiny()
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg))))
    assert n == cfg.num_params()
    assert 0.5e6 < n < 1.5e6
    assert 10e6 <= ModelConfig.small().num_params() <= 20e6


# Published parameter counts of the open checkpoints (tied embeddings counted once).
@pytest.mark.parametrize(
    "name, expected",
    [
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-1.5b", 1_543_714_304),
        ("qwen3-0.6b", 596_049_920),
        ("llama3.2-1b", 1_235_814_400),
    ],
)
def test_presets_by_shape(name, expected):
    cfg = PRESETS[name]()
    state = nnx.state(abstract_model(cfg))
    n = sum(x.size for x in jax.tree.leaves(state))
    assert n == expected == cfg.num_params()
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    q = state["layers"][0]["attn"]["q_DNH"].get_value()
    assert q.shape == (cfg.d_model, cfg.n_heads, cfg.head_dim)


def test_causality(tiny):
    tok = _tokens(0, 2, 12, tiny.cfg.vocab_size)
    changed = tok.at[:, 7].set((tok[:, 7] + 1) % tiny.cfg.vocab_size)
    a, b = tiny.forward(tok), tiny.forward(changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_jit_equals_eager(tiny):
    tok = _tokens(1, 2, 10, tiny.cfg.vocab_size)
    graphdef, state = nnx.split(tiny)

    @jax.jit
    def f(state, tok):
        return nnx.merge(graphdef, state).forward(tok)

    np.testing.assert_allclose(f(state, tok), tiny.forward(tok), atol=1e-5, rtol=1e-5)


def test_bf16_close_to_fp32():
    cfg = ModelConfig.tiny()
    m32 = create_model(cfg)
    m16 = create_model(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"))
    # Same weights, rounded to bf16, so only the arithmetic differs.
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32))
    nnx.update(m16, state16)
    assert nnx.state(m16)["embed_VD"].get_value().dtype == jnp.bfloat16
    tok = _tokens(2, 2, 16, cfg.vocab_size)
    p32 = jax.nn.softmax(m32.forward(tok))
    p16 = jax.nn.softmax(m16.forward(tok))
    assert float(jnp.abs(p32 - p16).sum(-1).max()) < 0.1  # total variation per position
    agree = jnp.mean(p32.argmax(-1) == p16.argmax(-1))
    assert agree > 0.9


def test_padding_and_packing_isolate_segments(tiny):
    v = tiny.cfg.vocab_size
    a, b = _tokens(3, 1, 5, v), _tokens(4, 1, 4, v)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    out = tiny.forward(packed, seg)
    np.testing.assert_allclose(out[:, :5], tiny.forward(a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:9], tiny.forward(b), atol=1e-5)
    np.testing.assert_array_equal(segment_positions(seg)[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
    left = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), b], axis=1)
    out = tiny.forward(left, jnp.array([[0, 0, 1, 1, 1, 1]]))
    np.testing.assert_allclose(out[:, 2:], tiny.forward(b), atol=1e-5)


def test_kv_cache_decode_equals_full_forward(tiny):
    cfg = tiny.cfg
    tok = _tokens(5, 2, 11, cfg.vocab_size)
    full = tiny.forward(tok)
    prefix, s = 6, 16
    cache = init_cache(cfg, 2, s)
    valid = jnp.zeros((2, s), bool).at[:, :prefix].set(True)
    mask = segment_mask(jnp.ones((2, prefix), jnp.int32))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, s - prefix)))
    pos = jnp.broadcast_to(jnp.arange(prefix), (2, prefix))
    hidden, cache = tiny(tok[:, :prefix], pos, mask, cache, 0)
    np.testing.assert_allclose(tiny.logits(hidden), full[:, :prefix], atol=1e-5)
    for t in range(prefix, 11):
        valid = valid.at[:, t].set(True)
        pos = jnp.full((2, 1), t)
        hidden, cache = tiny(tok[:, t : t + 1], pos, valid[:, None, :], cache, t)
        np.testing.assert_allclose(tiny.logits(hidden)[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_through_head_dv_match(tied):
    """The sampler's precomputed [D, V] head gives the same logits as the parameters."""
    model = create_model(ModelConfig.tiny(tie_embeddings=tied), seed=1)
    hidden = jax.random.normal(jax.random.key(0), (3, 5, model.cfg.d_model))
    np.testing.assert_allclose(
        model.logits(hidden, model.head_DV()), model.logits(hidden), rtol=1e-5, atol=1e-5
    )


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig.tiny(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError):
        ModelConfig.tiny(param_dtype="float8")


def test_params_born_sharded_on_2x2_mesh(run_in_subprocess):
    out = run_in_subprocess(
        """
        import jax, numpy as np
        from flax import nnx
        from jax.sharding import PartitionSpec as P
        from jaxgrm.model import ModelConfig, create_model, make_mesh
        mesh = make_mesh((2, 2), ("fsdp", "tensor"))
        cfg = ModelConfig.tiny(qkv_bias=True, tie_embeddings=False)
        m = create_model(cfg, mesh=mesh)
        st = nnx.state(m)
        def spec(x):
            return x.get_value().sharding.spec
        layer = st["layers"][0]
        assert spec(st["embed_VD"]) == P("tensor", "fsdp"), spec(st["embed_VD"])
        assert spec(st["lm_head_DV"]) == P("fsdp", "tensor")
        assert spec(layer["attn"]["q_DNH"]) == P("fsdp", "tensor", None)
        assert spec(layer["attn"]["k_DKH"]) == P("fsdp", "tensor", None)
        assert spec(layer["attn"]["o_NHD"]) == P("tensor", None, "fsdp")
        assert spec(layer["attn"]["q_bias_NH"]) == P("tensor", None)
        assert spec(layer["mlp"]["down_FD"]) == P("tensor", "fsdp")
        assert spec(layer["attn_norm"]["scale"]) == P("fsdp")
        q = layer["attn"]["q_DNH"].get_value()
        assert len(q.addressable_shards) == 4
        assert q.addressable_shards[0].data.shape == (64, 2, 32)
        # Same values as an unsharded model with the same seed (jit vs eager init: last-ulp noise).
        ref = nnx.state(create_model(cfg))["layers"][0]["attn"]["q_DNH"].get_value()
        np.testing.assert_allclose(np.asarray(q), np.asarray(ref), atol=1e-6)
        tok = np.arange(12).reshape(2, 6) % cfg.vocab_size
        np.testing.assert_allclose(m.forward(tok), create_model(cfg).forward(tok), atol=1e-5)
        print("ok")
        """,
        devices=4,
    )
    assert "ok" in out


def test_partition_spec_falls_back_to_replication():
    from jaxgrm.model.sharding import partition_spec

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
    spec = partition_spec(("D", "K", "H"), (128, 2, 32), mesh, {"D": "fsdp", "K": "tensor"})
    assert spec == jax.sharding.PartitionSpec(None, None, None)  # axes of size 1
    with pytest.raises(ValueError, match="do not match shape"):
        partition_spec(("D",), (3, 4), mesh, {})


def test_last_only_prefill_matches_full_and_fills_the_same_cache(tiny):
    cfg = tiny.cfg
    tok = _tokens(6, 2, 9, cfg.vocab_size)
    valid = jnp.array([[1] * 9, [0, 0, 0] + [1] * 6])
    pos, mask = segment_positions(valid), segment_mask(valid)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 4)))
    h_all, c_all = tiny(tok, pos, mask, init_cache(cfg, 2, 13), 0)
    h_last, c_last = tiny(tok, pos, mask, init_cache(cfg, 2, 13), 0, last_only=True)
    assert h_last.shape == (2, 1, cfg.d_model)
    np.testing.assert_allclose(h_last[:, 0], h_all[:, -1], atol=1e-5)
    for a, b in zip(jax.tree.leaves(c_all), jax.tree.leaves(c_last), strict=True):
        np.testing.assert_array_equal(a, b)


def _bf16_exact(a):
    """a rounded to bfloat16 and back: products of two such numbers are exact in float32."""
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_mixed_precision_project_forward_and_gradients(transpose_w):
    """operand_dtype=bfloat16: operands rounded to bf16, products accumulated in f32, and the
    backward matmuls (a custom VJP) take bf16 operands too, with f32 gradients out."""
    x = jax.random.normal(jax.random.key(0), (6, 4, 32))
    w = jax.random.normal(jax.random.key(1), (16, 32) if transpose_w else (32, 16))
    c = jax.random.normal(jax.random.key(2), (6, 4, 16))
    wn = w.T if transpose_w else w  # [in, out]

    def loss(x, w):
        return (project(x, w, transpose_w=transpose_w, operand_dtype="bfloat16") * c).sum()

    y = project(x, w, transpose_w=transpose_w, operand_dtype="bfloat16")
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, _bf16_exact(x) @ _bf16_exact(wn), rtol=1e-5, atol=1e-5)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(dx, _bf16_exact(c) @ _bf16_exact(wn).T, rtol=1e-5, atol=1e-5)
    dw_in_out = jnp.einsum("bti,bto->io", _bf16_exact(x), _bf16_exact(c))
    np.testing.assert_allclose(dw, dw_in_out.T if transpose_w else dw_in_out, rtol=1e-5, atol=1e-4)
    # The forward matmul and both backward ones (the loss is linear in y, so its gradient
    # needs no forward matmul) multiply bfloat16 operands.
    for fn, n in ((loss, 1), (jax.grad(loss, argnums=(0, 1)), 2)):
        hlo = jax.jit(fn).lower(x, w).as_text()
        dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) == n
        for line in dots:
            operands = line.rsplit(":", 1)[1].split("->")[0]
            assert operands.count("bf16") == 2, line
    # A bf16 x and a preferred f32 result: the result dtype is the preferred one.
    y16 = project(x.astype(jnp.bfloat16), w, transpose_w=transpose_w, operand_dtype="bfloat16")
    assert y16.dtype == jnp.bfloat16


def test_bf16_matmuls_close_to_fp32_forward_and_gradient():
    """ModelConfig.matmul_dtype: same float32 weights, only the matmul operands rounded."""
    cfg = ModelConfig.tiny(qkv_bias=True)
    m32 = create_model(cfg, seed=4)
    mmx = create_model(cfg.replace(matmul_dtype="bfloat16"), seed=0)
    nnx.update(mmx, nnx.state(m32))
    assert mmx.cfg.matmul_dtype == "bfloat16" and cfg.matmul_dtype is None
    tok = _tokens(6, 2, 16, cfg.vocab_size)
    p32, pmx = jax.nn.softmax(m32.forward(tok)), jax.nn.softmax(mmx.forward(tok))
    assert float(jnp.abs(p32 - pmx).sum(-1).max()) < 0.05
    assert float(jnp.mean(p32.argmax(-1) == pmx.argmax(-1))) > 0.9

    def grads(model):
        graphdef, state = nnx.split(model)

        def loss(state):
            logits = nnx.merge(graphdef, state).forward(tok)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.take_along_axis(logp, tok[:, 1:, None], -1).mean()

        return jax.grad(loss)(state)

    g32, gmx = grads(m32), grads(mmx)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(gmx), strict=True):
        assert b.dtype == jnp.float32
        cos = float((a * b).sum() / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
        assert cos > 0.99, cos
