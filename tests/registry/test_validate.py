"""Every bad upload is refused with a message before anything is stored."""
import json
import struct

import pytest
import torch
from safetensors.torch import save

from adapter_registry.validate import RegistryLimits, parse_header, validate_adapter
from server.core.errors import AdapterRejectedError

from .adapters import TINY, make_adapter

LIMITS = RegistryLimits()


def check(cfg, weights, max_rank=16, limits=LIMITS):
    return validate_adapter(cfg, weights, TINY, max_rank, limits)


def rejected(cfg, weights, match, **kw):
    with pytest.raises(AdapterRejectedError, match=match):
        check(cfg, weights, **kw)


def raw_file(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_good_adapter_passes():
    cfg, w = make_adapter(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down"), dtype=torch.bfloat16)
    v = check(cfg, w)
    assert v.rank == 4 and v.targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert len(v.weights.modules) == 2 * 7


def test_truncated_file():
    cfg, w = make_adapter()
    for cut in (0, 4, 7, 9, 40, len(w) - 1):
        rejected(cfg, w[:cut], "truncated|data section|bytes after|lying")


def test_oversized_header_claim_is_refused_without_allocating():
    cfg, _ = make_adapter()
    rejected(cfg, struct.pack("<Q", 2**62) + b"{}", "header of .* exceeds the limit")
    small = RegistryLimits(max_header_bytes=64)
    _, w = make_adapter()
    rejected(cfg, w, "header of .* exceeds the limit", limits=small)


def test_lying_offsets():
    cfg, _ = make_adapter()
    base = {"dtype": "F32", "shape": [2, 2]}
    # points past the data section
    rejected(cfg, raw_file({"a": {**base, "data_offsets": [0, 1 << 40]}}, b"\0" * 16), "outside")
    # span disagrees with the shape
    rejected(cfg, raw_file({"a": {**base, "data_offsets": [0, 12]}}, b"\0" * 12), "needs 16")
    # two tensors overlap
    rejected(cfg, raw_file({"a": {**base, "data_offsets": [0, 16]}, "b": {**base, "data_offsets": [8, 24]}},
                           b"\0" * 24), "overlaps")
    # a hole, and trailing garbage
    rejected(cfg, raw_file({"a": {**base, "data_offsets": [4, 20]}}, b"\0" * 20), "gap")
    rejected(cfg, raw_file({"a": {**base, "data_offsets": [0, 16]}}, b"\0" * 20), "bytes after the last tensor")
    # negative, non-integer, bool
    rejected(cfg, raw_file({"a": {**base, "data_offsets": [-16, 0]}}, b""), "outside")
    rejected(cfg, raw_file({"a": {**base, "data_offsets": [0, 16.0]}}, b"\0" * 16), "two integers")
    rejected(cfg, raw_file({"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, b"\0" * 16),
             "bad shape")


def test_header_garbage():
    cfg, _ = make_adapter()
    rejected(cfg, struct.pack("<Q", 4) + b"\xff\xfe{}", "UTF-8 JSON")
    rejected(cfg, struct.pack("<Q", 2) + b"[]", "JSON object")
    rejected(cfg, raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "__metadata__": {"x": 1}}, b"\0" * 4), "__metadata__")
    rejected(cfg, raw_file({"a": "x"}, b""), "entry must be an object")
    rejected(cfg, raw_file({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype")


def test_non_float_dtype():
    cfg, _ = make_adapter()
    w = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32, dtype=torch.int32)})
    rejected(cfg, w, "not a float type")


def test_nan_and_inf():
    cfg, _ = make_adapter(rank=2, targets=("q",))
    for bad in (float("nan"), float("inf")):
        a = torch.zeros(2, 32)
        a[1, 3] = bad
        w = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
                  "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)})
        rejected(cfg, w, "NaN or Inf")


def test_pickle_bin_is_refused_with_conversion_hint():
    cfg, _ = make_adapter()
    rejected(cfg, b"PK\x03\x04" + b"\0" * 100, "convert it with")
    rejected(cfg, b"\x80\x02" + b"\0" * 100, "convert it with")


def test_does_not_fit_base_model():
    cfg, _ = make_adapter()
    other = TINY.__class__(**{**TINY.__dict__, "hidden_size": 48, "raw": {}})
    _, w = make_adapter(model=other)
    rejected(cfg, w, "do not fit the base")
    deep = TINY.__class__(**{**TINY.__dict__, "num_layers": 3, "raw": {}})
    _, w = make_adapter(model=deep)
    rejected(cfg, w, "layer 2 but the base model has 2 layers")


def test_rank_over_max():
    cfg, w = make_adapter(rank=8)
    rejected(cfg, w, "exceeds the server's max rank 4", max_rank=4)


@pytest.mark.parametrize("extra,match", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias="),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"r": "4"}, "must be a number"),
])
def test_unsupported_features_named(extra, match):
    cfg, w = make_adapter(extra_config=extra)
    rejected(cfg, w, match)


def test_config_is_data_only():
    # auto_map names code that would fail loudly if anything tried to import it: it is only data to us.
    cfg, w = make_adapter(extra_config={"auto_map": {"AutoModel": "evil_module_xyz.Evil"},
                                        "base_model_name_or_path": "/etc/passwd"})
    assert check(cfg, w).config["auto_map"] == {"AutoModel": "evil_module_xyz.Evil"}
    rejected(b"not json", w, "not valid UTF-8 JSON")
    rejected(b"[1, 2]", w, "JSON object")
    rejected(b"{\"r\": NaN}", w, "not valid")
    rejected(b"", w, "empty")
    rejected(b"{" + b" " * (70 << 10) + b"}", w, "exceeds the limit")


def test_size_bounds():
    cfg, w = make_adapter()
    rejected(cfg, w, "exceeds the limit", limits=RegistryLimits(max_weights_bytes=len(w) - 1))
    rejected(cfg, w, "tensors exceeds the limit", limits=RegistryLimits(max_tensors=3))


def test_parse_header_reports_entries():
    _, w = make_adapter(rank=2, targets=("q",))
    entries, meta = parse_header(w, LIMITS)
    assert meta == {"seed": "0"} and len(entries) == 4
    assert all(e.dtype == "F32" for e in entries)
