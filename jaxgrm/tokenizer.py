"""Tokenizers for jaxgrm.

The model reasons in tagged steps (``<step1> ... </step1>`` ... ``<answer> ... </answer>``). Every
tag is guaranteed to be exactly one token, so step and answer spans are found from token ids alone,
without decoding text. :class:`SentencePieceTokenizer` is trained on our own corpus;
:class:`HFTokenizer` adapts an imported checkpoint's ``tokenizer.json``, appending missing tags.
"""

from __future__ import annotations

import abc
import io
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import tokenizers

STEP_TAGS = ("<step1>", "</step1>", "<step2>", "</step2>", "<step3>", "</step3>")
ANSWER_TAGS = ("<answer>", "</answer>")
TAGS = STEP_TAGS + ANSWER_TAGS

SP_FILENAME = "tokenizer.model"
HF_FILENAME = "tokenizer.json"
HF_CONFIG_FILENAME = "tokenizer_config.json"
MODEL_CONFIG_FILENAME = "config.json"

_SPACE_MARK = "\u2581"  # SentencePiece's whitespace symbol; a literal one must not decode to " "


# Trainer settings that the interface relies on: exact round trip (byte fallback, no normalisation,
# no whitespace rewriting, no dummy prefix), fixed special ids, all sentences used in order (for
# determinism), soft vocab limit, and a quiet log.
# fmt: off
_SP_FIXED_OPTIONS: dict[str, Any] = dict(
    byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, split_digits=True, hard_vocab_limit=False,
    pad_id=0, eos_id=1, bos_id=2, unk_id=3,
    pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>", unk_piece="<unk>",
    input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
)
# fmt: on


