"""Where imports may read from: never the platform's own files or databases, and remote
locations only where an operator allowed them.

- File imports read local paths outside the protected folders (FALAJ_HOME, the PKI, the
  platform's SQLite files). Any other fsspec URL (http, s3, memory, a chained `a::b` URL)
  must start with a prefix of FALAJ_INGEST_ALLOWED_URL_PREFIXES, so a caller cannot make
  the ingest host fetch internal addresses.
- SQL imports never open a SQLite file under a protected folder, nor a database the
  platform itself uses (FALAJ_<COMPONENT>_DATABASE_URL): on PostgreSQL the same server and
  database, elsewhere (MySQL, where one connection can query every database of its
  server) the same server. With FALAJ_INGEST_SQL_ALLOWED_HOSTS set, only the hosts it names.

Every refusal is PERMISSION_DENIED with one of `REFUSALS` as its reason; the caller reports
it to the audit log as a denied import (`report_refusal`).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote

import fsspec
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj_platform.runtime.errors import FalajError, InvalidArgument, PermissionDenied
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.ingest.residency import AuditSink

URL_PREFIXES_SETTING = "FALAJ_INGEST_ALLOWED_URL_PREFIXES"
SQL_HOSTS_SETTING = "FALAJ_INGEST_SQL_ALLOWED_HOSTS"

# Reasons of the refusals of this module: each is reported to the audit log as a denial.
REFUSALS = frozenset({"PROTECTED_PATH", "URL_NOT_ALLOWED", "PLATFORM_DATABASE", "SQL_HOST_NOT_ALLOWED"})

_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}
_LOOPBACK = "<this host>"

T = TypeVar("T")


# -- local paths ------------------------------------------------------------------------------------


def under_protected_root(path: str, protected_roots: Sequence[str]) -> bool:
    """Whether `path` (symlinks and `..` resolved) is, or is inside, one of the (resolved) roots."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in protected_roots)


def refuse_protected_path(path: str, protected_roots: Sequence[str], what: str = "file imports") -> None:
    if under_protected_root(path, protected_roots):
        raise PermissionDenied(f"{what} may not read the platform's own data, keys or certificates", reason="PROTECTED_PATH")


# -- remote URLs ------------------------------------------------------------------------------------


def mask_url(uri: str) -> str:
    """`uri` without user info or query string (either may carry credentials)."""
    shown = uri.split("?", 1)[0].split("#", 1)[0]
    if "://" in shown:
        scheme, rest = shown.split("://", 1)
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            shown = f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"
    return shown + ("?***" if "?" in uri else "")


def is_local(uri: str) -> bool:
    """A plain path or file:// URL; anything fsspec would fetch elsewhere (or chain) is not."""
    if "::" in uri:
        return False
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol is None or protocol in _LOCAL_PROTOCOLS


def _matches_prefix(uri: str, prefix: str) -> bool:
    # A prefix ends at a path boundary: `https://host` does not allow `https://host.evil.com`.
    return uri == prefix or uri.startswith(prefix if prefix.endswith("/") else prefix + "/")


def _has_dot_segments(uri: str) -> bool:
    path = unquote(uri.split("?", 1)[0].split("#", 1)[0]).replace("\\", "/")
    return any(segment in (".", "..") for segment in path.split("/"))


def check_file_uri(uri: str, allowed_prefixes: Sequence[str]) -> None:
    """Local paths pass (the protected-folder rule applies once they are resolved); a remote URL
    must start with an allowed prefix, with no `.`/`..` segment that could climb out of it."""
    if is_local(uri):
        return
    if any(_matches_prefix(uri, prefix) for prefix in allowed_prefixes) and not _has_dot_segments(uri):
        return
    configured = f"{len(allowed_prefixes)} prefix(es) configured" if allowed_prefixes else "empty: only local paths may be imported"
    raise PermissionDenied(
        f"{mask_url(uri)} is not a local path and is not under a URL prefix allowed by {URL_PREFIXES_SETTING} ({configured}); "
        "an operator allows remote locations by listing their prefixes there",
        reason="URL_NOT_ALLOWED",
        metadata={"setting": URL_PREFIXES_SETTING},
    )


