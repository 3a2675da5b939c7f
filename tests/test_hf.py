"""Tests for jaxgrm.model.hf: logits parity with transformers, exact round trips, sharded
placement, and clear errors for bad checkpoints."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgrm.model import PRESETS, ModelConfig, RopeScaling, create_model
from jaxgrm.model.hf import (
    CheckpointError,
    UnsupportedCheckpointError,
    config_from_hf,
    config_to_hf,
    load_hf_checkpoint,
    read_safetensors,
    save_hf_checkpoint,
    write_safetensors,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)
INDEX = "model.safetensors.index.json"

SMALL = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, initializer_range=0.1,
    max_position_embeddings=128, attn_implementation="eager",
)  # fmt: skip
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=64,
)  # fmt: skip


def hf_config(kind: str):
    if kind == "qwen2":  # qkv bias, tied embeddings
        rope = {"rope_type": "default", "rope_theta": 1e6}
        return transformers.Qwen2Config(**SMALL, tie_word_embeddings=True, rope_parameters=rope)
    if kind == "qwen3":  # qk norm, head_dim != hidden / heads
        rope = {"rope_type": "default", "rope_theta": 1e6}
        return transformers.Qwen3Config(**SMALL, head_dim=32, rope_parameters=rope)
    # llama: llama3 RoPE scaling, untied embeddings, another eps
    return transformers.LlamaConfig(
        **SMALL, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE)
    )


def padded_batch(vocab: int):
    """3 rows of length 9: full, left-padded to 6 tokens, right-padded to 3 tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, size=(3, 9)).astype(np.int32)
    valid = np.zeros((3, 9), bool)
    valid[0, :], valid[1, 3:], valid[2, :3] = True, True, True
    tokens[~valid] = 0
    return tokens, valid


def hf_logits(hf_model, tokens, valid):
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(valid.astype(np.int64)),
            position_ids=torch.from_numpy(positions),
        )
    return out.logits.numpy()


def flat_params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


# ---- parity with transformers -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_import_matches_transformers_logits(kind, tmp_path):
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config(kind)).eval()
    with torch.no_grad():  # move norms and biases off their ones/zeros init so their mapping counts
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path)

    model = load_hf_checkpoint(tmp_path)
    cfg = model.cfg
    assert (cfg.qkv_bias, cfg.qk_norm) == (kind == "qwen2", kind == "qwen3")
    assert cfg.tie_embeddings == (kind == "qwen2")
    assert cfg.head_dim == (32 if kind == "qwen3" else 16)
    if kind == "llama":
        assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
        assert (cfg.rope_theta, cfg.norm_eps) == (500_000.0, 1e-5)

    tokens, valid = padded_batch(cfg.vocab_size)
    ours = np.asarray(model.forward(tokens, valid.astype(np.int32)))
    ref = hf_logits(hf_model, tokens, valid)
    assert ref[valid].std() > 0.3  # logits big enough for the tolerance to mean something
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_export_loads_in_transformers(arch, tmp_path):
    cfg = ModelConfig.tiny(
        vocab_size=96, n_layers=2, d_model=64, mlp_dim=96, head_dim=16, rope_theta=50_000.0,
        norm_eps=1e-5, qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=arch != "LlamaForCausalLM", max_seq_len=128,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64) if arch == "LlamaForCausalLM" else None,
    )  # fmt: skip
    model = create_model(cfg, seed=1)
    for i, (p, var) in enumerate(nnx.to_flat_state(nnx.state(model))):  # move norms, biases
        if "scale" in p or any("bias" in str(k) for k in p):
            noise = jax.random.normal(jax.random.key(i), var.get_value().shape)
            var.set_value(var.get_value() + 0.3 * noise)
    save_hf_checkpoint(model, tmp_path)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(hf_model).__name__ == arch
    tokens, valid = padded_batch(cfg.vocab_size)
    ours = np.asarray(model.forward(tokens, valid.astype(np.int32)))
    ref = hf_logits(hf_model, tokens, valid)
    assert ref[valid].std() > 0.3
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


# ---- exact round trips ------------------------------------------------------------------------
ROUND_TRIP = {
    "qwen2-tied": dict(qkv_bias=True),
    "llama-untied": dict(tie_embeddings=False, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 256)),
    "qwen3-bf16": dict(qk_norm=True, param_dtype="bfloat16", dtype="bfloat16"),
}


