"""Webhook delivery: one HTTP POST of a signed JSON notification, and which URLs are allowed.

HTTPS is required except for loopback receivers (local tools and tests), so that a
notification never crosses a network in clear text.
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from falaj_platform.services.monitoring.alerting import SIGNATURE_HEADER, signature

USER_AGENT = "falaj-monitoring/1"
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "user-agent", SIGNATURE_HEADER.lower()})


class WebhookUrlError(ValueError):
    """A URL notifications may not be sent to."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise WebhookUrlError(f"webhook url {url!r} is not an http(s) URL with a host")
    if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
        raise WebhookUrlError(f"webhook url {url!r} must use https (plain http is allowed only for loopback receivers)")
    if parsed.username or parsed.password:
        raise WebhookUrlError("webhook url must not carry credentials; use headers or a signing secret")


def check_headers(headers: Mapping[str, str]) -> None:
    for name in headers:
        if name.lower() in RESERVED_HEADERS or not name or any(c in name for c in "\r\n:"):
            raise WebhookUrlError(f"header {name!r} cannot be set on a webhook")


@dataclass(frozen=True)
class Attempt:
    """Outcome of one POST: HTTP status (0 when no response came) and the error, if any."""

    http_status: int
    error: str


def post(url: str, body: bytes, *, headers: Mapping[str, str], secret: str | None, timeout: float) -> Attempt:
    """POST `body` as JSON; never raises for network or HTTP failures."""
    request = urllib.request.Request(url, data=body, method="POST")
    for name, value in headers.items():
        request.add_header(name, value)
    request.add_header("Content-Type", "application/json")
    request.add_header("User-Agent", USER_AGENT)
    if secret:
        request.add_header(SIGNATURE_HEADER, signature(secret, body))
    # Redirects are not followed: a receiver moving elsewhere must be reconfigured.
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            return Attempt(int(response.status), "")
    except urllib.error.HTTPError as error:
        return Attempt(int(error.code), f"receiver answered HTTP {error.code}")
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return Attempt(0, f"no response: {reason}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None
