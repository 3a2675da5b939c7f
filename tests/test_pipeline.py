"""The grain input pipeline: padding, packing, shuffling, sharding, over-long policy, resume."""

import json

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxgrm.data import pipeline as pl
from jaxgrm.data import schema

ID_BASE = 1000  # the first token of every encoding is ID_BASE + example index
PAD = 0


def _examples(n: int, max_words: int = 9) -> list[schema.RelevanceExample]:
    rng = np.random.default_rng(n)
    return [
        schema.RelevanceExample(
            qid=f"q{i // 3}",
            query=f"query {i // 3}",
            doc=" ".join(["word"] * int(rng.integers(1, max_words + 1))),
            label=i % 5 - 1,
            scale="xhs5",
            source="test",
            meta={"index": i},
        )
        for i in range(n)
    ]


def encode(ex: schema.RelevanceExample) -> tuple[list[int], list[int]]:
    """[id] + one token per doc word (prompt) + 1-3 response tokens (loss_mask 1)."""
    index = ex.meta["index"]
    prompt = [ID_BASE + index] + [10 + k for k in range(len(ex.doc.split()))]
    response = [50 + ex.label] * (1 + index % 3)
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def _config(**kw) -> pl.PipelineConfig:
    kw = {"batch_size": 4, "max_len": 16, "read_threads": 2, "prefetch": 16} | kw
    return pl.PipelineConfig(**kw)


def _segments(batch: pl.Batch):
    """Yield (tokens, loss_mask, positions) of every example in the batch."""
    for b in range(batch.tokens_BT.shape[0]):
        seg = batch.segment_ids_BT[b]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
            yield batch.tokens_BT[b, idx], batch.loss_mask_BT[b, idx], batch.positions_BT[b, idx]


def _check_rows(batches, examples, max_len, truncated=False):
    """Each segment is one whole encoded example; padding is empty. Returns example indices."""
    seen = []
    for batch in batches:
        assert batch.tokens_BT.shape[1] == max_len
        for f in (batch.tokens_BT, batch.loss_mask_BT, batch.segment_ids_BT, batch.positions_BT):
            assert f.dtype == np.int32 and f.shape == batch.tokens_BT.shape
        pad = batch.segment_ids_BT == 0
        assert (batch.tokens_BT[pad] == PAD).all() and (batch.loss_mask_BT[pad] == 0).all()
        assert (batch.positions_BT[pad] == 0).all()
        for tokens, mask, positions in _segments(batch):
            index = int(tokens[0]) - ID_BASE
            want_tokens, want_mask = encode(examples[index])
            if truncated:
                want_tokens, want_mask = want_tokens[:max_len], want_mask[:max_len]
            np.testing.assert_array_equal(tokens, want_tokens)
            np.testing.assert_array_equal(mask, want_mask)
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            seen.append(index)
    return seen


def _same(a: list[pl.Batch], b: list[pl.Batch]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(
            jax.tree.leaves(p), jax.tree.leaves(q), strict=True
        )
    )  # fmt: skip


def test_pad_mode_rows_and_masks():
    examples = _examples(30)
    it = pl.make_iterator(examples, encode, _config(drop_remainder=False))
    batches = list(it)
    assert [b.tokens_BT.shape[0] for b in batches] == [4] * 7 + [2]
    assert (np.stack([b.segment_ids_BT.max(axis=1) for b in batches[:-1]]) == 1).all()
    assert sorted(_check_rows(batches, examples, 16)) == list(range(30))
    assert it.stats == {"examples": 30, "truncated": 0, "dropped": 0, "tokens_cut": 0}
    assert len(jax.tree.leaves(batches[0])) == 4  # a pytree for jit
    as_dict = dict(batches[0])  # and a mapping, as the train step's objectives read it
    assert sorted(as_dict) == ["loss_mask_BT", "positions_BT", "segment_ids_BT", "tokens_BT"]
    assert as_dict["tokens_BT"] is batches[0].tokens_BT
    doubled = jax.tree.map(lambda x: 2 * x, batches[0])
    assert isinstance(doubled, pl.Batch) and (doubled["positions_BT"] % 2 == 0).all()


def test_pack_mode_keeps_every_token_in_its_segment():
    examples = _examples(40)
    cfg = _config(mode="pack", drop_remainder=False, num_packing_bins=8)
    packed = list(pl.make_iterator(examples, encode, cfg))
    padded = list(pl.make_iterator(examples, encode, _config(drop_remainder=False)))
    assert sorted(_check_rows(packed, examples, 16)) == list(range(40))
    assert sum(b.segment_ids_BT.max(axis=1).sum() for b in packed) == 40
    assert max(int(b.segment_ids_BT.max()) for b in packed) >= 2  # really packed
    assert sum(b.tokens_BT.shape[0] for b in packed) < 40
    want_loss = sum(sum(encode(ex)[1]) for ex in examples)
    assert sum(int(b.loss_mask_BT.sum()) for b in packed) == want_loss
    assert sum(int(b.loss_mask_BT.sum()) for b in padded) == want_loss
    want_tokens = sum(len(encode(ex)[0]) for ex in examples)
    assert sum(int((b.segment_ids_BT > 0).sum()) for b in packed) == want_tokens


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_seeded_shuffle_is_deterministic_and_differs_per_epoch(mode):
    examples = _examples(24)

    def first_tokens(seed):
        cfg = _config(mode=mode, seed=seed, num_epochs=2, drop_remainder=False)
        batches = list(pl.make_iterator(examples, encode, cfg))
        return batches, [int(t[0][0]) - ID_BASE for b in batches for t in _segments(b)]

    batches_a, order_a = first_tokens(3)
    batches_b, order_b = first_tokens(3)
    _, order_c = first_tokens(4)
    assert _same(batches_a, batches_b) and order_a == order_b
    assert order_a != order_c
    if mode == "pad":  # epoch by epoch: each a permutation, and a different one
        first, second = order_a[:24], order_a[24:]
        assert sorted(first) == sorted(second) == list(range(24)) and first != second
    else:
        assert sorted(order_a) == sorted(list(range(24)) * 2)


