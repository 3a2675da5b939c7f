"""Import and export of Hugging Face checkpoints: Llama, Qwen2 and Qwen3 causal LMs.

A checkpoint is a directory with `config.json` and either `model.safetensors` or
`model.safetensors.index.json` plus the shard files it names. Tensors are read through a memory
map with a small safetensors reader of our own (no torch; bf16 via `ml_dtypes`), checked against
the config as a whole before anything is placed, and then created directly in their target
sharding: each device copies only its own slice out of the memory map.

HF Linear weights are [out, in]; ours carry glossary letters (see `jaxgrm/__init__.py`):
q_proj [N*H, D] <-> q_DNH [D, N, H], o_proj [D, N*H] <-> o_NHD [N, H, D], gate/up_proj [F, D]
<-> [D, F], down_proj [D, F] <-> [F, D], lm_head [V, D] <-> lm_head_DV [D, V].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxgrm.model.config import DType, ModelConfig, RopeScaling
from jaxgrm.model.decoder import Decoder
from jaxgrm.model.sharding import DEFAULT_RULES, Rules, abstract_model, state_shardings

_MODEL_TYPES = dict(LlamaForCausalLM="llama", Qwen2ForCausalLM="qwen2", Qwen3ForCausalLM="qwen3")
SUPPORTED_ARCHITECTURES = tuple(_MODEL_TYPES)
# HF checkpoints may carry these buffers; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt or inconsistent with its config."""


class UnsupportedCheckpointError(CheckpointError):
    """A well-formed checkpoint of an architecture or feature the decoder does not implement."""


