"""Property tests (hypothesis) of the safetensors header parser and adapter validation.

Whatever the bytes, `parse_header` returns entries that tile the data section or raises
AdapterRejectedError; whatever it accepts the safetensors library reads; `validate_adapter`
only ever refuses with AdapterRejectedError.
"""
from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

from adapter_registry.validate import FLOAT_DTYPES, RegistryLimits, parse_header, validate_adapter
from server.core.errors import AdapterRejectedError

from .adapters import TINY, make_adapter

LIMITS = RegistryLimits(max_weights_bytes=1 << 20, max_header_bytes=1 << 14, max_tensors=64)
GOOD_CFG, GOOD_WEIGHTS = make_adapter(rank=2, targets=("q",))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
dtypes = st.sampled_from([*FLOAT_DTYPES, "I32", "BOOL", "F8_E4M3", "X", ""])


@st.composite
def entries(draw):
    """A header entry that is plausible more often than not (so the checks past the first are reached)."""
    dtype = draw(dtypes)
    shape = draw(st.lists(st.integers(-2, 6), min_size=0, max_size=3))
    begin = draw(st.integers(-4, 64))
    size = draw(st.integers(-4, 64))
    info = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
    if draw(st.booleans()):
        info = draw(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), json_values,
                                    max_size=3)) | info if draw(st.booleans()) else draw(json_values)
    return info


@st.composite
def safetensors_files(draw):
    header = draw(st.dictionaries(st.text(min_size=1, max_size=10), entries(), max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode()
    length = len(raw) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    data = draw(st.binary(max_size=160))
    return struct.pack("<Q", length) + raw + data


def _accepts(data: bytes):
    try:
        return parse_header(data, LIMITS)
    except AdapterRejectedError as e:
        assert str(e).startswith("adapter_model.safetensors: ")
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(safetensors_files())
def test_structured_headers_are_parsed_or_refused(data):
    parsed = _accepts(data)
    if parsed is None:
        return
    entries_, meta = parsed
    (n,) = struct.unpack("<Q", data[:8])
    pos = 0
    for e in sorted(entries_, key=lambda e: e.begin):  # accepted tensors tile the data section exactly
        assert e.begin == pos and e.dtype in FLOAT_DTYPES
        pos = e.end
    assert pos == len(data) - 8 - n
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    tensors = st_load(data)  # what we accept, the native reader reads
    assert set(tensors) == {e.name for e in entries_}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_with_a_reason(data):
    assume(len(data) < 8 or struct.unpack("<Q", data[:8])[0] > 0)
    _accepts(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_real_files_are_refused_or_still_valid(data):
    """Flip, cut or splice a real adapter: validation answers a reason or a fully valid adapter."""
    raw = bytearray(GOOD_WEIGHTS)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[i:i + data.draw(st.integers(1, 16))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        v = validate_adapter(GOOD_CFG, bytes(raw), TINY, 16, LIMITS)
    except AdapterRejectedError:
        return
    assert v.rank == 2 and v.targets == ("q",)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_config_is_accepted_or_refused_by_name(cfg):
    try:
        validate_adapter(json.dumps(cfg).encode(), GOOD_WEIGHTS, TINY, 16, LIMITS)
    except AdapterRejectedError:
        pass