def test_no_shuffle_keeps_source_order():
    examples = _examples(8)
    it = pl.make_iterator(examples, encode, _config(shuffle=False))
    assert [int(t[0][0]) - ID_BASE for b in it for t in _segments(b)] == list(range(8))


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_exact_resume_from_saved_state(mode):
    examples = _examples(37, max_words=20)  # some over-long: counters must resume too
    cfg = _config(mode=mode, num_epochs=None, seed=11)
    it = pl.make_iterator(examples, encode, cfg)
    for _ in range(13):  # past the first epoch boundary
        next(it)
    saved = json.loads(json.dumps(it.get_state()))
    stats = it.stats
    assert stats["truncated"] > 0
    want = [next(it) for _ in range(9)]
    want_stats = it.stats

    fresh = pl.make_iterator(examples, encode, cfg)
    next(fresh)  # a used iterator is restored just as well
    fresh.set_state(saved)
    if mode == "pad":  # the packer re-reads the open packing round after a restore
        assert fresh.stats == stats
    got = [next(fresh) for _ in range(9)]
    assert _same(want, got)
    assert fresh.stats == want_stats


def test_grain_orbax_handler_roundtrip(tmp_path):
    """PipelineIterator is a grain DatasetIterator, so grain's checkpoint handler stores it."""
    examples = _examples(20)
    cfg = _config(mode="pack", num_epochs=None)
    it = pl.make_iterator(examples, encode, cfg)
    for _ in range(3):
        next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, item=it)
    want = [next(it) for _ in range(4)]
    fresh = handler.restore(tmp_path, item=pl.make_iterator(examples, encode, cfg))
    assert _same(want, [next(fresh) for _ in range(4)])


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_two_hosts_read_disjoint_shards(mode):
    examples = _examples(41)

    def read(index, drop_remainder):
        shard = grain.sharding.ShardOptions(index, 2, drop_remainder=drop_remainder)
        cfg = _config(mode=mode, drop_remainder=False, seed=5)
        it = pl.make_iterator(examples, encode, cfg, shard_options=shard)
        return _check_rows(list(it), examples, 16)

    a, b = read(0, False), read(1, False)
    assert not set(a) & set(b) and sorted(a + b) == list(range(41))
    a, b = read(0, True), read(1, True)
    assert len(a) == len(b) == 20 and not set(a) & set(b)
    with pytest.raises(ValueError, match="shard_index"):
        read(2, True)
    everything = grain.sharding.ShardByJaxProcess(drop_remainder=True)  # one process here
    it = pl.make_iterator(examples, encode, _config(drop_remainder=False), shard_options=everything)
    assert sorted(_check_rows(list(it), examples, 16)) == list(range(41))


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_overlong_examples_are_truncated_or_dropped_and_counted(mode):
    examples = _examples(30, max_words=20)
    lengths = np.array([len(encode(ex)[0]) for ex in examples])
    max_len = 14
    long = np.flatnonzero(lengths > max_len)
    assert 0 < len(long) < 30

    cfg = _config(mode=mode, max_len=max_len, drop_remainder=False)
    it = pl.make_iterator(examples, encode, cfg)
    seen = _check_rows(list(it), examples, max_len, truncated=True)
    assert sorted(seen) == list(range(30))
    cut = int((lengths[long] - max_len).sum())
    assert it.stats == {"examples": 30, "truncated": len(long), "dropped": 0, "tokens_cut": cut}

    it = pl.make_iterator(examples, encode, pl.PipelineConfig(**{**vars(cfg), "overlong": "drop"}))
    seen = _check_rows(list(it), examples, max_len)
    assert sorted(seen) == sorted(set(range(30)) - set(long.tolist()))
    assert it.stats == {"examples": 30, "truncated": 0, "dropped": len(long), "tokens_cut": 0}


class JaxgrmPipelineToy(tfds.core.GeneratorBasedBuilder):
    """A tiny array_record data set written with the schema's TFDS features."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=schema.tfds_features(), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, ex in enumerate(_examples(12)):
            yield i, schema.to_tfds_record(ex)


def test_reads_a_tfds_data_source(tmp_path):
    builder = JaxgrmPipelineToy(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = tfds.data_source("jaxgrm_pipeline_toy", data_dir=str(tmp_path), split="train")
    it = pl.make_iterator(source, encode, _config(mode="pack", drop_remainder=False))
    assert sorted(_check_rows(list(it), _examples(12), 16)) == list(range(12))


def test_config_and_encode_validation():
    cfg = pl.PipelineConfig(batch_size=2, max_len=8, mode="pack", overlong="drop")
    assert cfg.mode is pl.Mode.PACK and cfg.overlong is pl.Overlong.DROP
    assert cfg.packing_bins == 2
    for bad in ({"mode": "zip"}, {"batch_size": 0}, {"num_epochs": 0}):
        with pytest.raises(ValueError):
            pl.PipelineConfig(**{"batch_size": 2, "max_len": 8} | bad)
    with pytest.raises(ValueError, match="empty"):
        pl.make_iterator([], encode, cfg)

    def bad_encode(ex):
        return [1, 2, 3], [0, 1]

    it = pl.make_iterator(_examples(4), bad_encode, _config(read_threads=0))
    with pytest.raises(ValueError, match="equal length"):
        next(it)