def check_url_prefix(prefix: str) -> str:
    """One entry of FALAJ_INGEST_ALLOWED_URL_PREFIXES; ValueError names what is wrong with it."""
    prefix = prefix.strip()
    scheme, separator, rest = prefix.partition("://")
    if not scheme or not separator or "::" in prefix:
        raise ValueError(f"{prefix!r} is not a URL prefix like https://host/path/ or s3://bucket/ (local paths are always allowed)")
    if _has_dot_segments(rest):
        raise ValueError(f"{prefix!r} has a '.' or '..' segment")
    return prefix


# -- SQL databases ------------------------------------------------------------------------------------


def sqlite_files(url: sa.engine.URL) -> list[str]:
    """The file a SQLite URL opens, under each reading the driver may give it (a plain name, or
    with `uri` a `file:` URI); empty for an in-memory database."""
    database = url.database or ""
    if database in ("", ":memory:"):
        return []
    if "\x00" in database or "%00" in database:
        raise InvalidArgument("sql.sqlalchemy_url names no valid SQLite file", reason="INVALID_SQL_URL")
    files = [os.path.abspath(database)]
    if database.startswith("file:"):
        path = database[len("file:") :].split("?", 1)[0].split("#", 1)[0]
        if path.startswith("//"):
            path = "/" + path[2:].partition("/")[2]  # file://host/path: SQLite ignores (or refuses) the authority
        if path:
            files.append(os.path.abspath(unquote(path)))
    return files


