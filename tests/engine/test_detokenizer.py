"""Streaming text never contains half a character, and stop strings never leak."""
from __future__ import annotations

from server.engine.detokenizer import IncrementalDetokenizer
from tests.helpers import byte_tokenizer


def _stream(text: str, stop=()):
    tok = byte_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop)
    pieces, hit = [], False
    for i in ids:
        piece, hit = d.add(i)
        pieces.append(piece)
        if hit:
            break
    if not hit:
        pieces.append(d.finish())
    return pieces, hit


def test_multibyte_characters_are_never_split():
    text = "naïve café — 東京 🎉 done"
    pieces, _ = _stream(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Each byte is a token here, so some steps must have emitted nothing while a character was incomplete.
    assert any(p == "" for p in pieces)


def test_stop_string_is_cut_and_never_streamed():
    pieces, hit = _stream("The answer is 42. END of story", stop=("END", "zzz"))
    assert hit and "".join(pieces) == "The answer is 42. "
    assert not any("E" in p for p in pieces)


def test_stop_string_across_many_tokens_and_held_back_text_released_at_finish():
    pieces, hit = _stream("abc<|stop|>def", stop=("<|stop|>",))
    assert hit and "".join(pieces) == "abc"
    pieces, hit = _stream("no stop here", stop=("<|stop|>",))
    assert not hit and "".join(pieces) == "no stop here"


def test_dangling_partial_character_at_finish_is_dropped():
    tok = byte_tokenizer()
    ids = tok.encode("ok 東", add_special_tokens=False)[:-1]  # cut inside the 3-byte character
    d = IncrementalDetokenizer(tok)
    out = "".join(d.add(i)[0] for i in ids) + d.finish()
    assert out == "ok "
