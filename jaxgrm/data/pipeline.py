"""The input pipeline: grain over a random-access source, to fixed-shape token batches.

    source[i] ─(shard)─ shuffle(seed, per epoch) ─ repeat(num_epochs) ─ map(encode_fn)
        ─ over-long policy (truncate or drop, counted) ─ pad | first-fit pack ─ batch ─> Batch

The source is anything with ``__len__`` and ``__getitem__``: a ``tfds.data_source(...)[split]``
(records go through ``schema.from_tfds_record``) or a list of ``RelevanceExample``. The pipeline
is generic over ``encode_fn(example) -> (input_ids, loss_mask)`` (loss_mask 1 on the tokens the
loss is taken over, e.g. the response), so it knows nothing of prompt rendering.

Grain provides the source, the shard slice, the per-epoch reshuffle (``MapDataset.shuffle`` then
``repeat``), the threaded map, first-fit packing (``grain.experimental.FirstFitPackIterDataset``),
batching and checkpointable iterator state. Written here: the encode step, the over-long policy
with its counters (part of the iterator state, so they resume exactly), padding, and the
conversion to a typed ``Batch``.

Packing (``Mode.PACK``): examples arrive in shuffled order and go to the first of
``num_packing_bins`` rows with room for them; when one fits nowhere, all rows are emitted
(shuffled with the seed) and a new round starts with it. Rows of one batch may come from two
rounds and a round may straddle an epoch boundary. Segment ids number the examples of a row
1, 2, ...; 0 is padding, so attention masked by segment id never crosses examples.

Iterator state (``get_state``/``set_state``) is a JSON-serialisable dict. ``PipelineIterator``
is a ``grain.DatasetIterator``, so grain's orbax handler stores it as is:
``ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))`` (one JSON file per process).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from jaxgrm.data.schema import RelevanceExample, from_tfds_record

log = logging.getLogger(__name__)

EncodeFn = Callable[[RelevanceExample], tuple[Sequence[int], Sequence[int]]]


class Mode(enum.Enum):
    PAD = "pad"  # one example per row, padded to max_len
    PACK = "pack"  # several examples per row, first-fit


class Overlong(enum.Enum):
    TRUNCATE = "truncate"  # keep the first max_len tokens
    DROP = "drop"  # skip the example


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline settings. Strings are accepted for `mode` and `overlong` and made enums.

    batch_size: rows per batch on this host (B). max_len: tokens per row (T).
    num_epochs: passes over the (shard of the) data; None repeats forever.
    seed: shuffling (a new permutation each epoch) and packing-row order.
    drop_remainder: drop a last batch with fewer than batch_size rows.
    num_packing_bins: rows filled per packing round (default batch_size); more bins pack tighter.
    read_threads, prefetch: grain ReadOptions of the encode stage.
    """

    batch_size: int
    max_len: int
    mode: Mode = Mode.PAD
    overlong: Overlong = Overlong.TRUNCATE
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    drop_remainder: bool = True
    pad_id: int = 0
    num_packing_bins: int | None = None
    read_threads: int = 4
    prefetch: int = 256

    def __post_init__(self):
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "overlong", Overlong(self.overlong))
        if self.batch_size < 1 or self.max_len < 1:
            raise ValueError("batch_size and max_len must be positive")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError("num_epochs must be positive or None (forever)")
        if self.num_packing_bins is not None and self.num_packing_bins < 1:
            raise ValueError("num_packing_bins must be positive")
        if self.read_threads < 0 or self.prefetch < 0:
            raise ValueError("read_threads and prefetch must be non-negative")

    @property
    def packing_bins(self) -> int:
        return self.num_packing_bins or self.batch_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Batch(Mapping[str, np.ndarray]):
    """One batch of B rows of T = max_len tokens (numpy int32 arrays, all [B, T]).

    A pytree, and a read-only mapping from field name to array (``batch["tokens_BT"]``), the
    form the train step's objectives take.

    tokens_BT: token ids, pad_id on padding.
    loss_mask_BT: 1 on tokens the loss is taken over (as given by encode_fn), 0 elsewhere.
    segment_ids_BT: 1, 2, ... for the examples of a row (always 1 in pad mode), 0 on padding.
    positions_BT: position within its own example (restarting at 0 per segment), 0 on padding.
    """

    tokens_BT: np.ndarray
    loss_mask_BT: np.ndarray
    segment_ids_BT: np.ndarray
    positions_BT: np.ndarray

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in _BATCH_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_BATCH_FIELDS)

    def __len__(self) -> int:
        return len(_BATCH_FIELDS)


_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(Batch))


# ---- per-example encoding -----------------------------------------------------------------------
def _as_example(record: Any) -> RelevanceExample:
    return record if isinstance(record, RelevanceExample) else from_tfds_record(record)


def _encode(encode_fn: EncodeFn, record: Any) -> dict[str, np.ndarray]:
    ids, mask = encode_fn(_as_example(record))
    tokens = np.asarray(ids, dtype=np.int32)
    loss_mask = np.asarray(mask, dtype=np.int32)
    if tokens.ndim != 1 or tokens.shape != loss_mask.shape or not tokens.size:
        raise ValueError(
            f"encode_fn must return non-empty 1-D ids and loss mask of equal length, got shapes "
            f"{tokens.shape} and {loss_mask.shape}"
        )
    if not np.isin(loss_mask, (0, 1)).all():
        raise ValueError("loss_mask must hold only 0 and 1")
    return {"tokens": tokens, "loss_mask": loss_mask}


