import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
    TIER_HOST: _ClassVar[Tier]
    TIER_DEVICE: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_DISK: Tier
TIER_HOST: Tier
TIER_DEVICE: Tier

class RegisterAdapterHeader(_message.Message):
    __slots__ = ("name", "adapter_config_json", "metadata", "server_path", "total_size", "tenant")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SERVER_PATH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapter_config_json: str
    metadata: _containers.ScalarMap[str, str]
    server_path: str
    total_size: int
    tenant: str
    def __init__(self, name: _Optional[str] = ..., adapter_config_json: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., server_path: _Optional[str] = ..., total_size: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RegisterAdapterHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[RegisterAdapterHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class AdapterVersion(_message.Message):
    __slots__ = ("version", "digest", "rank", "targets", "size_bytes", "created", "metadata", "tier", "pinned", "base_model_fingerprint")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    version: int
    digest: str
    rank: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    created: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    tier: Tier
    pinned: bool
    base_model_fingerprint: str
    def __init__(self, version: _Optional[int] = ..., digest: _Optional[str] = ..., rank: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., tier: _Optional[_Union[Tier, str]] = ..., pinned: _Optional[bool] = ..., base_model_fingerprint: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "tenant", "latest_version", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    latest_version: int
    versions: _containers.RepeatedCompositeFieldContainer[AdapterVersion]
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., latest_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[AdapterVersion, _Mapping]]] = ...) -> None: ...

class RegisterAdapterResponse(_message.Message):
    __slots__ = ("name", "version", "adapter_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: AdapterVersion
    adapter_id: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[_Union[AdapterVersion, _Mapping]] = ..., adapter_id: _Optional[str] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "pin", "tenant")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    pin: bool
    tenant: str
    def __init__(self, adapter_id: _Optional[str] = ..., pin: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter_id", "version", "pinned", "load_seconds")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    pinned: bool
    load_seconds: float
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., pinned: _Optional[bool] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "tenant")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tenant: str
    def __init__(self, adapter_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("adapter_id", "was_on_device")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_ON_DEVICE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    was_on_device: bool
    def __init__(self, adapter_id: _Optional[str] = ..., was_on_device: _Optional[bool] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "tenant")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tenant: str
    def __init__(self, adapter_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "tenant")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tenant: str
    def __init__(self, adapter_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted_versions",)
    DELETED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    deleted_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, deleted_versions: _Optional[_Iterable[int]] = ...) -> None: ...
