"""The SSE reader the load generator and the benchmarks read OpenAI-style streams with."""
from __future__ import annotations

import json

from server.client.sse import SSEDecoder

# What a server sends raw inside JSON strings that str.splitlines (and so httpx's aiter_lines) breaks at.
_ODD = "a\u2028b\x85c\x1cd\u2029e\x0bf\x0cg"


def _stream(texts: list[str]) -> str:
    return "".join(f"data: {json.dumps({'choices': [{'text': t}]}, ensure_ascii=False)}\n\n" for t in texts) \
        + "data: [DONE]\n\n"


def _decode(raw: str, cut: int) -> list[str]:
    dec = SSEDecoder()
    out = []
    for i in range(0, len(raw), cut):
        out += dec.feed(raw[i:i + cut])
    return out + dec.close()


def test_json_with_unicode_line_separators_arrives_whole_however_the_stream_is_cut():
    raw = _stream(["hello", _ODD, "world"])
    for cut in (1, 2, 3, 7, 64, len(raw)):
        events = _decode(raw, cut)
        assert events[-1] == "[DONE]", cut
        assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["hello", _ODD, "world"], cut


def test_crlf_and_cr_line_ends_even_when_a_chunk_ends_between_cr_and_lf():
    raw = "data: one\r\n\r\ndata: two\r\rdata: three\n\n"
    for cut in (1, 2, 5, len(raw)):
        assert _decode(raw, cut) == ["one", "two", "three"], cut


def test_multi_line_data_comments_and_other_fields():
    raw = ": keep-alive\n\nevent: x\nid: 7\ndata: first\ndata:second\n\nretry: 10\n\n"
    assert _decode(raw, 4) == ["first\nsecond"]


def test_a_last_event_without_its_blank_line_still_arrives():
    assert _decode("data: a\n\ndata: b", 3) == ["a", "b"]
    assert _decode("data: a\n\ndata: b\n", 3) == ["a", "b"]
