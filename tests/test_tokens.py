"""The cached tokenizer front must give open_clip's ids exactly, on any text."""

from __future__ import annotations

import pickle
import random

import open_clip
import pytest
import torch

from saferclip_data.models.tokens import PLAIN_TEXT, CachedClipTokenizer, fast_tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    base = open_clip.get_tokenizer("ViT-B-32")
    fast = fast_tokenizer(base)
    assert isinstance(fast, CachedClipTokenizer)
    return base, fast


def _same(base, fast, texts, context_length=None):
    want, got = base(texts, context_length), fast(texts, context_length)
    assert got.dtype == want.dtype == torch.long and got.shape == want.shape
    bad = [t for t, a, b in zip(texts, want, got) if not torch.equal(a, b)]
    assert not bad, f"ids differ for {bad[:3]!r}"


def test_every_ascii_character_gives_open_clips_ids(tokenizers):
    """Control characters ftfy deletes, '&' entities, line breaks: each ASCII code point in context."""
    texts = [f"a{chr(c)}b {chr(c)} x{chr(c)}{chr(c)}y" for c in range(128)]
    texts += ["&amp; &lt;b&gt; Tom &amp;amp; Jerry", "fish &#38; chips", "<b>&nbsp;bold</b>", "\r\n a \x0b b \x0c"]
    assert not PLAIN_TEXT.fullmatch(texts[-1]) and PLAIN_TEXT.fullmatch(" a\tB\r\n")
    _same(*tokenizers, texts)


def test_unicode_mojibake_and_random_text_give_open_clips_ids(tokenizers):
    texts = ["café crème brûlée", "cafÃ© â€œquotedâ€\x9d", "“curly” ‘quotes’", "ﬁne ﬂowers", "ＦＵＬＬ width"]
    texts += ["日本語のテキスト", "emoji 🙂🔥 ok", "Ünïcödé ÀÉÎ", "", "   ", "A  B\t\tC", "it's we'll THEY'VE"]
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + list("éüß“”’ﬁＡ日🙂\u00a0\u2028&;#")
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(2000)]
    _same(*tokenizers, texts)


def test_long_captions_are_truncated_like_open_clip(tokenizers):
    words = "a dog runs along the river under the bridge near the old town hall at night".split()
    texts = [" ".join(words * n) for n in range(1, 12)]
    _same(*tokenizers, texts)
    _same(*tokenizers, texts, context_length=16)


def test_repeated_words_come_from_the_cache_and_the_front_pickles(tokenizers):
    base, fast = tokenizers
    fast("the unicorn rides")
    assert "unicorn" in fast._word_ids
    again = pickle.loads(pickle.dumps(fast))
    assert torch.equal(again(["the unicorn rides"]), base(["the unicorn rides"]))
    assert fast.vocab_size == base.vocab_size  # everything else is the base tokenizer's


def test_other_tokenizers_are_left_alone():
    base = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    assert fast_tokenizer(base) is base
    masked = open_clip.tokenizer.SimpleTokenizer(reduction_mask="simple")
    assert fast_tokenizer(masked) is masked
