"""Tokenizers: GPT-2 vocab/merges load identical to transformers' GPT2TokenizerFast,
tokenizer.json round trips, OPT special ids, training, and clear errors."""

from __future__ import annotations

import json

import pytest

from opt_ray.data.tokenizer import (load_tokenizer, save_tokenizer, special_ids, tokenizer_hash,
                                    train_tokenizer)
from opt_ray.errors import UserError

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main(argv):\n    return 0\n\n\tif x  ==  y:\n        pass",
    "Zürich, Ελληνικά, русский, 日本語のテキスト, emoji 🤗🚀 and café au lait.",
    "Numbers 12345 67890 3.14159 and punctuation!?;:'\"()[]{}",
] * 20

VARIED = [
    "Hello world",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines\r\n",
    "Unicode: naïve façade Ångström — “quotes” … ½ ≠ ∞",
    "CJK 中文字符 日本語 한국어, emoji 🤗👍🏽 family 👨‍👩‍👧",
    "code: for i in range(10):\n    print(f'{i:>3}')  # comment",
    "don't can't it's we're THEY'LL I'd",
    "",
    "   ",
    "a" * 300,
    "unseen words: xylophone quizzaciously bezoar",
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2 style vocab.json + merges.txt, trained here with `tokenizers` (OPT's special
    tokens first, as in OPT's released vocabulary)."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TRAIN_TEXT, vocab_size=600, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe.save_model(str(d))
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    return d


def test_vocab_merges_match_transformers(gpt2_dir):
    from transformers import GPT2TokenizerFast

    ref = GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    for tok in (load_tokenizer(gpt2_dir), load_tokenizer(gpt2_dir / "vocab.json")):
        for text in VARIED:
            ids = tok.encode(text, add_special_tokens=False).ids
            assert ids == ref(text, add_special_tokens=False)["input_ids"], text
            assert tok.decode(ids) == ref.decode(ids) == text
        batch = [e.ids for e in tok.encode_batch(VARIED, add_special_tokens=False)]
        assert batch == ref(VARIED, add_special_tokens=False)["input_ids"]


def test_hf_tokenizer_json_loads_the_same(gpt2_dir, tmp_path):
    """An HF checkpoint dir that ships tokenizer.json (written by transformers) loads to
    the same ids and the same hash as the vocab/merges pair."""
    from transformers import GPT2TokenizerFast

    # special tokens as in OPT's tokenizer_config.json
    GPT2TokenizerFast.from_pretrained(str(gpt2_dir), bos_token="</s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>"
                                      ).save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    a, b = load_tokenizer(gpt2_dir), load_tokenizer(tmp_path / "hf")
    for text in VARIED:
        assert a.encode(text, add_special_tokens=False).ids == b.encode(text, add_special_tokens=False).ids
    assert tokenizer_hash(a) == tokenizer_hash(b)


def test_save_load_round_trip_and_hash(gpt2_dir, tmp_path):
    tok = load_tokenizer(gpt2_dir)
    out = save_tokenizer(tok, tmp_path / "t", source={"path": str(gpt2_dir)})
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "tokenizer" and set(m["files"]) >= {"tokenizer.json", "vocab.json", "merges.txt"}
    again = load_tokenizer(out)
    assert tokenizer_hash(again) == tokenizer_hash(tok) == m["tokenizer"]["hash"]
    assert tokenizer_hash(load_tokenizer(out / "vocab.json")) == tokenizer_hash(tok)
    for text in VARIED:
        assert again.encode(text).ids == tok.encode(text).ids
    # a different vocabulary hashes differently
    other = train_tokenizer(TRAIN_TEXT, 300)
    assert tokenizer_hash(other) != tokenizer_hash(tok)


def test_opt_special_ids(gpt2_dir):
    tok = load_tokenizer(gpt2_dir)
    assert special_ids(tok) == {"pad": 1, "bos": 2, "eos": 2}
    # a literal </s> in text is the eos token, not five characters
    assert 2 in tok.encode("end</s>start").ids
    trained = train_tokenizer(TRAIN_TEXT, 500)
    assert special_ids(trained) == {"pad": 1, "bos": 2, "eos": 2}
    assert trained.token_to_id("<s>") == 0 and trained.token_to_id("<unk>") == 3


def test_gpt2_vocab_without_opt_specials(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TRAIN_TEXT, vocab_size=400, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    eot = tok.token_to_id("<|endoftext|>")
    assert special_ids(tok) == {"pad": eot, "bos": eot, "eos": eot}


def test_trained_tokenizer_round_trips_text():
    tok = train_tokenizer(TRAIN_TEXT, 700)
    assert tok.get_vocab_size() <= 700
    for text in VARIED:
        assert tok.decode(tok.encode(text).ids) == text  # byte-level: nothing is lost


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(TRAIN_TEXT, 100)
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(iter(["", ""]), 1000)


def test_cli_load_and_train(gpt2_dir, tmp_path, capsys):
    from opt_ray.cli import main

    assert main(["tokenizer", "load", str(gpt2_dir), "--output", str(tmp_path / "a")]) == 0
    assert tokenizer_hash(load_tokenizer(tmp_path / "a")) == tokenizer_hash(load_tokenizer(gpt2_dir))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN_TEXT))
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "450",
                 "--output", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["tokenizer"]["special_ids"] == {"pad": 1, "bos": 2, "eos": 2}
    assert m["source"]["inputs"][0]["path"] == str(corpus)
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    assert main(["tokenizer", "train", str(empty), "--vocab-size", "450",
                 "--output", str(tmp_path / "e")]) == 2
    assert "no text" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_cli_train_reads_a_sample_of_each_file(tmp_path, capsys):
    # `tokenizer train` read the whole corpus in one process: hundreds of GB at scale.
    # With --sample, each file gives its first records up to its share (by size).
    import random

    from opt_ray.cli import main
    from opt_ray.data.tokenizer import train_tokenizer
    rng = random.Random(0)
    docs = {}
    for name, n in (("a", 300), ("b", 100), ("c", 20)):
        docs[name] = [" ".join(rng.choice(TRAIN_TEXT).split()[:rng.randint(3, 30)]) + f" {name}{i}"
                      for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                        for t in docs[name]))
    sizes = {n: (tmp_path / f"{n}.jsonl").stat().st_size for n in docs}
    budget = 6000
    expect = []                                  # the rule, computed here from the files
    for n in docs:
        share, taken = budget * sizes[n] / sum(sizes.values()), 0
        for t in docs[n]:
            expect.append(t)
            taken += len(t)
            if taken >= share:
                break
    assert 20 < len(expect) < 200 and all(any(t in expect for t in docs[n]) for n in docs)
    assert main(["tokenizer", "train", str(tmp_path), "--vocab-size", "400", "--sample",
                 f"{budget}B", "--output", str(tmp_path / "tok"), "--no-progress"]) == 0
    ref = train_tokenizer(expect, 400)
    assert tokenizer_hash(load_tokenizer(tmp_path / "tok")) == tokenizer_hash(ref)
    m = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert m["source"]["sample"] == {"chars_asked": budget, "chars": sum(map(len, expect)),
                                     "docs": len(expect), "files": 3}
    assert f"trained on {sum(map(len, expect)):,} characters" in capsys.readouterr().out
    # 'all' reads every record; a bad size is one line, before any work.
    assert main(["tokenizer", "train", str(tmp_path / "c.jsonl"), "--vocab-size", "400",
                 "--sample", "all", "--output", str(tmp_path / "all"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert m["source"]["sample"]["docs"] == 20
    assert main(["tokenizer", "train", str(tmp_path), "--vocab-size", "400", "--sample",
                 "lots", "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sample 'lots' is not a size" in err[0]
    assert not (tmp_path / "bad").exists()


def test_encode_prepends_bos_like_opt(gpt2_dir, tmp_path):
    """OPT's HF tokenizer prepends </s> (2); so do ours, and saving keeps it."""
    for tok in (load_tokenizer(gpt2_dir), train_tokenizer(TRAIN_TEXT, 500)):
        bare = tok.encode("Hello world", add_special_tokens=False).ids
        assert tok.encode("Hello world").ids == [2] + bare
        assert tok.decode(tok.encode("Hello world").ids) == "Hello world"
        again = load_tokenizer(save_tokenizer(tok, tmp_path / str(id(tok))))
        assert again.encode("Hello world").ids == [2] + bare
