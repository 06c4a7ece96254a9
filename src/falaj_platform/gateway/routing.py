"""Which service owns a full gRPC method name."""

from __future__ import annotations

from falaj_platform.runtime.settings import SERVICES

# Contracts that are not `falaj.<service>.v1` but belong to a service.
_FOREIGN_PREFIXES = {
    "/inference.GRPCInferenceService/": "serving",
    "/feast.serving.ServingService/": "features",
}
_OWN_PREFIXES = {f"/falaj.{name}.v1.": name for name in SERVICES}


def owner_of(method: str) -> str | None:
    """The service that owns `method` (e.g. '/falaj.ingest.v1.IngestService/GetDataset'), or None.

    A method must be exactly `/<package>.<Service>/<Method>`: anything with extra path
    segments, dots in the method part or empty parts is refused here, not forwarded.
    """
    if method.count("/") != 2 or not method.startswith("/"):
        return None
    _, service, rpc = method.split("/")
    if not service or not rpc or not rpc.isidentifier():
        return None
    for table in (_OWN_PREFIXES, _FOREIGN_PREFIXES):
        for prefix, owner in table.items():
            if method.startswith(prefix):
                return owner
    return None
