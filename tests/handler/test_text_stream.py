"""handler/text_stream.py with the tests' real byte-level BPE tokenizer: the pieces a stream hands
out concatenate to exactly the whole reply's text (decode of every token, cut at the earliest stop
string), cover exactly the reply's completion tokens, and never show text that could still change."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from handler.text_stream import WINDOW, TextStream, covering, stop_cut


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _whole_reply(tok, ids, stops):
    """The whole-reply rule (service._answer): decode everything, cut at the earliest stop."""
    text = _decode(tok)(ids)
    cut = stop_cut(text, stops)
    if cut < 0:
        return text, len(ids)
    return text[:cut], covering(lambda n: len(_decode(tok)(ids[:n])), len(ids), cut)


def _stream(tok, ids, stops):
    """Feed tokens until the stream stops the row, then settle with the reply of the tokens fed."""
    stream = TextStream(_decode(tok), tuple(stops))
    pieces = []
    for t in ids:
        piece = stream.push(t)
        assert stream.text == _decode(tok)(stream.token_ids)  # the window's growth is the whole decode's
        if piece is not None:
            assert piece.text and stream.text.startswith(stream.emitted)
            pieces.append(piece)
        if stream.stopped:
            break
    fed = stream.token_ids
    text, kept = _whole_reply(tok, fed, stops)
    last = stream.rest(text, kept)
    if last is not None:
        pieces.append(last)
    return stream, pieces, fed


def test_random_rows_concatenate_to_the_whole_reply_and_stop_where_it_cuts(tok):
    rng = random.Random(13)
    words = ["hello", "world", "the", "fox", "é", "🙂", "capital", "Paris", ".", ",", " ", "dog", "{}", "ARR"]
    special = [tok.convert_tokens_to_ids("<|im_start|>")]
    stopped_early = cut_rows = 0
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if rng.random() < 0.2:  # what a random model says: any token, bytes that are no UTF-8 included
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.2:
            ids.insert(rng.randrange(len(ids) + 1), special[0])
        if rng.random() < 0.3:  # a row may also stop inside a character (max_new_tokens)
            ids = ids[:rng.randint(1, len(ids))]
        full = _decode(tok)(ids)
        stops = []
        for _ in range(rng.randint(0, 3)):
            a = rng.randrange(len(full) + 1)
            stops.append(full[a:a + rng.randint(1, 5)] or "zz")
        if rng.random() < 0.2:
            stops.append("o 🙂 no")  # a stop that only starts to match
        stream, pieces, fed = _stream(tok, ids, stops)
        want_text, want_kept = _whole_reply(tok, ids, stops)  # the static path: every token generated
        assert "".join(p.text for p in pieces) == want_text, (ids, stops)
        assert _whole_reply(tok, fed, stops) == (want_text, want_kept)
        # The pieces cover the kept tokens, in order, each once.
        assert [p.start for p in pieces] == [0, *[p.end for p in pieces]][:len(pieces)]
        assert (pieces[-1].end if pieces else 0) == want_kept
        stopped_early += len(fed) < len(ids)
        cut_rows += stop_cut(full, stops) >= 0
    assert stopped_early > 30 and cut_rows > 100  # the cases above really happened


def test_an_incomplete_character_is_held_back(tok):
    ids = tok("hi 🙂", add_special_tokens=False)["input_ids"]
    stream = TextStream(_decode(tok))
    partial = 0
    for t in ids:
        stream.push(t)
        assert "\ufffd" not in stream.emitted
        partial += "\ufffd" in _decode(tok)(stream.token_ids)
    assert partial >= 2  # the emoji's bytes came in several tokens
    assert stream.emitted == "hi 🙂"


def test_a_prefix_of_a_stop_string_is_held_back_until_it_is_not(tok):
    stream = TextStream(_decode(tok), ("fox jumps",))
    ids = tok("the quick brown fox leaps", add_special_tokens=False)["input_ids"]
    seen = []
    for t in ids:
        stream.push(t)
        seen.append(stream.emitted)
    assert any(s == "the quick brown " for s in seen)  # "fox" waited...
    assert not any(s.startswith("the quick brown fox") and not s.startswith("the quick brown fox l") for s in seen)
    assert stream.emitted == "the quick brown fox leaps" and not stream.stopped  # ...and was shown when it diverged


def test_an_earlier_stop_that_may_still_complete_wins(tok):
    """Stops "o j" and "x": "x" occurs first in the text, but "o j" (starting earlier, at "fo|x")
    is not possible there; in "brown fox jumps" with stops "n fox" and "x", "n fox" starts earlier."""
    stream = TextStream(_decode(tok), ("x", "n fox jumps"))
    ids = tok("brown fox jumps over", add_special_tokens=False)["input_ids"]
    for t in ids:
        stream.push(t)
        if stream.stopped:
            break
    text = _decode(tok)(stream.token_ids)
    assert "fox jumps" in text  # it did not stop at the first "x"
    assert stream.emitted == "brow" and stop_cut(text, ("x", "n fox jumps")) == 4


def test_a_stop_over_an_incomplete_character_is_no_stop_yet(tok):
    """Stop "i \ufffd": "hi " + the emoji's first byte decodes to "hi \ufffd", but the finished
    character is no U+FFFD, so the whole reply has no cut and the stream must not stop there."""
    ids = tok("hi 🙂 ok", add_special_tokens=False)["input_ids"]
    stream, pieces, fed = _stream(tok, ids, ["i \ufffd"])
    assert not stream.stopped and fed == ids
    assert "".join(p.text for p in pieces) == "hi 🙂 ok"


def test_spaces_are_held_back_when_the_tokenizer_cleans_them_up(tok):
    stream = TextStream(_decode(tok), hold_spaces=True)
    for t in tok("hello world ,", add_special_tokens=False)["input_ids"]:
        stream.push(t)
        assert not stream.emitted.endswith(" ")


def test_a_long_row_decodes_a_window_per_token_not_the_whole_row(tok):
    decoded = []

    def counting(ids):
        decoded.append(len(ids))
        return _decode(tok)(ids)

    ids = tok(" ".join(["the quick brown fox jumps over the lazy dog é"] * 20), add_special_tokens=False)["input_ids"]
    stream = TextStream(counting, ("zzz",))
    for t in ids:
        stream.push(t)
    assert stream.text == _decode(tok)(ids) and len(ids) > 150
    assert sum(decoded) < 3 * WINDOW * len(ids)  # the whole row each time: about len(ids)**2 / 2