class Tokenizer(abc.ABC):
    """Interface shared by all jaxgrm tokenizers. Subclasses set the four ``_*_id`` fields."""

    _vocab_size: int
    _pad_id: int
    _bos_id: int | None
    _eos_id: int

    @property
    def vocab_size(self) -> int:
        """Number of ids the embedding table must hold (max id + 1)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @abc.abstractmethod
    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """Encode without bos/eos."""

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Decode ids that are already free of pad/bos/eos."""

    @abc.abstractmethod
    def _piece_id(self, piece: str) -> int | None:
        """Id of a vocabulary entry spelled exactly ``piece``, or None."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer so that :func:`load_tokenizer` can read it back."""

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of strings, not a single string")
        if add_bos and self._bos_id is None:
            raise ValueError("add_bos=True but this tokenizer defines no bos token")
        prefix = [self._bos_id] if add_bos else []
        suffix = [self._eos_id] if add_eos else []
        return [prefix + ids + suffix for ids in self._encode_many(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode a 1-D id sequence; pad, bos and eos ids are dropped, tags render as text."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D id sequence, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"decode expects integer ids, got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self._vocab_size)]
        if bad.size:
            raise ValueError(f"id {int(bad[0])} is outside the vocabulary [0, {self._vocab_size})")
        dropped = {self._pad_id, self._eos_id, self._bos_id}
        return self._decode_ids([int(i) for i in arr.tolist() if i not in dropped])

    def token_id(self, piece: str) -> int:
        """Id of ``piece``: a vocabulary entry, or a text that encodes to exactly one token."""
        found = self._piece_id(piece)
        if found is not None:
            return found
        ids = self._encode_many([piece])[0]
        if len(ids) == 1:
            return ids[0]
        raise KeyError(f"{piece!r} is not a single token of this tokenizer (encodes to {len(ids)})")

    @property
    def tag_ids(self) -> dict[str, int]:
        return {tag: self.token_id(tag) for tag in TAGS}

    def check_fits(self, model_vocab_size: int) -> None:
        """Raise ValueError if a model embedding table of this size cannot hold every id."""
        if model_vocab_size < self._vocab_size:
            added = getattr(self, "added_tags", [])
            note = f" (including {len(added)} added tag tokens)" if added else ""
            raise ValueError(
                f"tokenizer needs {self._vocab_size} ids{note} but the model's embedding table "
                f"has only {model_vocab_size}; resize the embeddings to at least {self._vocab_size}"
            )

    def _check_tags(self) -> None:
        for tag in TAGS:
            tag_id = self._piece_id(tag)
            ids = self._encode_many([f"x{tag}x", tag])
            if tag_id is None or tag_id not in ids[0] or tag_id not in ids[1]:
                raise ValueError(f"tag {tag!r} is not a single token (x{tag}x encodes to {ids[0]})")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model held as serialised bytes.

    Models made by :meth:`train` use pad=0, eos=1 (``</s>``), bos=2 (``<s>``), unk=3, have every
    tag as a user-defined symbol, and round-trip any valid Unicode string exactly. Models loaded
    from elsewhere take their special ids from the model (pad falls back to eos) and must already
    contain the tags as single tokens.
    """

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError("SentencePiece model has no eos piece")
        self._eos_id = self._sp.eos_id()
        self._pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._eos_id
        self._bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        # A literal U+2581 would decode as a space; encode it as its UTF-8 byte pieces instead.
        # Only valid for models without a dummy prefix, where split segments concatenate cleanly.
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]
        has_bytes = all(self._sp.is_byte(i) for i in byte_ids)
        dummy_prefix = self._sp.encode_as_pieces("a")[0].startswith(_SPACE_MARK)
        self._mark_ids = byte_ids if has_bytes and not dummy_prefix else None
        self._check_tags()

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 1024,
        model_type: str = "bpe",
        character_coverage: float = 0.9995,
        seed_sentencepiece_size: int = 1_000_000,
        num_threads: int = 1,
        **extra: Any,
    ) -> SentencePieceTokenizer:
        """Train deterministically in memory; ``extra`` is passed on to SentencePieceTrainer.

        ``vocab_size`` is a soft upper limit (``hard_vocab_limit=False``): a corpus too small to
        fill it yields a smaller vocabulary instead of failing (read :attr:`vocab_size`). It must
        still cover 268 fixed pieces (4 specials, 8 tags, 256 bytes) plus the kept characters, or
        a ValueError is raised.
        """
        texts = iter(texts)
        first = next(texts, None)
        if first is None:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        symbols = list(TAGS) + [s for s in extra.pop("user_defined_symbols", []) if s not in TAGS]
        options: dict[str, Any] = dict(
            _SP_FIXED_OPTIONS,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads,
        )
        options.update(extra)
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], texts),
                model_writer=writer,
                user_defined_symbols=symbols,
                **options,
            )
        except RuntimeError as err:
            if "smaller than required_chars" in str(err):
                raise ValueError(
                    f"vocab_size={vocab_size} is too small for this corpus "
                    f"(increase it or lower character_coverage): {err}"
                ) from err
            raise
        return cls(writer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / SP_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        return cls(path.read_bytes())

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` if it ends in ``.model``, else to ``path/tokenizer.model``."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".model":
            path.mkdir(parents=True, exist_ok=True)
            path = path / SP_FILENAME
        path.write_bytes(self._proto)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        out = self._sp.encode(texts)
        if self._mark_ids is not None:
            for i, text in enumerate(texts):
                if _SPACE_MARK in text:
                    parts = self._sp.encode(text.split(_SPACE_MARK))
                    ids = list(parts[0])
                    for part in parts[1:]:
                        ids += self._mark_ids + part
                    out[i] = ids
        return out

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _piece_id(self, piece: str) -> int | None:
        found = self._sp.piece_to_id(piece)
        if found == self._sp.unk_id() and piece != self._sp.id_to_piece(found):
            return None
        return found


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}")


class HFTokenizer(Tokenizer):
    """Adapter around a ``tokenizers.Tokenizer`` (an imported checkpoint's ``tokenizer.json``).

    Special tokens come from ``tokenizer_config.json`` (``eos_token``/``bos_token``/``pad_token``,
    strings or ``{"content": ...}``), falling back to ``config.json``'s ``*_token_id``. eos is
    required; without a pad token, pad = eos. Tags absent from the vocabulary are appended as
    non-special, unnormalised added tokens (so even ``decode(skip_special_tokens=True)`` elsewhere
    keeps them); ``added_tags`` lists them and :meth:`check_fits` verifies the model is big enough.
    Text is encoded without the tokenizer's own post-processor; bos/eos are added only on request.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
    ):
        self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # never mutate the caller's
        self._config = dict(config or {})
        self._model_config = dict(model_config or {})
        already = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        self.added_tags = [t for t in TAGS if self._tok.token_to_id(t) is None]
        new = [tokenizers.AddedToken(t, special=False, normalized=False) for t in TAGS]
        self._tok.add_tokens([t for t in new if t.content not in already])
        max_id = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max_id + 1)
        eos = self._special_id("eos")
        if eos is None:
            raise ValueError(
                f"no eos token: set eos_token in {HF_CONFIG_FILENAME} or eos_token_id in "
                f"{MODEL_CONFIG_FILENAME}"
            )
        self._eos_id = eos
        pad = self._special_id("pad")
        self._pad_id = eos if pad is None else pad
        self._bos_id = self._special_id("bos")
        self._check_tags()

    def _special_id(self, kind: str) -> int | None:
        name = _token_content(self._config.get(f"{kind}_token"))
        if name is not None:
            found = self._tok.token_to_id(name)
            if found is None:
                raise ValueError(f"{kind}_token {name!r} is not in the tokenizer vocabulary")
            return found
        value = self._model_config.get(f"{kind}_token_id")
        if isinstance(value, list):  # some checkpoints list several eos ids; the first is primary
            value = value[0] if value else None
        if value is not None and not isinstance(value, int):
            raise ValueError(f"{kind}_token_id must be an int, got {value!r}")
        return value

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """Load a directory holding ``tokenizer.json`` (or that file itself) and its configs."""
        path = Path(path)
        file = path / HF_FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {HF_FILENAME} at {file}")

        def read(name: str) -> dict[str, Any]:
            sibling = file.parent / name
            return json.loads(sibling.read_text(encoding="utf-8")) if sibling.is_file() else {}

        tok = tokenizers.Tokenizer.from_file(str(file))
        return cls(tok, read(HF_CONFIG_FILENAME), read(MODEL_CONFIG_FILENAME))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (with added tags) and ``tokenizer_config.json``.

        ``path`` is a directory, or a ``.json`` file whose sibling receives the config. The config
        is the one read, plus any special token it did not name (taken from ``config.json``, or
        pad defaulting to eos) written in by name, so the saved directory is self-contained;
        ``config.json`` belongs to the model and is not written.
        """
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / HF_FILENAME
        config = dict(self._config)
        for kind, idx in (("eos", self._eos_id), ("pad", self._pad_id), ("bos", self._bos_id)):
            if idx is not None and config.get(f"{kind}_token") is None:
                config[f"{kind}_token"] = self._tok.id_to_token(idx)
        self._tok.save(str(path))
        config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (path.parent / HF_CONFIG_FILENAME).write_text(config_text, encoding="utf-8")

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _piece_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a saved tokenizer.

    Accepts a SentencePiece ``.model`` file, a ``tokenizer.json`` (any ``.json``) file, or a
    directory holding ``tokenizer.json`` or ``tokenizer.model``. A directory with both (typical
    of imported checkpoints) loads ``tokenizer.json``, which carries the full special-token setup.
    """
    path = Path(path)
    expected = (
        f"a SentencePiece .model file, a {HF_FILENAME} file, or a directory containing "
        f"{HF_FILENAME} or {SP_FILENAME}"
    )
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: expected {expected}")
    if path.is_dir():
        if (path / HF_FILENAME).is_file():
            return HFTokenizer.from_pretrained_dir(path)
        if (path / SP_FILENAME).is_file():
            return SentencePieceTokenizer.load(path)
        raise FileNotFoundError(f"directory {path} has neither {HF_FILENAME} nor {SP_FILENAME}")
    if path.suffix == ".model":
        return SentencePieceTokenizer.load(path)
    if path.suffix == ".json":
        return HFTokenizer.from_pretrained_dir(path)
    raise ValueError(f"cannot load a tokenizer from {path}: expected {expected}")
