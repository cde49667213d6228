"""What `loraserve adapters` shows a person: the columns of each table and the one-line answers.

`-o json` bypasses all of this and prints the proto record itself (render.print_json), so scripts
see every field; these views choose the few that fit on a terminal line.
"""
from __future__ import annotations

from typing import Optional

from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.client.render import EMPTY, Column, human_size, short_list, table, timestamp

DIGEST_CHARS = 12  # as git and docker shorten ids: enough to tell versions apart, short enough to read


def tier_name(tier: int) -> str:
    return pb.Tier.Name(tier).removeprefix("TIER_").lower() if tier else EMPTY


def short_digest(digest: str) -> str:
    return digest[:DIGEST_CHARS] or EMPTY


def _targets(v: pb.AdapterVersion, wide: bool) -> str:
    return (",".join(v.targets) or EMPTY) if wide else short_list(list(v.targets))


def _created(v: pb.AdapterVersion) -> str:
    return timestamp(v.created.seconds + v.created.nanos / 1e9) if v.HasField("created") else EMPTY


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def latest(info: pb.AdapterInfo) -> Optional[pb.AdapterVersion]:
    """The version `name` resolves to (the latest), or the highest one left if the index says otherwise."""
    for v in info.versions:
        if v.version == info.latest_version:
            return v
    return max(info.versions, key=lambda v: v.version, default=None)


# ---- list: one row per adapter, its latest version's properties ------------------------------------
LIST_COLUMNS = [Column("NAME"), Column("TENANT"), Column("LATEST", right=True), Column("VERSIONS", right=True),
                Column("RANK", right=True), Column("TARGETS"), Column("SIZE", right=True), Column("TIER")]
LIST_WIDE_COLUMNS = LIST_COLUMNS + [Column("DIGEST"), Column("CREATED"), Column("PINNED")]


def adapters_table(resp: pb.ListAdaptersResponse, wide: bool = False, tenant: str = "") -> str:
    """The adapters as a table; a one-line sentence instead when there are none."""
    if not resp.adapters:
        return "No adapters registered" + (f" for tenant '{tenant}'." if tenant else ".")
    rows = []
    for a in resp.adapters:
        v = latest(a)
        row = [a.name, a.tenant, f"@{a.latest_version}" if a.latest_version else EMPTY, str(len(a.versions))]
        row += [str(v.rank), _targets(v, wide), human_size(v.size_bytes), tier_name(v.tier)] if v else [EMPTY] * 4
        if wide:
            pinned = ",".join(f"@{p.version}" for p in a.versions if p.pinned) or EMPTY
            row += [short_digest(v.digest), _created(v)] if v else [EMPTY] * 2
            row.append(pinned)
        rows.append(row)
    return table(LIST_WIDE_COLUMNS if wide else LIST_COLUMNS, rows)


# ---- get: one row per version ----------------------------------------------------------------------
VERSION_COLUMNS = [Column("ADAPTER"), Column("TENANT"), Column("DIGEST"), Column("RANK", right=True),
                   Column("TARGETS"), Column("SIZE", right=True), Column("CREATED"), Column("TIER"),
                   Column("PINNED"), Column("METADATA", right=True)]
VERSION_WIDE_COLUMNS = VERSION_COLUMNS[:-1] + [Column("METADATA"), Column("BASE MODEL")]


def versions_table(info: pb.AdapterInfo, wide: bool = False) -> str:
    """Each version of one adapter (`get name`), or the one asked for (`get name@N`)."""
    rows = []
    for v in info.versions:
        row = [f"{info.name}@{v.version}", info.tenant, v.digest if wide else short_digest(v.digest), str(v.rank),
               _targets(v, wide), human_size(v.size_bytes), _created(v), tier_name(v.tier),
               "yes" if v.pinned else "no"]
        if wide:
            row += [",".join(f"{k}={val}" for k, val in sorted(v.metadata.items())) or EMPTY,
                    v.base_model_fingerprint or EMPTY]
        else:
            row.append(str(len(v.metadata)))
        rows.append(row)
    return table(VERSION_WIDE_COLUMNS if wide else VERSION_COLUMNS, rows)


# ---- one-line answers ------------------------------------------------------------------------------
def registered_line(resp: pb.RegisterAdapterResponse) -> str:
    v = resp.version
    return (f"registered {resp.adapter_id} (digest {short_digest(v.digest)}, rank {v.rank}, "
            f"{_plural(len(v.targets), 'target')}, {human_size(v.size_bytes)})")


def loaded_line(resp: pb.LoadAdapterResponse) -> str:
    return f"loaded {resp.adapter_id} onto the device in {resp.load_seconds:.2f}s" + (
        " (pinned)" if resp.pinned else "")


def unloaded_line(resp: pb.UnloadAdapterResponse) -> str:
    if resp.was_on_device:
        return f"unloaded {resp.adapter_id} from the device (still registered)"
    return f"{resp.adapter_id} was not on the device; nothing to unload (still registered)"


def deleted_line(adapter_id: str, resp: pb.DeleteAdapterResponse) -> str:
    name = adapter_id.partition("@")[0]
    if not resp.deleted_versions:
        return f"nothing deleted for {adapter_id}"
    return "deleted " + ", ".join(f"{name}@{n}" for n in resp.deleted_versions)