# ---- the over-long policy, with checkpointed counters --------------------------------------------
_COUNTERS = ("examples", "truncated", "dropped", "tokens_cut")


class _OverlongIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_len: int, overlong: Overlong):
        super().__init__(parent)
        self._max_len = max_len
        self._overlong = overlong
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self._warned = False

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            element = next(self._parent)
            self.counts["examples"] += 1
            length = len(element["tokens"])
            if length <= self._max_len:
                return element
            if not self._warned:
                self._warned = True
                log.warning(
                    "example of %d tokens exceeds max_len=%d: %s (see PipelineIterator.stats)",
                    length, self._max_len, self._overlong.value,
                )  # fmt: skip
            if self._overlong is Overlong.DROP:
                self.counts["dropped"] += 1
                continue
            self.counts["truncated"] += 1
            self.counts["tokens_cut"] += length - self._max_len
            return {k: v[: self._max_len] for k, v in element.items()}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.counts = {k: int(state["counts"][k]) for k in _COUNTERS}


class _OverlongDataset(grain.IterDataset):
    """Truncates or drops examples longer than max_len, counting both; keeps the live iterator
    so that the pipeline iterator can report the counts."""

    def __init__(self, parent: grain.IterDataset, max_len: int, overlong: Overlong):
        super().__init__(parent)
        self._max_len = max_len
        self._overlong = overlong
        self.iterator: _OverlongIterator | None = None

    def __iter__(self) -> _OverlongIterator:
        self.iterator = _OverlongIterator(self._parent.__iter__(), self._max_len, self._overlong)
        return self.iterator


# ---- rows and batches ---------------------------------------------------------------------------
def _pad_batch(elements: Sequence[dict[str, np.ndarray]], max_len: int, pad_id: int) -> Batch:
    rows = len(elements)
    tokens = np.full((rows, max_len), pad_id, dtype=np.int32)
    loss_mask = np.zeros((rows, max_len), dtype=np.int32)
    segment_ids = np.zeros((rows, max_len), dtype=np.int32)
    positions = np.zeros((rows, max_len), dtype=np.int32)
    for i, element in enumerate(elements):
        n = len(element["tokens"])
        tokens[i, :n] = element["tokens"]
        loss_mask[i, :n] = element["loss_mask"]
        segment_ids[i, :n] = 1
        positions[i, :n] = np.arange(n)
    return Batch(tokens, loss_mask, segment_ids, positions)


def _packed_batch(rows: Sequence[dict[str, np.ndarray]]) -> Batch:
    def stack(key: str) -> np.ndarray:
        return np.stack([row[key] for row in rows]).astype(np.int32)

    return Batch(
        tokens_BT=stack("tokens"),
        loss_mask_BT=stack("loss_mask"),
        segment_ids_BT=stack("tokens_segment_ids"),
        positions_BT=stack("tokens_positions"),
    )


def _shard_bounds(size: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """Contiguous [start, end) of this shard; with drop_remainder every shard has the same size."""
    index, count = options.shard_index, options.shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} is outside [0, {count})")
    per, rest = divmod(size, count)
    if options.drop_remainder:
        return index * per, (index + 1) * per
    start = index * per + min(index, rest)
    return start, start + per + (index < rest)


# ---- the iterator -------------------------------------------------------------------------------
class PipelineIterator(grain.DatasetIterator):
    """Iterator of `Batch`es with exact, JSON-serialisable state; see the module docstring.

    stats: counters over the examples read so far: examples, truncated, dropped, tokens_cut.
    They are part of the state, and may run ahead of the batches returned by up to one packing
    round (pack mode re-reads the open round after `set_state`, so the counters there catch up
    with the next batch).
    """

    def __init__(self, dataset: grain.IterDataset, overlong_stage: _OverlongDataset):
        super().__init__(dataset.__iter__())
        self._stage = overlong_stage.iterator

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stage.counts)


def make_iterator(
    source: Sequence[Any],
    encode_fn: EncodeFn,
    config: PipelineConfig,
    *,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> PipelineIterator:
    """Batches of `source` encoded with `encode_fn` under `config`.

    shard_options: which shard this host reads, e.g. ``grain.sharding.ShardByJaxProcess(
    drop_remainder=True)`` on multi-host jobs (every host then gets the same number of batches);
    None reads everything. Each shard is a contiguous slice, shuffled on its own.
    """
    ds = grain.MapDataset.source(source)
    if shard_options is not None:
        start, end = _shard_bounds(len(ds), shard_options)
        ds = ds[start:end]
    if len(ds) == 0:
        raise ValueError("the source (or this host's shard of it) is empty")
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    ds = ds.map(functools.partial(_encode, encode_fn))
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch)
    stage = _OverlongDataset(ds.to_iter_dataset(read), config.max_len, config.overlong)
    rows: grain.IterDataset = stage
    batch_fn = functools.partial(_pad_batch, max_len=config.max_len, pad_id=config.pad_id)
    if config.mode is Mode.PACK:
        rows = grain.experimental.FirstFitPackIterDataset(
            stage,
            length_struct={"tokens": config.max_len, "loss_mask": config.max_len},
            num_packing_bins=config.packing_bins,
            seed=config.seed,
            shuffle_bins=config.shuffle,
            padding_struct={"tokens": config.pad_id, "loss_mask": 0},
        )
        batch_fn = _packed_batch
    out = rows.batch(config.batch_size, drop_remainder=config.drop_remainder, batch_fn=batch_fn)
    return PipelineIterator(out, stage)
