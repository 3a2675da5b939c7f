"""A model bundle: one directory with everything needed to score with a trained model.

    DIR/config.json          the model's HF-style config      (jaxgrm.model.hf.save_hf_checkpoint)
    DIR/model.safetensors    its weights (or shards + index)  (same)
    DIR/tokenizer.model      SentencePiece tokenizer,         (Tokenizer.save)
      or tokenizer.json + tokenizer_config.json for an imported HF tokenizer
    DIR/jaxgrm.json          what the weights alone do not say (below)

So a bundle is also a valid HF-style checkpoint directory for our architectures
(`load_hf_checkpoint(DIR)` and `load_tokenizer(DIR)` read it). `jaxgrm.json`:

    {"format_version": 1,
     "tokenizer": "tokenizer.model",                 # the file load_bundle reads
     "model": {"name": "tiny", "dtype": "float32"},  # preset name (informative), compute dtype
     "prompt": {"format": "reasoning", "criteria": true, "instructions": true,
                "doc_budget": 384, "add_bos": true}, # the PromptConfig it was trained with
     "scale": "xhs5",                                # default grade scale for rows without one
     "provenance": {"stage": "rl", "step": 300, "created": "2026-12-01T10:00:00+00:00", ...}}

`scale` may be null (then every scored row must name its scale). `provenance` holds `stage`
(str or null), `step` (int or null), `created` (UTC ISO 8601, set by `save_bundle`) and any
other JSON values the caller adds (e.g. the data set, the config file). `jaxgrm.json` is written
last, through a temporary file, so a directory without it is an incomplete bundle.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxgrm.data.schema import SCALES
from jaxgrm.model.decoder import Decoder
from jaxgrm.model.hf import INDEX_FILE, SINGLE_FILE, load_hf_checkpoint, save_hf_checkpoint
from jaxgrm.prompts import PromptConfig, TraceFormat
from jaxgrm.tokenizer import (
    HF_CONFIG_FILENAME,
    HF_FILENAME,
    SP_FILENAME,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

BUNDLE_FILE = "jaxgrm.json"
FORMAT_VERSION = 1
_TOKENIZER_FILES = (SP_FILENAME, HF_FILENAME, HF_CONFIG_FILENAME)


class BundleError(ValueError):
    """A bundle directory that is incomplete or whose `jaxgrm.json` has a bad field."""


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: the model, its tokenizer, the prompt config it was trained with, the
    default grade scale (a key of SCALES, or None) and provenance (see the module docstring)."""

    model: Decoder
    tokenizer: Tokenizer
    prompt_config: PromptConfig
    scale: str | None
    provenance: dict[str, Any]


def _prompt_to_json(cfg: PromptConfig) -> dict[str, Any]:
    return {
        "format": cfg.format.value,
        "criteria": cfg.criteria,
        "instructions": cfg.instructions,
        "doc_budget": cfg.doc_budget,
        "add_bos": cfg.add_bos,
    }