# ---- config ---------------------------------------------------------------------------------
def _architecture(config_json: Mapping) -> str:
    """The first supported entry of `architectures`, or, without that list, the `model_type`'s."""
    archs = list(config_json.get("architectures") or [])
    by_type = {v: k for k, v in _MODEL_TYPES.items()}
    found = archs or [by_type.get(config_json.get("model_type"), "")]
    if supported := [a for a in found if a in SUPPORTED_ARCHITECTURES]:
        return supported[0]
    found = archs or f"model_type={config_json.get('model_type')!r}"
    raise UnsupportedCheckpointError(
        f"unsupported architecture {found}; supported: {list(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(config_json: Mapping) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from legacy `rope_theta`/`rope_scaling` or transformers-5 style
    `rope_parameters` (possibly nested per layer type, which must then all agree)."""
    params = config_json.get("rope_scaling") or config_json.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
        if len(distinct) > 1:
            raise UnsupportedCheckpointError(f"per-layer-type RoPE parameters differ: {params}")
        params = next(iter(params.values()))
    theta = float(params.get("rope_theta", config_json.get("rope_theta", 10_000.0)))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedCheckpointError(
            f"partial_rotary_factor={params['partial_rotary_factor']} is not supported (only 1.0)"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedCheckpointError(
            f"unsupported rope_type {rope_type!r}; supported: ['default', 'llama3']"
        )
    try:
        old_max = params.get("original_max_position_embeddings")
        old_max = old_max or config_json["max_position_embeddings"]  # the default HF uses
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        scaling = RopeScaling(*(float(params[key]) for key in keys), int(old_max))
    except KeyError as e:
        raise CheckpointError(f"llama3 RoPE parameters lack {e.args[0]!r}: {params}") from None
    return theta, scaling


def config_from_hf(
    config_json: Mapping,
    *,
    param_dtype: DType | str | None = None,
    dtype: DType | str | None = None,
    matmul_dtype: DType | str | None = None,
    name: str | None = None,
) -> ModelConfig:
    """A ModelConfig from a HF `config.json` dict.

    `param_dtype` defaults to the checkpoint's `dtype` (or legacy `torch_dtype`): bfloat16 stays
    bfloat16, float16 and anything else become float32 (lossless). `dtype` (compute) defaults to
    `param_dtype`; `matmul_dtype` (see ModelConfig) defaults to None, multiplying in `dtype`.
    `name` defaults to the `model_type`. Raises UnsupportedCheckpointError for
    architectures or features the decoder does not implement.
    """
    arch = _architecture(config_json)
    get = config_json.get

    def need(key: str):
        if key not in config_json:
            raise CheckpointError(f"config.json ({arch}) lacks required key {key!r}")
        return config_json[key]

    def unsupported(what: str):
        raise UnsupportedCheckpointError(f"{arch}: {what}")

    if get("hidden_act", "silu") != "silu":
        unsupported(f"hidden_act={get('hidden_act')!r} is not supported (only 'silu')")
    if get("mlp_bias"):
        unsupported("mlp_bias=True is not supported: the decoder's MLP has no biases")
    if arch != "Qwen2ForCausalLM" and get("attention_bias"):
        unsupported(
            "attention_bias=True (biases on q/k/v and o_proj) is not supported: the decoder "
            "has q/k/v biases only (as in Qwen2) and no o_proj bias"
        )
    if get("use_sliding_window") or any(t != "full_attention" for t in get("layer_types") or []):
        unsupported("sliding-window attention is not supported (only full attention)")

    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    default_head_dim = 128 if arch == "Qwen3ForCausalLM" else d_model // n_heads
    theta, scaling = _rope(config_json)
    raw_dtype = str(get("dtype") or get("torch_dtype") or "float32").removeprefix("torch.")
    ckpt_dtype = DType.BFLOAT16 if raw_dtype == "bfloat16" else DType.FLOAT32
    param_dtype = DType(param_dtype or ckpt_dtype)
    return ModelConfig(
        vocab_size=int(need("vocab_size")), d_model=d_model,
        n_layers=int(need("num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=int(get("num_key_value_heads") or n_heads),
        head_dim=int(get("head_dim") or default_head_dim), mlp_dim=int(need("intermediate_size")),
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(get("rms_norm_eps", 1e-6)),
        qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        max_seq_len=int(get("max_position_embeddings", 2048)), param_dtype=param_dtype,
        dtype=DType(dtype or param_dtype), matmul_dtype=matmul_dtype,
        name=name or _MODEL_TYPES[arch],
    )  # fmt: skip


def default_architecture(cfg: ModelConfig) -> str:
    """Qwen3 for qk_norm, Qwen2 for qkv_bias, Llama otherwise."""
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def config_to_hf(cfg: ModelConfig, architecture: str | None = None) -> dict:
    """A HF `config.json` dict for `cfg`, readable by transformers 4 (legacy `rope_theta`,
    `rope_scaling`, `torch_dtype`) and 5 (`rope_parameters`, `dtype`)."""
    arch = architecture or default_architecture(cfg)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"unsupported architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    want_bias, want_norm = arch == "Qwen2ForCausalLM", arch == "Qwen3ForCausalLM"
    if (cfg.qkv_bias, cfg.qk_norm) != (want_bias, want_norm):
        raise UnsupportedCheckpointError(
            f"{arch} needs qkv_bias={want_bias} and qk_norm={want_norm}; the model has "
            f"qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm} (default for it: "
            f"{default_architecture(cfg)})"
        )
    scaling, s = None, cfg.rope_scaling
    if s is not None:
        scaling = dict(
            rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position,
        )  # fmt: skip
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
    out = dict(
        architectures=[arch], model_type=_MODEL_TYPES[arch], vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=scaling,
        rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        dtype=cfg.param_dtype.value, torch_dtype=cfg.param_dtype.value,
    )  # fmt: skip
    if arch == "LlamaForCausalLM":
        out |= {"attention_bias": False, "mlp_bias": False}
    else:
        out |= {"use_sliding_window": False, "sliding_window": None}
        out["max_window_layers"] = cfg.n_layers
        if arch == "Qwen3ForCausalLM":
            out["attention_bias"] = False
    return out


# ---- safetensors ----------------------------------------------------------------------------
_ST_DTYPES = {
    tag: np.dtype(t)
    for tag, t in dict(
        F64=np.float64, F32=np.float32, F16=np.float16, BF16=ml_dtypes.bfloat16,
        F8_E4M3=ml_dtypes.float8_e4m3fn, F8_E5M2=ml_dtypes.float8_e5m2, I64=np.int64,
        I32=np.int32, I16=np.int16, I8=np.int8, U8=np.uint8, BOOL=np.bool_,
    ).items()
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_FLOAT_TAGS = ("F64", "F32", "F16", "BF16")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read-only memory-mapped arrays of a safetensors file, by tensor name; no data is copied.

    Raises CheckpointError naming the file (and the tensors) when the header is malformed, a
    dtype is unknown, or the file is too short for its header or its tensors (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
        n = int.from_bytes(prefix, "little")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: header of {n} bytes is longer than the file ({size} bytes); truncated?"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header")
    header.pop("__metadata__", None)
    start = 8 + n
    buf = np.memmap(path, np.uint8, mode="r")
    out, problems = {}, []
    for name, info in header.items():
        try:
            tag, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: malformed header entry {info!r}")
            continue
        if tag not in _ST_DTYPES:
            problems.append(f"{name}: unknown dtype {tag!r}")
            continue
        dt = _ST_DTYPES[tag]
        if not 0 <= lo <= hi or hi - lo != math.prod(shape) * dt.itemsize:
            problems.append(f"{name}: data_offsets [{lo}, {hi}] do not fit {tag} {list(shape)}")
        elif start + hi > size:
            problems.append(
                f"{name}: data_offsets [{lo}, {hi}] end at byte {start + hi}, past the end of "
                f"the file ({size} bytes); truncated?"
            )
        else:
            out[name] = buf[start + lo : start + hi].view(dt).reshape(shape)
    if problems:
        raise CheckpointError(f"{path}: corrupt safetensors file:\n  " + "\n  ".join(problems))
    return out


def _write_safetensors(path: Path, entries: list, metadata: Mapping[str, str] | None) -> None:
    """entries: (name, shape, dtype, thunk returning the array); one array in memory at a time.
    Written to a temporary name and renamed, so a failed write leaves no partial file."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dt, _ in entries:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape)}
        header[name]["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape, dt, thunk in entries:
                arr = np.ascontiguousarray(thunk())
                if arr.shape != tuple(shape) or arr.dtype != dt:
                    raise ValueError(f"{name}: got {arr.dtype} {arr.shape}, declared {dt} {shape}")
                f.write(arr.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict | None = None
) -> None:
    """Write numpy arrays (any dtype in `_ST_DTYPES`, bfloat16 included) to a safetensors file."""
    entries = [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    _write_safetensors(Path(path), entries, metadata)


# ---- weight mapping -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Weight:
    hf_name: str
    path: tuple  # path in nnx.state(model)
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]  # views only, so memory maps stay lazy
    to_hf: Callable[[np.ndarray], np.ndarray]


def _weights(cfg: ModelConfig) -> list[_Weight]:
    """Every weight of the model, in checkpoint order, with its HF name, shape and transforms."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    f, v = cfg.mlp_dim, cfg.vocab_size

    def same(x):
        return x

    def transpose(x):
        return x.T

    def w(hf_name, path, hf_shape, to_ours=same, to_hf=same):
        return _Weight(hf_name, path, tuple(hf_shape), to_ours, to_hf)

    out = [w("model.embed_tokens.weight", ("embed_VD",), (v, d))]
    for i in range(cfg.n_layers):
        p, a = f"model.layers.{i}.", ("layers", i, "attn")
        out.append(w(p + "input_layernorm.weight", ("layers", i, "attn_norm", "scale"), (d,)))
        for x, m, letters in (("q", n, "NH"), ("k", k, "KH"), ("v", k, "KH")):
            proj = f"{p}self_attn.{x}_proj."
            out.append(
                w(proj + "weight", (*a, f"{x}_D{letters}"), (m * h, d),
                  lambda t, m=m: t.reshape(m, h, d).transpose(2, 0, 1),  # [m*H, D] -> [D, m, H]
                  lambda t, m=m: t.transpose(1, 2, 0).reshape(m * h, d))
            )  # fmt: skip
            if cfg.qkv_bias:
                out.append(
                    w(proj + "bias", (*a, f"{x}_bias_{letters}"), (m * h,),
                      lambda t, m=m: t.reshape(m, h), lambda t, m=m: t.reshape(m * h))
                )  # fmt: skip
        out.append(
            w(p + "self_attn.o_proj.weight", (*a, "o_NHD"), (d, n * h),
              lambda t: t.reshape(d, n, h).transpose(1, 2, 0),  # [D, N*H] -> [N, H, D]
              lambda t: t.transpose(2, 0, 1).reshape(d, n * h))
        )  # fmt: skip
        if cfg.qk_norm:
            for x in "qk":
                out.append(w(f"{p}self_attn.{x}_norm.weight", (*a, f"{x}_norm", "scale"), (h,)))
        name, path = p + "post_attention_layernorm.weight", ("layers", i, "mlp_norm", "scale")
        out.append(w(name, path, (d,)))
        for x, ours in (("gate", "gate_DF"), ("up", "up_DF"), ("down", "down_FD")):
            shape = (d, f) if x == "down" else (f, d)
            name, path = f"{p}mlp.{x}_proj.weight", ("layers", i, "mlp", ours)
            out.append(w(name, path, shape, transpose, transpose))
    out.append(w("model.norm.weight", ("final_norm", "scale"), (d,)))
    if not cfg.tie_embeddings:
        out.append(w("lm_head.weight", ("lm_head_DV",), (v, d), transpose, transpose))
    return out


# ---- import ---------------------------------------------------------------------------------
def _open_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """All tensors of a single-file or sharded checkpoint, memory-mapped, plus index problems."""
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        tensors, problems = {}, []
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).exists():
                raise CheckpointError(f"{path / fname}: shard listed in {INDEX_FILE} is missing")
            for name, arr in read_safetensors(path / fname).items():
                if name in tensors:
                    problems.append(f"{name}: stored in more than one shard")
                tensors[name] = arr
        for name, fname in weight_map.items():
            if name not in tensors:
                problems.append(f"{name}: listed in {INDEX_FILE} under {fname} but absent from it")
        return tensors, problems
    if (path / SINGLE_FILE).exists():
        return read_safetensors(path / SINGLE_FILE), []
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _validate(path, cfg, arch, tensors, weights, problems) -> None:
    expected = {w.hf_name: w for w in weights}
    for name, w in expected.items():
        if name not in tensors:
            problems.append(f"{name}: missing (expected shape {list(w.hf_shape)})")
            continue
        arr = tensors[name]
        if arr.shape != w.hf_shape:
            problems.append(f"{name}: expected shape {list(w.hf_shape)}, found {list(arr.shape)}")
        if _ST_NAMES[arr.dtype] not in _FLOAT_TAGS:
            problems.append(f"{name}: dtype {_ST_NAMES[arr.dtype]} is not one of {_FLOAT_TAGS}")
    for name, arr in tensors.items():
        ignored = name.endswith(_IGNORED_SUFFIXES) or (
            name == "lm_head.weight" and cfg.tie_embeddings
        )
        if name not in expected and not ignored:
            problems.append(f"{name}: unexpected tensor (shape {list(arr.shape)})")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match its config ({arch}, {cfg.n_layers} layers, "
            f"qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, "
            f"tie_embeddings={cfg.tie_embeddings}); {len(problems)} problem(s):\n  "
            + "\n  ".join(problems)
        )


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    param_dtype: DType | str | None = None,
    dtype: DType | str | None = None,
    matmul_dtype: DType | str | None = None,
) -> Decoder:
    """Load a HF checkpoint directory into a Decoder; its config is `model.cfg`.

    Every tensor is checked (present, expected, right shape, float dtype) before any is placed;
    all problems are reported together in one CheckpointError. Each weight is then created in
    its sharding from `state_shardings(..., mesh, rules)` (or on the first device without a
    mesh), each device reading only its slice of the memory-mapped file, cast to `param_dtype`
    (default: the checkpoint's dtype, see `config_from_hf`). `dtype` and `matmul_dtype` set the
    compute and matmul-operand dtypes (`ModelConfig`).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json")
    config_json = json.loads((path / "config.json").read_text())
    dtypes = dict(param_dtype=param_dtype, dtype=dtype, matmul_dtype=matmul_dtype)
    cfg = config_from_hf(config_json, **dtypes, name=path.name)
    arch = _architecture(config_json)
    tensors, problems = _open_checkpoint(path)
    weights = _weights(cfg)
    _validate(path, cfg, arch, tensors, weights, problems)

    graphdef, abstract = nnx.split(abstract_model(cfg))
    if mesh is None:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = {p: one for p, _ in nnx.to_flat_state(abstract)}
    else:
        flat = nnx.to_flat_state(state_shardings(abstract, mesh, rules))
        shardings = {p: var.get_value() for p, var in flat}
    variables = dict(nnx.to_flat_state(abstract))
    if set(variables) != {w.path for w in weights}:  # the decoder and this mapping disagree
        raise RuntimeError(
            f"weight mapping out of date: {set(variables) ^ {w.path for w in weights}}"
        )
    target = np.dtype(cfg.param_dtype.jnp)

    def place(w: _Weight) -> jax.Array:
        view = w.to_ours(tensors[w.hf_name])  # a view of the memory map: nothing read yet

        def read(index):  # called once per device with that device's slice
            part = view if index is None else view[index]
            return np.array(part, dtype=target, order="C")  # a copy: never alias the file

        shape = variables[w.path].get_value().shape
        return jax.make_array_from_callback(shape, shardings[w.path], read)

    state = nnx.from_flat_state([(w.path, variables[w.path].replace(place(w))) for w in weights])
    return nnx.merge(graphdef, state)


# ---- export ---------------------------------------------------------------------------------
def save_hf_checkpoint(
    model: Decoder,
    path: str | os.PathLike,
    *,
    architecture: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `model` as a HF checkpoint: config.json and model.safetensors, or, when the weights
    exceed `max_shard_bytes`, shards model-0000i-of-0000n.safetensors plus the index.

    Weights are written in the config's param dtype, gathered one at a time to the host.
    Stale model*.safetensors files and index of an earlier save in `path` are removed.
    `architecture` defaults to `default_architecture(model.cfg)`.
    """
    cfg: ModelConfig = model.cfg
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(cfg, architecture)
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    dt = np.dtype(cfg.param_dtype.jnp)

    def gather(w: _Weight) -> np.ndarray:
        arr = variables[w.path].get_value()
        if isinstance(arr, jax.Array) and not arr.is_fully_addressable:
            raise ValueError(f"{w.hf_name}: not fully addressable; multi-host export unsupported")
        return w.to_hf(np.asarray(jax.device_get(arr)).astype(dt, copy=False))

    entries = [(w.hf_name, w.hf_shape, dt, lambda w=w: gather(w)) for w in _weights(cfg)]
    groups, size = [[]], 0
    for e in entries:
        nbytes = math.prod(e[1]) * dt.itemsize
        if max_shard_bytes is not None and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += nbytes
    meta = {"format": "pt"}
    if len(groups) == 1:
        written = [SINGLE_FILE]
        _write_safetensors(path / SINGLE_FILE, entries, meta)
    else:
        written, weight_map = [], {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            _write_safetensors(path / fname, group, meta)
            written.append(fname)
            weight_map |= {e[0]: fname for e in group}
        total = sum(math.prod(e[1]) * dt.itemsize for e in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(INDEX_FILE)
    for old in path.iterdir():
        stale = old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(old.name)
        if stale and old.name not in written:
            old.unlink()
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
