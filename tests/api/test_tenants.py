"""The tenants file and the live quota counters."""
import pytest

from server.api.tenants import (OPEN_TENANT, QuotaTracker, Tenant, TenantDirectory, Quotas, hash_key)
from server.core.errors import AuthenticationError, InvalidRequestError, QuotaExceededError

GOOD = {"tenants": {
    "acme": {"api_keys": [hash_key("a1"), "sha256:" + hash_key("a2")], "max_adapters": 3},
    "ops": {"api_keys": [hash_key("root")], "role": "admin"},
}}


def test_authenticate():
    d = TenantDirectory.from_dict(GOOD)
    assert d.authenticate("a1").name == "acme" and d.authenticate("a2").name == "acme"
    assert d.authenticate("root").is_admin and not d.authenticate("a1").is_admin
    assert d.get("acme").quotas == Quotas(max_adapters=3)
    with pytest.raises(AuthenticationError, match="missing API key"):
        d.authenticate(None)
    for wrong in ("", "a3", hash_key("a1")):  # the hash itself is not a key
        with pytest.raises(AuthenticationError):
            d.authenticate(wrong)


def test_open_mode():
    d = TenantDirectory.open()
    t = d.authenticate(None)
    assert t.name == OPEN_TENANT and t.is_admin and d.open_mode


def test_from_toml(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(f'[tenants.acme]\napi_keys = ["{hash_key("k")}"]\nmax_concurrent_requests = 2\n')
    d = TenantDirectory.from_toml(p)
    assert d.authenticate("k").quotas.max_concurrent_requests == 2
    p.write_text("[tenants.acme\n")
    with pytest.raises(InvalidRequestError, match="TOML"):
        TenantDirectory.from_toml(p)
    with pytest.raises(InvalidRequestError, match="cannot be read"):
        TenantDirectory.from_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize("data,match", [
    ({}, "at least one"),
    ({"tenants": {}}, "at least one"),
    ({"tenants": {"a": {"api_keys": ["plaintext"]}}}, "not a sha256 hash"),
    ({"tenants": {"a": {"api_keys": []}}}, "non-empty"),
    ({"tenants": {"a": {"api_keys": [hash_key("x")]}, "b": {"api_keys": [hash_key("x")]}}}, "listed twice"),
    ({"tenants": {"a": {"api_keys": [hash_key("x")], "role": "root"}}}, "role"),
    ({"tenants": {"a": {"api_keys": [hash_key("x")], "max_adapters": -1}}}, "non-negative"),
    ({"tenants": {"a": {"api_keys": [hash_key("x")], "max_adapters": "5"}}}, "non-negative"),
    ({"tenants": {"a": {"api_keys": [hash_key("x")], "max_adaptors": 5}}}, "unknown keys"),
    ({"tenants": {"Bad/Name": {"api_keys": [hash_key("x")]}}}, "tenant"),
    ({"tenants": {"a": {"api_keys": [hash_key("x")]}}, "extra": 1}, "unknown top-level"),
])
def test_bad_tenants_files(data, match):
    with pytest.raises(InvalidRequestError, match=match):
        TenantDirectory.from_dict(data)


def test_concurrency_quota():
    q = QuotaTracker()
    t = Tenant("a", quotas=Quotas(max_concurrent_requests=2))
    with q.request(t), q.request(t):
        assert q.running("a") == 2
        with pytest.raises(QuotaExceededError, match="max_concurrent_requests"):
            with q.request(t):
                pass
        with q.request(Tenant("b")):  # other tenants are not affected
            pass
    assert q.running("a") == 0
    with q.request(t):
        pass


def test_tokens_per_minute_window():
    now = [1000.0]
    q = QuotaTracker(clock=lambda: now[0])
    t = Tenant("a", quotas=Quotas(max_tokens_per_minute=100))
    with q.request(t):
        q.charge("a", 60)
    with q.request(t):
        q.charge("a", 50)
    assert q.tokens_last_minute("a") == 110
    with pytest.raises(QuotaExceededError, match=r"used 110 tokens.*max_tokens_per_minute"):
        with q.request(t):
            pass
    now[0] += 30
    with pytest.raises(QuotaExceededError):
        with q.request(t):
            pass
    now[0] += 30.5  # the first charges left the 60-second window
    assert q.tokens_last_minute("a") == 0
    with q.request(t):
        pass
