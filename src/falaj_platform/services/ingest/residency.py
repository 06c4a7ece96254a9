"""Data residency: a dataset of another region is refused unless policy allows it, and audited.

The service runs in one region (`Settings.region`). Policy is the set of foreign regions
the service may hold and serve (`IngestConfig.allowed_foreign_regions`); every access to
a foreign dataset, allowed or refused, is reported to the audit log as
CROSS_REGION_ACCESS before the answer is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.errors import PermissionDenied, Unavailable
from falaj_platform.runtime.logs import get_logger


class AuditSink(Protocol):
    """What the service needs of `runtime.audit.AuditReporter` (tests pass a recorder)."""

    def report(
        self,
        event_type: Any,
        *,
        resource: str,
        action: str,
        allowed: bool = True,
        detail: str = "",
        attributes: Mapping[str, str] | None = None,
        report_id: str = "",
        caller: str | None = None,
    ) -> Any: ...


class ResidencyGuard:
    """Refuses (and audits) work on datasets of a region this service may not hold."""

    def __init__(self, region: str, allowed_foreign_regions: frozenset[str], audit: AuditSink):
        self.region = region
        self.allowed_foreign_regions = allowed_foreign_regions
        self.audit = audit

    def check_region(self, region: str, resource: str, action: str, caller: str) -> None:
        if region == self.region:
            return
        allowed = region in self.allowed_foreign_regions
        detail = f"{resource} resides in {region}; this service runs in {self.region}; " + (
            "allowed by policy" if allowed else "no policy allows it"
        )
        try:
            self.audit.report(
                gateway_messages.SECURITY_EVENT_TYPE_CROSS_REGION_ACCESS,
                resource=resource,
                action=action,
                allowed=allowed,
                detail=detail,
                attributes={"resource_region": region, "service_region": self.region},
                caller=caller,
            )
        except Unavailable:
            if allowed:
                raise  # an allowed cross-region access must be on record before it happens
            get_logger().error("cross-region refusal could not be audited", resource=resource, region=region)
        if not allowed:
            raise PermissionDenied(
                f"{resource} resides in region {region} but this ingest service runs in {self.region}, and no policy allows "
                f"serving {region} data here",
                reason="RESIDENCY_REGION_MISMATCH",
                metadata={"resource_region": region, "service_region": self.region},
            )

    def __call__(self, dataset: m.Dataset, action: str, caller: str) -> None:
        self.check_region(dataset.residency.region, dataset.name, action, caller)