@pytest.fixture(params=sorted(ROUND_TRIP))
def tiny_model(request):
    cfg = ModelConfig.tiny(vocab_size=64, n_layers=2, **ROUND_TRIP[request.param])
    return create_model(cfg, seed=3)


def assert_bit_identical(a, b):
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for p in pa:
        assert pa[p].dtype == pb[p].dtype and pa[p].shape == pb[p].shape, p
        assert pa[p].tobytes() == pb[p].tobytes(), p


def test_round_trip_is_bit_exact(tiny_model, tmp_path):
    save_hf_checkpoint(tiny_model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.cfg == tiny_model.cfg.replace(name=tmp_path.name)
    assert_bit_identical(tiny_model, loaded)

    # The reference safetensors reader sees the same bits (bf16 included).
    from safetensors.torch import load_file

    ours = read_safetensors(tmp_path / "model.safetensors")
    for name, t in load_file(tmp_path / "model.safetensors").items():
        assert t.view(torch.uint8).numpy().tobytes() == ours[name].tobytes(), name


def test_sharded_round_trip_is_bit_exact(tiny_model, tmp_path):
    save_hf_checkpoint(tiny_model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == sorted([*shards, "config.json", INDEX])
    assert_bit_identical(tiny_model, load_hf_checkpoint(tmp_path))

    save_hf_checkpoint(tiny_model, tmp_path)  # a later unsharded save removes the stale shards
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_bit_identical(tiny_model, load_hf_checkpoint(tmp_path))


def test_load_casts_to_requested_dtype(tmp_path):
    model = create_model(ModelConfig.tiny(vocab_size=64, n_layers=1), seed=0)
    save_hf_checkpoint(model, tmp_path)
    loaded = load_hf_checkpoint(tmp_path, param_dtype="bfloat16", dtype="float32")
    assert (loaded.cfg.param_dtype, loaded.cfg.dtype) == ("bfloat16", "float32")
    want = np.asarray(model.embed_VD[...].astype(jax.numpy.bfloat16))
    assert loaded.embed_VD[...].dtype == jax.numpy.bfloat16
    assert np.asarray(loaded.embed_VD[...]).tobytes() == want.tobytes()


# ---- config translation -------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trip_for_presets(preset):
    cfg = ModelConfig.preset(preset)
    back = config_from_hf(json.loads(json.dumps(config_to_hf(cfg))), name=cfg.name)
    assert back == cfg


def test_config_from_legacy_llama_json():
    """transformers-4 style: top-level rope_theta, rope_scaling, torch_dtype."""
    legacy = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }  # fmt: skip
    cfg = config_from_hf(legacy, name="llama3.2-1b")
    assert cfg == ModelConfig.llama3_2_1b(param_dtype="bfloat16", dtype="bfloat16")
    assert config_from_hf(legacy, param_dtype="float32").param_dtype == "float32"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"architectures": ["MistralForCausalLM"]}, ["MistralForCausalLM", "Qwen3ForCausalLM"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'yarn'", "llama3"]),
        ({"mlp_bias": True}, ["mlp_bias"]),
        ({"attention_bias": True}, ["attention_bias", "o_proj"]),
        ({"hidden_act": "gelu"}, ["gelu"]),
    ],
)
def test_unsupported_configs(change, words):
    base = config_to_hf(ModelConfig.tiny(), "LlamaForCausalLM")
    with pytest.raises(UnsupportedCheckpointError) as err:
        config_from_hf(base | change)
    for w in words:
        assert w in str(err.value)


def test_export_rejects_incompatible_architecture(tmp_path):
    model = create_model(ModelConfig.tiny(vocab_size=64, n_layers=1, qkv_bias=True))
    with pytest.raises(UnsupportedCheckpointError, match="Qwen2ForCausalLM"):
        save_hf_checkpoint(model, tmp_path, architecture="LlamaForCausalLM")


