"""Tests for tasks.tokenizer and tasks.data: the array layout the model trains on."""

import datasets
import numpy as np
import pytest

import tasks
from tasks import ByteTokenizer, encode_split, labels_of, prompt_ids

TOK = ByteTokenizer()
PAD, BOS, EOS, SEP = 0, 1, 2, 3


def b(text):
    """Token ids of text, written out the slow way: 4 + each UTF-8 byte."""
    return [4 + x for x in text.encode("utf-8")]


# --- tokenizer ----------------------------------------------------------------


def test_byte_tokenizer_ids():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.sep_id, TOK.vocab_size) == (0, 1, 2, 3, 260)
    assert TOK.encode("hi") == [4 + 104, 4 + 105]
    assert TOK.encode("é") == [4 + 0xC3, 4 + 0xA9]
    assert isinstance(TOK, tasks.Tokenizer)


def test_byte_tokenizer_round_trip_and_decode_rules():
    text = "Grüße, 東京! HH AH0"
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.decode([BOS, *b("ab"), SEP, *b("c"), EOS, *b("zzz")]) == "abc"  # drops specials, stops at EOS
    assert TOK.decode([4 + 0xC3]) == "\ufffd"  # a cut character is replaced, not raised


# --- generate -----------------------------------------------------------------


def _generate_ds(pairs):
    return datasets.Dataset.from_dict({"input": [p[0] for p in pairs], "target": [p[1] for p in pairs]})


def test_generate_layout_token_by_token():
    enc = encode_split("generate", _generate_ds([("ab", "xyz")]), TOK, max_len=64, task_id=5)
    # seq = BOS a b SEP x y z EOS (8 ids); rows are 7 long, rounded up to 8.
    assert enc.length == 8 and enc.dropped == 0
    a, bb = b("ab")
    x, y, z = b("xyz")
    np.testing.assert_array_equal(enc.arrays["tokens"][0], [BOS, a, bb, SEP, x, y, z, PAD])
    np.testing.assert_array_equal(enc.arrays["targets"][0], [a, bb, SEP, x, y, z, EOS, PAD])
    # 1 where the target is x, y, z or EOS: from the SEP position to the one predicting EOS.
    np.testing.assert_array_equal(enc.arrays["loss_mask"][0], [0, 0, 0, 1, 1, 1, 1, 0])
    batch = enc.batch([0, 0])
    assert batch["tokens"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["task_id"], [5, 5])
    assert batch["task_id"].dtype == np.int32
    assert enc.inputs == ["ab"] and enc.references == ["xyz"]


