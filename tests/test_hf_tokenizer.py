"""Tests for tasks.hf_tokenizer: a Hugging Face tokenizer behind the Tokenizer protocol, against `transformers`."""

import re

import datasets
import numpy as np
import pytest

import tasks
from tasks.hf_tokenizer import HFTokenizer
from tasks.tokenizer import ByteTokenizer, load_tokenizer
from tests import hf_fixtures

transformers = pytest.importorskip("transformers")

TEXTS = ["the cat sat", "  grüße aus 東京 ! ", "hyphenation tokenizers", "zzqx 123,456", "", "a\tb\nc"]


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def folder(request, tmp_path_factory):
    return hf_fixtures.train_bpe(str(tmp_path_factory.mktemp(request.param)), metaspace=request.param == "metaspace")


def test_matches_transformers_tokenizer(folder):
    ours = HFTokenizer.from_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, tasks.Tokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.eos_ids == (2, 3)  # generation_config.json lists two
    assert ours.never_generated == (1, 0)  # BOS and PAD; the newline separator may be generated
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode([*ids, 3, *ids]) == theirs.decode(ids, skip_special_tokens=True)  # stops at any EOS
        assert ours.prompt_ids(text) == [theirs.bos_token_id, *theirs(text + "\n", add_special_tokens=False).input_ids]


def test_word_ends_are_each_words_last_sub_word(folder):
    ours = HFTokenizer.from_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        offsets = theirs(text + "\n", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        expected = []
        for m in re.finditer(r"\S+", text):
            last = max(i for i, (s, e) in enumerate(offsets) if s < m.end() and e > m.start())
            expected.append(1 + last)  # after BOS
            assert last + 1 == len(offsets) - 1 or offsets[last + 1][0] >= m.end()  # the next token is past the word
        assert ours.word_ends(text) == expected
        assert tasks.word_ends(text, ours) == expected


def test_save_keeps_ids_and_template(folder, tmp_path):
    tok = HFTokenizer.from_folder(folder, template="Q: {input}\nA:")
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, HFTokenizer)
    assert (back.bos_id, back.eos_ids, back.pad_id, back.template) == (1, (2, 3), 0, "Q: {input}\nA:")
    assert back.prompt_ids("the cat") == tok.prompt_ids("the cat") == [1, *tok.encode("Q: the cat\nA:")]
    assert (tmp_path / "tokenizer_config.json").exists() and (tmp_path / "generation_config.json").exists()
    assert isinstance(load_tokenizer(tmp_path / "nothing"), ByteTokenizer)
    with pytest.raises(ValueError, match="exactly once"):
        HFTokenizer.from_folder(folder, template="no input here")


def test_tag_and_generate_layouts_with_sub_words(folder):
    tok = HFTokenizer.from_folder(folder)
    ds = datasets.Dataset.from_dict({"input": ["hyphenation tokenizers sat"], "tags": [["A", "B", "A"]]})
    enc = tasks.encode_split("tag", ds, tok, max_len=64, labels=("A", "B"))
    ends = tok.word_ends("hyphenation tokenizers sat")
    row = enc.arrays["tags"][0]
    assert np.flatnonzero(row >= 0).tolist() == ends and row[ends].tolist() == [0, 1, 0]
    probs = np.eye(2)[np.where(row >= 0, row, 0)]  # [T, C]: the right tag at every word end
    assert tasks.tags_at_word_ends(probs, "hyphenation tokenizers sat", tok) == [0, 1, 0]

    gen = datasets.Dataset.from_dict({"input": ["the cat"], "target": ["sat on"]})
    enc = tasks.encode_split("generate", gen, tok, max_len=64)
    prompt, target = tok.prompt_ids("the cat"), tok.encode("sat on")
    seq = prompt + target + [tok.eos_id]
    n = len(seq) - 1
    assert enc.arrays["tokens"][0, :n].tolist() == seq[:-1]
    assert enc.arrays["targets"][0, :n].tolist() == seq[1:]
    assert enc.arrays["loss_mask"][0].tolist()[:n] == [0] * (len(prompt) - 1) + [1] * (len(target) + 1)