# ---- sharded placement --------------------------------------------------------------------------
SHARDED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P
    from jaxgrm.model.hf import load_hf_checkpoint
    from jaxgrm.model.sharding import state_shardings

    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
    model = load_hf_checkpoint(sys.argv[1], mesh=mesh)
    ref = load_hf_checkpoint(sys.argv[1])
    want = dict(nnx.to_flat_state(state_shardings(nnx.state(model), mesh)))
    refs = dict(nnx.to_flat_state(nnx.state(ref)))
    for p, var in nnx.to_flat_state(nnx.state(model)):
        arr = var.get_value()
        assert arr.sharding == want[p].get_value(), (p, arr.sharding)
        assert np.array_equal(np.asarray(arr), np.asarray(refs[p].get_value())), p
    q = model.layers[0].attn.q_DNH[...]
    assert q.sharding.spec == P("fsdp", "tensor", None), q.sharding
    assert q.addressable_shards[0].data.shape == (64, 2, 32)
    assert model.lm_head_DV[...].sharding.spec == P("fsdp", "tensor")
    print("SHARDED-OK")
    """
)


def test_load_onto_mesh_in_subprocess(tmp_path):
    cfg = ModelConfig.tiny(vocab_size=64, n_layers=2, qkv_bias=True, tie_embeddings=False)
    save_hf_checkpoint(create_model(cfg, seed=5), tmp_path)
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHARDED-OK" in proc.stdout


# ---- bad checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A tiny Llama-layout checkpoint (D=128, F=384) and its tensors, copied out of the file."""
    cfg = ModelConfig.tiny(vocab_size=64, n_layers=2, tie_embeddings=False)
    save_hf_checkpoint(create_model(cfg), tmp_path)
    tensors = {k: np.array(v) for k, v in read_safetensors(tmp_path / "model.safetensors").items()}
    return tmp_path, tensors


def rewrite(path, tensors):
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})


def load_error(path, cls=CheckpointError) -> str:
    with pytest.raises(cls) as err:
        load_hf_checkpoint(path)
    return str(err.value)


def test_missing_tensor(saved):
    path, tensors = saved
    del tensors["model.layers.1.mlp.up_proj.weight"]
    rewrite(path, tensors)
    msg = load_error(path)
    assert "model.layers.1.mlp.up_proj.weight: missing (expected shape [384, 128])" in msg


def test_unexpected_tensor(saved):
    path, tensors = saved
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(128, np.float32)
    tensors["model.rotary_emb.inv_freq"] = np.zeros(16, np.float32)  # harmless, ignored
    rewrite(path, tensors)
    msg = load_error(path)
    assert "model.layers.0.self_attn.o_proj.bias: unexpected tensor (shape [128])" in msg
    assert "inv_freq" not in msg and "1 problem" in msg


def test_wrong_shape(saved):
    path, tensors = saved
    name = "model.layers.0.mlp.gate_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    rewrite(path, tensors)
    assert f"{name}: expected shape [384, 128], found [128, 384]" in load_error(path)


def test_all_problems_reported_together(saved):
    path, tensors = saved
    del tensors["lm_head.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 128), np.float32)
    tensors["extra"] = np.zeros(3, np.float32)
    rewrite(path, tensors)
    msg = load_error(path)
    assert "3 problem(s)" in msg
    assert "lm_head.weight: missing (expected shape [64, 128])" in msg
    assert "q_proj.weight: expected shape [128, 128], found [64, 128]" in msg
    assert "extra: unexpected tensor (shape [3])" in msg


def test_unsupported_architecture_in_config_json(saved):
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    msg = load_error(path, UnsupportedCheckpointError)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg


def test_truncated_file(saved):
    path, _ = saved
    file = path / "model.safetensors"
    header = json.loads(file.read_bytes()[8 : 8 + int.from_bytes(file.read_bytes()[:8], "little")])
    header.pop("__metadata__")
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    msg = load_error(path)
    assert str(file) in msg and last in msg and "truncated" in msg

    file.write_bytes(data[:40])  # not even the whole header
    msg = load_error(path)
    assert str(file) in msg and "header" in msg and "truncated" in msg


def test_sharded_checkpoint_with_missing_shard(tmp_path):
    save_hf_checkpoint(create_model(ModelConfig.tiny(64, n_layers=2)), tmp_path, max_shard_bytes=1)
    shard = json.loads((tmp_path / INDEX).read_text())["weight_map"]["model.norm.weight"]
    (tmp_path / shard).unlink()
    assert f"{shard}: shard listed in {INDEX} is missing" in load_error(tmp_path)


def test_no_config(tmp_path):
    assert "config.json" in load_error(tmp_path)