def test_generate_full_length_row_and_drops():
    # "abcd" -> "efg": seq is 1+4+1+3+1 = 10 ids, a row of 9.
    ds = _generate_ds([("abcd", "efg"), ("a", "b"), ("abcdefgh", "ijklmnop")])
    enc = encode_split("generate", ds, TOK, max_len=9)
    assert enc.length == 9 and enc.dropped == 1  # the third row (18) is too long
    assert enc.inputs == ["abcd", "a"] and enc.references == ["efg", "b"]
    np.testing.assert_array_equal(enc.arrays["tokens"][0], [BOS, *b("abcd"), SEP, *b("efg")])
    np.testing.assert_array_equal(enc.arrays["targets"][0], [*b("abcd"), SEP, *b("efg"), EOS])
    np.testing.assert_array_equal(enc.arrays["loss_mask"][0], [0, 0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(enc.arrays["tokens"][1], [BOS, *b("a"), SEP, *b("b"), 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(enc.arrays["loss_mask"][1], [0, 0, 1, 1, 0, 0, 0, 0, 0])


def test_generate_length_rounds_up_to_8_but_not_past_max_len():
    ds = _generate_ds([("abcdefgh", "ijk")])  # row of 1+8+1+3 = 13
    assert encode_split("generate", ds, TOK, max_len=64).length == 16
    assert encode_split("generate", ds, TOK, max_len=14).length == 14


def test_prompt_is_the_training_prefix():
    assert prompt_ids(TOK, "hello") == [BOS, *b("hello"), SEP]
    enc = encode_split("generate", _generate_ds([("hello", "HH AH0 L OW1")]), TOK, max_len=64)
    prompt = prompt_ids(TOK, "hello")
    np.testing.assert_array_equal(enc.arrays["tokens"][0, : len(prompt)], prompt)


def test_g2p_encodes_every_example_consistently():
    split = tasks.get("g2p").load()["validation"]
    enc = encode_split("generate", split, TOK, max_len=64)
    assert len(enc) + enc.dropped == split.num_rows
    assert enc.arrays["tokens"].shape == (len(enc), enc.length)
    # Reading the masked targets back gives the reference, for every example.
    mask = enc.arrays["loss_mask"].astype(bool)
    for i in range(len(enc)):
        assert TOK.decode(enc.arrays["targets"][i][mask[i]]) == enc.references[i]
        assert mask[i].sum() == len(b(enc.references[i])) + 1
    # tokens are targets shifted right by one.
    np.testing.assert_array_equal(enc.arrays["tokens"][:, 1:][mask[:, 1:]], enc.arrays["targets"][:, :-1][mask[:, 1:]])


# --- classify -----------------------------------------------------------------


def test_classify_layout():
    ds = datasets.Dataset.from_dict({"input": ["hej", "ciao!"], "label": ["sv", "it"]})
    enc = encode_split("classify", ds, TOK, max_len=64, labels=("de", "it", "sv"), task_id=1)
    assert enc.length == 8
    np.testing.assert_array_equal(enc.arrays["tokens"][0], [BOS, *b("hej"), SEP, 0, 0, 0])
    np.testing.assert_array_equal(enc.arrays["tokens"][1], [BOS, *b("ciao!"), SEP, 0])
    np.testing.assert_array_equal(enc.arrays["lengths"], [5, 7])
    np.testing.assert_array_equal(enc.arrays["label"], [2, 1])
    batch = enc.batch(np.array([1]))
    assert {k: v.dtype for k, v in batch.items()} == {
        "tokens": np.int32,
        "lengths": np.int32,
        "label": np.int32,
        "task_id": np.int32,
    }
    np.testing.assert_array_equal(batch["task_id"], [1])
    assert enc.references == ["sv", "it"]


def test_classify_drops_long_and_rejects_unknown_label():
    ds = datasets.Dataset.from_dict({"input": ["ab", "abcdefgh"], "label": ["x", "y"]})
    enc = encode_split("classify", ds, TOK, max_len=4, labels=("x", "y"))
    assert enc.dropped == 1 and enc.inputs == ["ab"] and enc.length == 4
    with pytest.raises(ValueError, match="'y'.*x"):
        encode_split("classify", ds, TOK, max_len=64, labels=("x",))
    with pytest.raises(ValueError, match="labels="):
        encode_split("classify", ds, TOK, max_len=64)


def test_labels_of_spans_all_splits():
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input": ["a", "b"], "label": ["z", "a"]}),
            "validation": datasets.Dataset.from_dict({"input": ["c"], "label": ["m"]}),
            "test": datasets.Dataset.from_dict({"input": [], "label": []}),
        }
    )
    assert labels_of(dd) == ("a", "m", "z")


def test_langid_encodes():
    dd = tasks.get("langid").load()
    labels = labels_of(dd)
    enc = encode_split("classify", dd["test"], TOK, max_len=128, labels=labels)
    assert enc.dropped == 0 and len(enc) == dd["test"].num_rows
    assert [labels[i] for i in enc.arrays["label"]] == enc.references


def test_unknown_kind_is_refused():
    ds = datasets.Dataset.from_dict({"input": ["a"], "value": [1.0]})
    with pytest.raises(ValueError, match="'rank'"):
        encode_split("rank", ds, TOK, max_len=8)


# --- regress and tag ------------------------------------------------------------


def test_regress_layout():
    ds = datasets.Dataset.from_dict({"input": ["ok", "a much longer input"], "value": [1.5, -2.0]})
    enc = encode_split("regress", ds, TOK, max_len=8)
    assert len(enc) == 1 and enc.dropped == 1  # 1 + 19 + 1 tokens do not fit 8
    assert enc.arrays["tokens"][0, :4].tolist() == [BOS, *b("ok"), SEP]
    assert enc.arrays["lengths"].tolist() == [4]
    assert enc.arrays["value"].dtype == np.float32 and enc.arrays["value"].tolist() == [1.5]
    assert enc.references == [1.5]


def test_word_ends_count_bytes_after_bos():
    assert tasks.word_ends("ab  cde f") == [2, 7, 9]
    assert tasks.word_ends(" é x") == [3, 5]  # é is two bytes
    text = "na ïve words"
    ids = prompt_ids(TOK, text)
    for end, word in zip(tasks.word_ends(text), text.split()):
        assert ids[end] == TOK.encode(word)[-1]  # the word's last byte


def test_tag_layout():
    ds = datasets.Dataset.from_dict({"input": ["the cat  sat"], "tags": [["D", "N", "V"]]})
    labels = labels_of(datasets.DatasetDict({"train": ds}))
    assert labels == ("D", "N", "V")
    enc = encode_split("tag", ds, TOK, max_len=32, labels=labels)
    tags = enc.arrays["tags"][0]
    expected = np.full(enc.length, -1)
    expected[[3, 7, 12]] = [0, 1, 2]  # last bytes of "the", "cat", "sat"
    np.testing.assert_array_equal(tags, expected)
    assert enc.arrays["lengths"].tolist() == [len(prompt_ids(TOK, "the cat  sat"))]
    probs = np.zeros((enc.length, 3))
    probs[[3, 7, 12], [2, 1, 0]] = 1.0
    assert tasks.tags_at_word_ends(probs, "the cat  sat") == [2, 1, 0]


def test_tag_rejects_unknown_tag_and_count_mismatch():
    ds = datasets.Dataset.from_dict({"input": ["a b"], "tags": [["X", "Y"]]})
    with pytest.raises(ValueError, match="'Y'"):
        encode_split("tag", ds, TOK, max_len=16, labels=("X",))
    ds = datasets.Dataset.from_dict({"input": ["a b"], "tags": [["X"]]})
    with pytest.raises(ValueError, match="2 words but 1 tags"):
        encode_split("tag", ds, TOK, max_len=16, labels=("X",))


def test_builtin_regress_and_tag_encode():
    for name, column in (("valence", "value"), ("hyphenate", "tags")):
        dd = tasks.get(name).load()
        enc = encode_split(tasks.get(name).kind, dd["validation"], TOK, max_len=64, labels=labels_of(dd) or None)
        assert len(enc) == len(dd["validation"]) - enc.dropped > 0
        assert column in enc.arrays