def sqlite_files_of(raw: str) -> list[str]:
    """The files of a SQLite database URL; empty for any other (or a malformed) URL."""
    url = _parse(raw)
    return sqlite_files(url) if url is not None and url.get_backend_name() == "sqlite" else []


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` of FALAJ_INGEST_SQL_ALLOWED_HOSTS (ValueError if malformed)."""
    entry = entry.strip()
    host, port = entry, ""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{entry!r} is not host, host:port or [ipv6]:port")
        port = rest[1:]
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    if not host or any(c in host for c in "/@?#[] "):
        raise ValueError(f"{entry!r} is not host, host:port or [ipv6]:port")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{entry!r} has no valid port")
    return host.lower(), int(port) if port else None


def _query_values(url: sa.engine.URL, *keys: str, split: bool = True) -> list[str]:
    values: list[str] = []
    for key in keys:
        raw = url.query.get(key)
        items = raw if isinstance(raw, tuple) else () if raw is None else (raw,)
        for item in map(str, items):
            values.extend([p.strip() for p in item.split(",") if p.strip()] if split else [item])
    return values


@functools.lru_cache(maxsize=1)
def _this_hosts_addresses() -> frozenset[str]:
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except (OSError, ValueError):
        return frozenset()


def _address_tokens(host: str) -> set[str]:
    """The host as written and every address it resolves to; loopback, unix sockets and this
    host's own addresses all become one token, since they reach the same local server."""
    if host == _LOOPBACK:
        return {_LOOPBACK}
    tokens = {host}
    try:
        addresses = {str(ipaddress.ip_address(host))}
    except ValueError:
        try:
            addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
        except (OSError, ValueError):
            addresses = set()
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        local = ip.is_loopback or ip.is_unspecified or address in _this_hosts_addresses()
        tokens.add(_LOOPBACK if local else str(ip))
    return tokens


@dataclass(frozen=True)
class _Server:
    """Where a network database URL connects: host names (as written), ports and database."""

    backend: str
    hosts: tuple[str, ...]
    ports: frozenset[int]
    database: str

    @classmethod
    def of(cls, url: sa.engine.URL) -> _Server:
        backend = url.get_backend_name()
        named = ([url.host] if url.host else []) + _query_values(url, "host", "hostaddr", "unix_socket")
        hosts = tuple(dict.fromkeys(_host_name(h) for h in named)) or (_LOOPBACK,)  # no host: the local socket
        ports = {url.port} if url.port else set()
        ports |= {int(p) for p in _query_values(url, "port") if p.isdigit()}
        if not ports and backend in _DEFAULT_PORTS:
            ports = {_DEFAULT_PORTS[backend]}
        database = next(iter(_query_values(url, "dbname", "database", "db", split=False)), "") or url.database or ""
        if backend == "postgresql" and not database:
            database = url.username or ""  # libpq's default database is the user's name
        return cls(backend, hosts, frozenset(ports), database)

    @functools.cached_property
    def tokens(self) -> frozenset[str]:
        return frozenset().union(*(_address_tokens(h) for h in self.hosts))

    def same_server(self, other: _Server) -> bool:
        if self.ports and other.ports and not self.ports & other.ports:
            return False
        return bool(self.tokens & other.tokens)


def _host_name(host: str) -> str:
    host = host.strip().strip("[]").lower()
    if not host or host.startswith("/") or host in ("localhost", "localhost."):
        return _LOOPBACK
    return host


def _parse(raw: str) -> sa.engine.URL | None:
    try:
        return sa.engine.make_url(raw)
    except sa_exc.ArgumentError:
        return None


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # a hard link to the platform's file
    except (OSError, ValueError):
        return False


def check_sql_url(
    url: sa.engine.URL,
    *,
    protected_roots: Sequence[str],
    platform_databases: Mapping[str, str],
    allowed_hosts: Sequence[str],
) -> None:
    """Refuse the platform's own databases, SQLite files in protected folders, and hosts outside the allow-list."""
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        paths = sqlite_files(url)
        for component, raw in platform_databases.items():
            own_paths = sqlite_files_of(raw)
            if any(_same_file(path, own_path) for path in paths for own_path in own_paths):
                raise PermissionDenied(
                    f"SQL imports may not read the platform's own databases: {shown} is the {component} database",
                    reason="PLATFORM_DATABASE",
                )
        for path in paths:
            refuse_protected_path(path, protected_roots, "SQL imports")
        return  # a local file elsewhere, as for file imports: the host allow-list is about servers
    server = _Server.of(url)
    for component, raw in platform_databases.items():
        own = _parse(raw)
        if own is None or own.get_backend_name() == "sqlite":
            continue
        platform = _Server.of(own)
        # PostgreSQL keeps databases apart; on other servers one connection can query every database.
        same_database = platform.backend != "postgresql" or server.database == platform.database
        if same_database and server.same_server(platform):
            raise PermissionDenied(
                f"SQL imports may not read the platform's own databases: {shown} is the {component} database", reason="PLATFORM_DATABASE"
            )
    if allowed_hosts:
        rules = [parse_host_entry(entry) for entry in allowed_hosts]
        for host in server.hosts:
            name = "localhost" if host == _LOOPBACK else host
            if not any(name == allowed and (port is None or port in server.ports) for allowed, port in rules):
                raise PermissionDenied(
                    f"{shown} connects to {name}, which {SQL_HOSTS_SETTING} does not allow (allowed: {', '.join(allowed_hosts)})",
                    reason="SQL_HOST_NOT_ALLOWED",
                    metadata={"setting": SQL_HOSTS_SETTING},
                )


# -- audit ------------------------------------------------------------------------------------


def report_refusal(audit: AuditSink, error: PermissionDenied, *, resource: str, action: str, caller: str) -> None:
    """A refused import source as a denial in the audit log (best effort: the refusal stands either way)."""
    try:
        audit.report(
            gateway_messages.SECURITY_EVENT_TYPE_OTHER,
            resource=resource,
            action=action,
            allowed=False,
            detail=error.message[:500],
            attributes={"event_name": "IMPORT_SOURCE_REFUSED", "refusal_reason": error.reason},
            caller=caller,
        )
    except FalajError as failure:
        get_logger().error("an import source refusal could not be audited", resource=resource, error=failure.message)


def audited(audit: AuditSink, read: Callable[[], T], *, resource: str, action: str, caller: str) -> T:
    """`read()`, reporting a refusal of this module to the audit log before it is raised."""
    try:
        return read()
    except PermissionDenied as error:
        if error.reason in REFUSALS:
            report_refusal(audit, error, resource=resource, action=action, caller=caller)
        raise
