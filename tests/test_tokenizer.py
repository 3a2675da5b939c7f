"""Tests for jaxgrm.tokenizer: tags as single tokens, exact round trips, persistence, HF adapter."""

import io
import json
import random

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxgrm.tokenizer import (
    TAGS,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

WORDS = [
    *("query", "document", "passage", "relevant", "irrelevant", "score", "rank", "because"),
    *("the", "a", "of", "search", "index", "step", "answer", "model", "evidence", "mentions"),
    *("topic", "title", "2024", "42", "reason"),
]


def make_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        step = rng.randint(1, 3)
        corpus.append(f"<step{step}> {' '.join(words)} </step{step}> <answer> yes </answer>")
    corpus += ["查询 文档 相关", "tabs\tand\nnewlines", "emoji 😀 ok"]
    return corpus


def unicode_cases() -> list[str]:
    """Hand-written awkward strings plus seeded random ones drawn over many code point ranges."""
    cases = [
        "",
        " ",
        "  double  spaces  ",
        " leading",
        "trailing ",
        "\n\nnew\nlines\n",
        "\ttabs\t and \r\n crlf",
        "查询和文档的相关性",
        "emoji 😀🚀👍🏽 family 👨‍👩‍👧",
        "never seen: ᚠᛇᚻ ꙮ 𓂀 ∮ ⅋",
        "literal \u2581 marker \u2581\u2581 and ▁x",
        "nul \x00 and bell \x07",
        "<step1>x</step1><answer>中</answer>",
        "<step1 not a tag <answer",
        "combining e\u0301 and NFC é, ﬁ ligature, full-width ＡＢＣ",
    ]
    rng = random.Random(1234)
    ranges = [(0x20, 0x7F), (0x00, 0x20), (0xA0, 0x2FFF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    ranges.append((0x10000, 0x10FFFF))
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(1, 30)):
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:  # lone surrogates are not valid text
                cp = 0x20
            chars.append(chr(cp))
        cases.append("".join(chars))
    return cases


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(make_corpus(3000, seed=0), vocab_size=400)


# ---------------------------------------------------------------- SentencePiece


def test_special_ids_and_tags(sp_tok):
    assert (sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id) == (0, 1, 2)
    tag_ids = sp_tok.tag_ids
    assert set(tag_ids) == set(TAGS)
    assert len(set(tag_ids.values())) == len(TAGS)
    assert not set(tag_ids.values()) & {0, 1, 2, 3}
    for tag, idx in tag_ids.items():
        assert sp_tok.encode(tag) == [idx]
        assert sp_tok.token_id(tag) == idx
        assert sp_tok.decode([idx]) == tag


def test_tags_found_by_position(sp_tok):
    t = sp_tok.tag_ids
    ids = sp_tok.encode("<step1>a</step1>")
    assert ids[0] == t["<step1>"] and ids[-1] == t["</step1>"]
    assert sp_tok.decode(ids[1:-1]) == "a"
    # Glued to text on both sides, in any order.
    ids = sp_tok.encode("x<step2>yz</step2>w<answer>42</answer>")
    positions = [ids.index(t[tag]) for tag in ("<step2>", "</step2>", "<answer>", "</answer>")]
    assert positions == sorted(positions)
    assert sp_tok.decode(ids[positions[0] + 1 : positions[1]]) == "yz"
    assert sp_tok.decode(ids[positions[2] + 1 : positions[3]]) == "42"
    assert sp_tok.decode(ids[: positions[0]]) == "x"


@pytest.mark.parametrize("text", unicode_cases())
def test_exact_round_trip(sp_tok, text):
    assert sp_tok.decode(sp_tok.encode(text)) == text


def test_unseen_characters_use_byte_fallback(sp_tok):
    ids = sp_tok.encode("𓂀")  # 4 UTF-8 bytes, absent from the corpus
    assert len(ids) == 4
    assert 3 not in ids  # never unk


def test_bos_eos_pad_and_batch(sp_tok):
    ids = sp_tok.encode("query", add_bos=True, add_eos=True)
    assert ids[0] == sp_tok.bos_id and ids[-1] == sp_tok.eos_id
    assert sp_tok.decode(ids) == "query"
    padded = np.array(ids + [sp_tok.pad_id] * 5, dtype=np.int32)
    assert sp_tok.decode(padded) == "query"
    texts = ["a b", "<answer>c</answer>", ""]
    expected = [sp_tok.encode(t, add_eos=True) for t in texts]
    assert sp_tok.encode_batch(texts, add_eos=True) == expected
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sp_tok.decode([sp_tok.vocab_size])
    with pytest.raises(ValueError, match="1-D"):
        sp_tok.decode(np.zeros((2, 2), dtype=np.int32))


def test_token_id_errors_name_the_piece(sp_tok):
    with pytest.raises(KeyError, match="relevance judgement"):
        sp_tok.token_id("relevance judgement")
    assert sp_tok.token_id("<pad>") == 0
    assert sp_tok.token_id("</s>") == 1


def test_training_is_deterministic(sp_tok):
    again = SentencePieceTokenizer.train(make_corpus(3000, seed=0), vocab_size=400)
    assert again.model_proto == sp_tok.model_proto
    text = "the query mentions 2024 <step1> evidence </step1>"
    assert again.encode(text) == sp_tok.encode(text)


def test_small_corpus_soft_limit_and_errors():
    tok = SentencePieceTokenizer.train(["tiny corpus", "tiny"], vocab_size=5000)
    assert 268 < tok.vocab_size < 5000
    assert tok.decode(tok.encode("tiny 中文")) == "tiny 中文"
    with pytest.raises(ValueError, match="too small"):
        SentencePieceTokenizer.train(["tiny corpus"], vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        SentencePieceTokenizer.train([], vocab_size=300)


def test_foreign_sentencepiece_model():
    def train_raw(**kwargs) -> bytes:
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(make_corpus(300, seed=2)),
            model_writer=writer,
            vocab_size=300,
            hard_vocab_limit=False,
            byte_fallback=True,
            minloglevel=2,
            **kwargs,
        )
        return writer.getvalue()

    # Llama-style ids (unk=0, bos=1, eos=2, no pad) and a dummy prefix: ids come from the model.
    tok = SentencePieceTokenizer(train_raw(user_defined_symbols=list(TAGS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    ids = tok.encode("x<answer>y")
    assert tok.tag_ids["<answer>"] in ids
    with pytest.raises(ValueError, match="not a single token"):
        SentencePieceTokenizer(train_raw())


@pytest.mark.parametrize("target", ["file", "dir"])
def test_sp_save_load(sp_tok, tmp_path, target):
    path = tmp_path / "sp.model" if target == "file" else tmp_path / "ckpt"
    sp_tok.save(path)
    expected = path if target == "file" else path / "tokenizer.model"
    assert expected.is_file()
    loaded = load_tokenizer(path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.model_proto == sp_tok.model_proto
    for text in unicode_cases()[:40]:
        assert loaded.encode(text) == sp_tok.encode(text)
    assert loaded.tag_ids == sp_tok.tag_ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    wrong = tmp_path / "weights.bin"
    wrong.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="weights.bin"):
        load_tokenizer(wrong)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory with neither file


# ---------------------------------------------------------------- HF adapter


def build_hf_dir(tmp_path, *, config=None, model_config=None):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(1000, seed=1), trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if model_config is not None:
        (tmp_path / "config.json").write_text(json.dumps(model_config))
    return tok


@pytest.fixture()
def hf_dir(tmp_path):
    config = {"eos_token": "<|endoftext|>", "pad_token": {"content": "<|pad|>"}}
    raw = build_hf_dir(tmp_path, config=config)
    return tmp_path, raw


def test_hf_tags_and_config(hf_dir):
    path, raw = hf_dir
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == raw.token_to_id("<|endoftext|>")
    assert tok.pad_id == raw.token_to_id("<|pad|>")
    assert tok.bos_id is None
    assert tok.added_tags == list(TAGS)
    base = raw.get_vocab_size()
    assert sorted(tok.tag_ids.values()) == list(range(base, base + len(TAGS)))
    assert tok.vocab_size == base + len(TAGS)
    t = tok.tag_ids
    ids = tok.encode("x<step1>y")
    assert ids[1] == t["<step1>"] and len(ids) == 3
    ids = tok.encode("<step1>a</step1>", add_eos=True)
    assert ids[0] == t["<step1>"] and ids[-2] == t["</step1>"] and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<step1>a</step1>"
    with pytest.raises(ValueError, match="no bos"):
        tok.encode("a", add_bos=True)


@pytest.mark.parametrize("text", unicode_cases()[:60])
def test_hf_round_trip(hf_dir, text):
    tok = load_tokenizer(hf_dir[0])
    assert tok.decode(tok.encode(text)) == text


def test_hf_check_fits(hf_dir):
    tok = load_tokenizer(hf_dir[0])
    tok.check_fits(tok.vocab_size)
    tok.check_fits(tok.vocab_size + 64)
    with pytest.raises(ValueError, match=rf"needs {tok.vocab_size} ids.*8 added.*has only 300"):
        tok.check_fits(300)


def test_hf_save_load(hf_dir, tmp_path_factory):
    tok = load_tokenizer(hf_dir[0])
    out = tmp_path_factory.mktemp("saved")
    tok.save(out)
    again = load_tokenizer(out)
    assert again.added_tags == []  # the tags now live in the saved vocabulary
    assert again.tag_ids == tok.tag_ids
    assert again.eos_id == tok.eos_id and again.pad_id == tok.pad_id
    assert again.vocab_size == tok.vocab_size
    for text in unicode_cases()[:40]:
        assert again.encode(text) == tok.encode(text)


def test_hf_model_config_fallback_and_missing_eos(tmp_path):
    raw = build_hf_dir(tmp_path, model_config={"eos_token_id": [0, 1], "bos_token_id": 1})
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, 0)  # pad falls back to eos
    assert tok.encode("a", add_bos=True)[0] == 1
    out = tmp_path / "saved"
    tok.save(out)  # config.json is not written; its ids are recorded by name instead
    assert not (out / "config.json").exists()
    again = load_tokenizer(out)
    assert (again.eos_id, again.bos_id, again.pad_id) == (0, 1, 0)
    with pytest.raises(ValueError, match="no eos token"):
        HFTokenizer(raw)
    with pytest.raises(ValueError, match="<missing>"):
        HFTokenizer(raw, {"eos_token": "<missing>"})


def test_hf_tag_already_in_vocab_is_reused():
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<answer>"] = len(vocab)
    raw = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = HFTokenizer(raw, {"eos_token": "!"})
    assert "<answer>" not in tok.added_tags and len(tok.added_tags) == len(TAGS) - 1
    assert tok.tag_ids["<answer>"] == vocab["<answer>"]
    assert tok.encode("a<answer>b")[1] == vocab["<answer>"]
    assert raw.get_vocab_size(with_added_tokens=True) == len(vocab)  # caller's object untouched
