"""Tokenizers: CLIP's vocabulary layout and ids (against open_clip), and a BPE trained on captions."""

from __future__ import annotations

import gzip
import pickle

import pytest
import torch
from reference import ensure_reference_env, openclip_file, run_reference

from data.synthetic import caption_for, make_scene
from data.tokenizer import Tokenizer, build_tokenizer, bytes_to_unicode, clip_tokenizer, train_bpe

SYMBOLS = bytes_to_unicode()


@pytest.fixture
def tiny_merges(tmp_path):
    """A CLIP-format merges file with 5 merges: r+e, re+d</w>, c+a, ca+t</w>, a</w> is a byte token."""
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    lines = ["#version: 0.2", "r e", "re d</w>", "c a", "ca t</w>", "s q"]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    return path


def test_clip_layout_from_a_merges_file(tiny_merges):
    tok = clip_tokenizer(tiny_merges, context_length=8)
    assert tok.vocab_size == 512 + 5 + 2
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (517, 518, 0)
    assert tok.token_to_id("!") == 0 and tok.token_to_id("a</w>") == 256 + SYMBOLS.index("a")
    assert tok.token_to_id("red</w>") == 513 and tok.token_to_id("cat</w>") == 515
    ids = tok("A  Red  CAT")  # lowercased, whitespace collapsed
    assert ids.dtype == torch.long and ids.shape == (1, 8)
    assert ids[0].tolist() == [517, 256 + SYMBOLS.index("a"), 513, 515, 518, 0, 0, 0]


def test_truncation_keeps_eot_last_and_batches_pad(tiny_merges):
    tok = clip_tokenizer(tiny_merges, context_length=5)
    ids = tok(["red cat red cat red cat", "cat"])
    assert ids.shape == (2, 5)
    assert ids[0].tolist() == [517, 513, 515, 513, 518]
    assert ids[1].tolist() == [517, 515, 518, 0, 0]
    # a caption that spells out a start token (open_clip's ids: the literal is sot) is cut the same way
    assert tok(["<start_of_text> red cat red cat"])[0].tolist() == [517, 517, 513, 515, 518]


def test_html_entities_and_decode(tiny_merges):
    tok = clip_tokenizer(tiny_merges, context_length=16)
    assert tok("red &amp; cat").tolist() == tok("red & cat").tolist()
    assert tok.decode(tok("red cat sq")[0]).strip() == "red cat sq"


def test_save_load_pickle_and_context_length(tiny_merges, tmp_path):
    tok = clip_tokenizer(tiny_merges, context_length=8)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"], "no temporary file left behind"
    loaded = Tokenizer.load(path)
    texts = ["a red cat", "cat red red"]
    assert torch.equal(loaded(texts), tok(texts))
    assert torch.equal(pickle.loads(pickle.dumps(tok))(texts), tok(texts))  # DataLoader workers
    wide = tok.with_context_length(12)
    assert wide(texts).shape == (2, 12) and torch.equal(wide(texts)[:, :8], tok(texts))


def captions(n: int = 400, seed: int = 0) -> list[str]:
    return [caption_for(make_scene(seed, i), seed, i) for i in range(n)]


def test_trained_bpe_round_trips_and_is_deterministic():
    corpus = captions()
    tok = train_bpe(corpus, vocab_size=700, context_length=32)
    assert tok.vocab_size <= 700
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    for caption in corpus[:50]:
        ids = tok.encode(caption)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids).strip() == caption.lower()
    assert len(tok.encode(corpus[0])) < len(corpus[0]) / 2, "the BPE learned whole words"
    unseen = tok(["zebra über 日本 🦓"])  # bytes never seen in training still encode
    assert unseen.shape == (1, 32) and (unseen[0] != 3).all(), "no <unk>"
    again = train_bpe(list(corpus), vocab_size=700, context_length=32)
    assert torch.equal(again(corpus[:20]), tok(corpus[:20]))


