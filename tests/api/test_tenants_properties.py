"""Property tests (hypothesis) of the tenants file loader: any TOML text or table gives a directory whose
every listed key authenticates to its tenant, or InvalidRequestError naming the problem; never a crash."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.tenants import TenantDirectory, hash_key
from server.core.errors import AuthenticationError, InvalidRequestError

KEYS = [f"key-{i}" for i in range(6)]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=10), st.sampled_from(["user", "admin"]),
                    st.sampled_from([hash_key(k) for k in KEYS] + ["sha256:" + hash_key(k) for k in KEYS]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
fields = st.sampled_from(["api_keys", "role", "max_adapters", "max_adapter_versions", "max_concurrent_requests",
                          "max_tokens_per_minute", "bogus"])
tenant_tables = st.dictionaries(fields, values, max_size=5) | st.fixed_dictionaries(
    {"api_keys": st.lists(st.sampled_from([hash_key(k) for k in KEYS]), min_size=1, max_size=3, unique=True)},
    optional={"role": st.sampled_from(["user", "admin", "root"]), "max_adapters": st.integers(-1, 5)})
names = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True), st.text(max_size=10))
files = st.fixed_dictionaries({"tenants": st.dictionaries(names, tenant_tables | values, max_size=4)},
                              optional={"other": values}) | st.dictionaries(st.text(max_size=8), values, max_size=3)


def _check(directory: TenantDirectory) -> None:
    assert directory.tenants and not directory.open_mode
    for key in KEYS:
        try:
            tenant = directory.authenticate(key)
        except AuthenticationError:
            continue
        assert tenant.name in directory.tenants and tenant.role in ("user", "admin")


@settings(max_examples=400, deadline=None)
@given(files)
def test_any_table_loads_or_is_refused_by_name(data):
    try:
        directory = TenantDirectory.from_dict(data, "t.toml")
    except InvalidRequestError as e:
        assert e.field == "tenants"
        assert not any(k in str(e) for k in KEYS)  # a message never repeats a key
        return
    _check(directory)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='[]="\n.,:#abtenas_ky0123456789-', max_size=120))
def test_any_toml_text_loads_or_is_refused_by_name(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("toml") / "tenants.toml"
    path.write_text(text, encoding="utf-8")
    try:
        directory = TenantDirectory.from_toml(path)
    except InvalidRequestError as e:
        assert e.field == "tenants"
        return
    _check(directory)