def _prompt_from_json(d: Any, where: str) -> PromptConfig:
    if not isinstance(d, Mapping):
        raise BundleError(f"{where}: field 'prompt': expected an object, got {d!r}")
    known = {f.name for f in dataclasses.fields(PromptConfig)}
    unknown = set(d) - known
    if unknown:
        raise BundleError(f"{where}: field 'prompt': unknown keys {sorted(unknown)}")
    kw = dict(d)
    if "format" in kw:
        formats = [f.value for f in TraceFormat]
        if kw["format"] not in formats:
            raise BundleError(
                f"{where}: field 'prompt.format': expected one of {formats}, got {kw['format']!r}"
            )
        kw["format"] = TraceFormat(kw["format"])
    for key in ("criteria", "instructions", "add_bos"):
        if key in kw and not isinstance(kw[key], bool):
            raise BundleError(f"{where}: field 'prompt.{key}': expected true or false")
    budget = kw.get("doc_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise BundleError(f"{where}: field 'prompt.doc_budget': expected an integer or null")
    try:
        return PromptConfig(**kw)
    except (TypeError, ValueError) as err:
        raise BundleError(f"{where}: field 'prompt': {err}") from None


def _check_scale(scale: Any, where: str) -> str | None:
    if scale is not None and scale not in SCALES:
        raise BundleError(
            f"{where}: field 'scale': expected null or one of {sorted(SCALES)}, got {scale!r}"
        )
    return scale


def _check_provenance(p: Any, where: str) -> dict[str, Any]:
    if not isinstance(p, Mapping):
        raise BundleError(f"{where}: field 'provenance': expected an object, got {p!r}")
    stage, step = p.get("stage"), p.get("step")
    if stage is not None and not isinstance(stage, str):
        raise BundleError(f"{where}: field 'provenance.stage': expected text or null")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise BundleError(f"{where}: field 'provenance.step': expected an integer or null")
    return dict(p)


def save_bundle(
    model: Decoder,
    tokenizer: Tokenizer,
    prompt_config: PromptConfig,
    path: str | os.PathLike,
    *,
    scale: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a bundle to `path` (created; an earlier bundle there is replaced) and return it.

    `provenance` gets `created` (now, UTC) unless it has one; it must be JSON-serialisable.
    Raises ValueError when the tokenizer's ids do not fit the model's vocabulary.
    """
    path = Path(path)
    tokenizer.check_fits(model.cfg.vocab_size)
    where = str(path / BUNDLE_FILE)
    _check_scale(scale, where)
    prov = {"stage": None, "step": None, **dict(provenance or {})}
    prov.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    _check_provenance(prov, where)
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": None,
        "model": {"name": model.cfg.name, "dtype": model.cfg.dtype.value},
        "prompt": _prompt_to_json(prompt_config),
        "scale": scale,
        "provenance": prov,
    }
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"  # fails early if not JSON
    path.mkdir(parents=True, exist_ok=True)
    (path / BUNDLE_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
    save_hf_checkpoint(model, path)
    for name in _TOKENIZER_FILES:  # a stale tokenizer of the other kind would shadow this one
        (path / name).unlink(missing_ok=True)
    tokenizer.save(path)
    meta["tokenizer"] = HF_FILENAME if isinstance(tokenizer, HFTokenizer) else SP_FILENAME
    if not (path / meta["tokenizer"]).is_file():
        raise RuntimeError(f"{type(tokenizer).__name__}.save wrote no {meta['tokenizer']}")
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    tmp = path / (BUNDLE_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path / BUNDLE_FILE)
    return path


def read_bundle_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The validated `jaxgrm.json` of bundle `path` (prompt still as JSON); BundleError if bad."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory (a bundle is a directory; see jaxgrm.bundle)")
    file = path / BUNDLE_FILE
    if not file.is_file():
        hint = " (a plain HF checkpoint? save it with jaxgrm.bundle.save_bundle)"
        raise BundleError(f"{file}: missing; {path} is not a complete bundle{hint}")
    where = str(file)
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: expected a JSON object")
    for key in ("format_version", "tokenizer", "prompt"):
        if key not in meta:
            raise BundleError(f"{where}: missing field {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{where}: field 'format_version': expected {FORMAT_VERSION}, "
            f"got {meta['format_version']!r}"
        )
    if meta["tokenizer"] not in (SP_FILENAME, HF_FILENAME):
        raise BundleError(
            f"{where}: field 'tokenizer': expected {SP_FILENAME!r} or {HF_FILENAME!r}, "
            f"got {meta['tokenizer']!r}"
        )
    model = meta.get("model") or {}
    if not isinstance(model, Mapping) or model.get("dtype", "float32") not in (
        "float32",
        "bfloat16",
    ):
        raise BundleError(f"{where}: field 'model': expected {{'name', 'dtype'}}, got {model!r}")
    meta["model"] = dict(model)
    _check_scale(meta.get("scale"), where)
    meta["provenance"] = _check_provenance(meta.get("provenance") or {}, where)
    return meta


def load_bundle(path: str | os.PathLike, *, mesh=None) -> Bundle:
    """Load a bundle written by `save_bundle` (weights onto `mesh` if given, else one device).

    Raises BundleError naming the missing file or the bad field of `jaxgrm.json`; a corrupt
    checkpoint raises `jaxgrm.model.hf.CheckpointError` naming its file.
    """
    path = Path(path)
    meta = read_bundle_meta(path)
    where = str(path / BUNDLE_FILE)
    prompt = _prompt_from_json(meta["prompt"], where)
    for name in ("config.json", meta["tokenizer"]):
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing ({where} needs it)")
    if meta["tokenizer"] == SP_FILENAME:
        tokenizer: Tokenizer = SentencePieceTokenizer.load(path / SP_FILENAME)
    else:
        tokenizer = HFTokenizer.from_pretrained_dir(path)
    if not any((path / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        raise BundleError(f"{path / SINGLE_FILE}: missing (nor is there a {INDEX_FILE})")
    model = load_hf_checkpoint(path, mesh=mesh, dtype=meta["model"].get("dtype"))
    try:
        tokenizer.check_fits(model.cfg.vocab_size)
    except ValueError as err:
        raise BundleError(f"{path}: {err}") from None
    return Bundle(model, tokenizer, prompt, meta.get("scale"), meta["provenance"])