def test_build_tokenizer_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'; valid kinds: 'clip', 'bpe'"):
        build_tokenizer("wordpiece", context_length=8)
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer.path"):
        build_tokenizer("clip", path=tmp_path / "missing.txt.gz", context_length=77)
    with pytest.raises(ValueError, match=r"data.tokenizer.path is not set and no captions"):
        build_tokenizer("bpe", context_length=8)
    with pytest.raises(ValueError, match="vocab_size must be >= 516"):
        train_bpe(["a"], vocab_size=100)


def test_build_tokenizer_trains_saves_and_reloads_a_bpe(tmp_path):
    path = tmp_path / "tokenizer.json"
    tok = build_tokenizer("bpe", path=path, context_length=16, vocab_size=600, captions=captions(100))
    assert path.exists()
    again = build_tokenizer("bpe", path=path, context_length=24, captions=None)
    assert again.context_length == 24 and again.vocab_size == tok.vocab_size
    assert torch.equal(again(["two red circles"])[:, :16], tok(["two red circles"]))


# ---- against open_clip's own tokenizer (reference environment in a subprocess) ---------------------

REFERENCE_TEXTS = [
    "a diagram",
    "A photo of a CAT.",
    "two red circles left of a blue square",
    "",
    " ",
    "don't stop: it's 3.14!",
    "We'll see; they've gone, I'm here, you'd know",
    "naïve café résumé",
    "日本語のテキスト",
    "emoji 🦓🔥 ok",
    "tom &amp; jerry &lt;3",
    "multiple    spaces\tand\nnewlines",
    "hyphen-ated words and under_scores",
    "numbers 1234567890 and 1,000,000",
    "ALL CAPS SHOUTING",
    "mixed123abc456",
    "punctuation!!! ??? ...",
    "url https://example.com/a?b=c",
    "quotes \"double\" and 'single'",
    "a " + "very " * 100 + "long caption",
    "Ünïcödé façade naïveté",
    "tab\tseparated",
    "<|endoftext|> literal",
    "x" * 300,
    # web captions: what ftfy and open_clip's literal special tokens change
    "“Curly quotes” and ‘single’ ones",
    "It’s a dog’s life",
    "Ã©tÃ© Ã  Paris",  # mojibake: UTF-8 read as Latin-1
    "cafÃ© crÃ¨me",
    "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ １２３",  # full-width forms
    "Crème brûlée à la française",
    "e\u0301cole (combining accent)",
    "a cat 🐱 with a 🎩 hat 👍🏽",
    "東京タワーの夜景",
    "北京 上海 广州",
    "한국어 캡션",
    "Fish &amp; Chips &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &eacute;",
    "&amp;amp; double-escaped",
    "<start_of_text> literal start",
    "ends with <end_of_text> literal",
    "<END_OF_TEXT>",
    "a <end_of_text> " + "very " * 100,
    "<|startoftext|> and <|endoftext|> in text",
    "ﬁne ligature ﬂow",
    "soft\u00adhyphen and zero\u200bwidth",
    "Ⅻ roman numeral ½ fraction ² superscript",
    "…ellipsis — em dash – en dash",
    "¡Hola! ¿Qué tal?",
    "Ελληνικά και Русский текст",
    "עברית ועربية",
] + [caption_for(make_scene(7, i), 7, i) for i in range(200)]


@pytest.mark.slow
def test_clip_ids_equal_open_clip_on_the_real_vocabulary():
    env = ensure_reference_env()
    vocab = openclip_file(env, "bpe_simple_vocab_16e6.txt.gz")
    ours = clip_tokenizer(vocab, context_length=77)
    assert ours.vocab_size == 49408
    assert ours("a diagram")[0, :5].tolist() == [49406, 320, 22697, 49407, 0]
    theirs = run_reference(
        env,
        """
        import importlib.util, os
        spec = importlib.util.spec_from_file_location("oc_tokenizer", os.path.join(ENV, "open_clip", "tokenizer.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # open_clip's tokenizer module alone: no torchvision needed
        outputs["ids"] = module.tokenize(inputs["texts"], context_length=77)
    """,
        {"texts": REFERENCE_TEXTS},
    )["ids"]
    mismatched = [
        t
        for t, a, b in zip(REFERENCE_TEXTS, ours(REFERENCE_TEXTS), theirs, strict=True)
        if not torch.equal(a, b)
    ]
    assert not mismatched, mismatched[:5]
