"""Report security-relevant events (approvals, erasures, cross-region attempts...) to the audit log.

The shared audit log lives in the gateway; services report through the gateway's admin
API with their own identity. A report carries an idempotency key, so retrying after a
lost reply records the event once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.gateway.v1 import request_response_pb2 as gateway_requests
from falaj.gateway.v1 import service_pb2_grpc as gateway_service
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.errors import Unavailable
from falaj_platform.runtime.interceptors import current_caller, current_request_id
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.settings import Settings


class SecurityEvent:
    """Short names for `falaj.gateway.v1.SecurityEventType` values."""

    MODEL_APPROVED = gateway_messages.SECURITY_EVENT_TYPE_MODEL_APPROVED
    MODEL_PROMOTED = gateway_messages.SECURITY_EVENT_TYPE_MODEL_PROMOTED
    DEPLOYMENT_ROLLED_BACK = gateway_messages.SECURITY_EVENT_TYPE_DEPLOYMENT_ROLLED_BACK
    DATA_ERASED = gateway_messages.SECURITY_EVENT_TYPE_DATA_ERASED
    POLICY_CHANGED = gateway_messages.SECURITY_EVENT_TYPE_POLICY_CHANGED
    CROSS_REGION_ACCESS = gateway_messages.SECURITY_EVENT_TYPE_CROSS_REGION_ACCESS
    ARTIFACT_DIGEST_MISMATCH = gateway_messages.SECURITY_EVENT_TYPE_ARTIFACT_DIGEST_MISMATCH
    CERTIFICATE_REVOKED = gateway_messages.SECURITY_EVENT_TYPE_CERTIFICATE_REVOKED
    EXPERIMENT_CHANGED = gateway_messages.SECURITY_EVENT_TYPE_EXPERIMENT_CHANGED
    OTHER = gateway_messages.SECURITY_EVENT_TYPE_OTHER


class AuditReporter:
    """Sends security events to the gateway's audit log (committed before it returns)."""

    def __init__(self, settings: Settings, *, attempts: int = 3, timeout: float = 5.0):
        self.settings = settings
        self.attempts = attempts
        self.timeout = timeout
        self._channel: grpc.Channel | None = None

    def _stub(self) -> gateway_service.GatewayAdminServiceStub:
        if self._channel is None:
            self._channel = secure_channel(self.settings.gateway_addr, self.settings.pki)
        return gateway_service.GatewayAdminServiceStub(self._channel)

    def report(
        self,
        event_type: gateway_messages.SecurityEventType.ValueType,
        *,
        resource: str,
        action: str,
        allowed: bool = True,
        detail: str = "",
        attributes: Mapping[str, str] | None = None,
        report_id: str = "",
        caller: str | None = None,
    ) -> gateway_messages.AuditRecord:
        """Record one event; raises Unavailable when the audit log cannot be reached."""
        request = gateway_requests.ReportAuditEventRequest(
            event_type=event_type,
            caller=caller if caller is not None else current_caller(),
            domain=self.settings.region,
            resource=resource,
            action=action,
            decision=gateway_messages.DECISION_ALLOW if allowed else gateway_messages.DECISION_DENY,
            detail=detail,
            request_id=current_request_id(),
            attributes=dict(attributes or {}),
            report_id=report_id,
        )
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            try:
                return self._stub().ReportAuditEvent(request, timeout=self.timeout).record
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or attempt == self.attempts:
                    get_logger().error("audit report failed", resource=resource, action=action, code=code.name if code else "?")
                    raise Unavailable(
                        f"the audit log is unavailable ({code.name if code else 'error'}); the action was not recorded"
                    ) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
