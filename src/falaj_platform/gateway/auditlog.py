"""The gateway's audit writer: group commit, so the log keeps up and nothing acknowledged is lost.

Request threads hand their record to `append` and wait; one writer thread commits all
waiting records in one transaction (one fsync), then wakes them. A call's final status
reaches the client only after its record is committed, so a SIGKILL can lose only
records of calls that had not returned yet. Signed checkpoints are written every
`checkpoint_records` records or `checkpoint_seconds`, and mirrored to an anchor file
outside the database so that cutting the tail of the table is also detected.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from falaj_platform.gateway.chain import AuditEntry, ChainedRecord, Checkpoint, sign_checkpoint
from falaj_platform.gateway.store import GatewayStore
from falaj_platform.runtime.errors import Unavailable
from falaj_platform.runtime.logs import get_logger


def read_anchor(path: Path) -> Checkpoint | None:
    """The checkpoint mirrored in the anchor file, if there is one."""
    import datetime as dt

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return Checkpoint(-1, "", dt.datetime.now(dt.UTC), b"", "unreadable")
    return Checkpoint(
        int(data["sequence"]),
        str(data["hash"]),
        dt.datetime.fromisoformat(data["time"]),
        bytes.fromhex(data["signature"]),
        str(data["key_id"]),
    )


def _write_anchor(path: Path, checkpoint: Checkpoint) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = {
        "sequence": checkpoint.sequence,
        "hash": checkpoint.hash,
        "time": checkpoint.time.isoformat(),
        "signature": checkpoint.signature.hex(),
        "key_id": checkpoint.key_id,
    }
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class AuditLog:
    """Batched, durable, hash-chained appends to the gateway's audit table."""

    def __init__(
        self,
        store: GatewayStore,
        signing_key: ed25519.Ed25519PrivateKey,
        anchor_path: Path,
        *,
        max_batch: int = 2000,
        checkpoint_records: int = 1000,
        checkpoint_seconds: float = 2.0,
        wait_seconds: float = 10.0,
    ):
        self.store = store
        self.signing_key = signing_key
        self.anchor_path = anchor_path
        self.max_batch = max_batch
        self.checkpoint_records = checkpoint_records
        self.checkpoint_seconds = checkpoint_seconds
        self.wait_seconds = wait_seconds
        self._pending: list[tuple[AuditEntry, Future[ChainedRecord]]] = []
        self._wake = threading.Condition()
        self._stopping = False
        anchor = read_anchor(anchor_path)
        self._last_checkpoint_sequence = anchor.sequence if anchor else 0
        self._head: tuple[int, str] | None = None  # last head this writer committed
        self._last_checkpoint_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def append(self, entry: AuditEntry) -> ChainedRecord:
        """Commit one record (with whatever else is waiting) and return it chained."""
        future: Future[ChainedRecord] = Future()
        with self._wake:
            if self._stopping:
                raise Unavailable("the audit log is shutting down", reason="AUDIT_UNAVAILABLE")
            self._pending.append((entry.cleaned(), future))
            self._wake.notify()
        try:
            return future.result(timeout=self.wait_seconds)
        except Exception as error:
            raise Unavailable("the audit log could not record this call; it was refused", reason="AUDIT_UNAVAILABLE") from error

    def _run(self) -> None:
        log = get_logger()
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait(timeout=self.checkpoint_seconds)
                    if not self._pending:
                        break
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                stopping = self._stopping
            if batch:
                try:
                    records = self.store.append_audit([entry for entry, _ in batch])
                except Exception as error:  # noqa: BLE001 - reported to every waiter
                    log.error("audit batch failed", records=len(batch), error=type(error).__name__)
                    for _, future in batch:
                        future.set_exception(error)
                else:
                    for (_, future), record in zip(batch, records, strict=True):
                        future.set_result(record)
                    newest = max(records, key=lambda r: r.sequence)
                    if self._head is None or newest.sequence > self._head[0]:
                        self._head = (newest.sequence, newest.hash)
            self._maybe_checkpoint(force=stopping)
            if stopping and not self._pending:
                return

    def _maybe_checkpoint(self, *, force: bool = False) -> None:
        if self._head is None:
            try:
                self._head = self.store.head()
            except Exception:  # noqa: BLE001 - the next round tries again
                return
        sequence, digest = self._head
        behind = sequence - self._last_checkpoint_sequence
        due = behind >= self.checkpoint_records or (
            behind > 0 and (force or time.monotonic() - self._last_checkpoint_time >= self.checkpoint_seconds)
        )
        if not due:
            return
        checkpoint = sign_checkpoint(self.signing_key, sequence, digest)
        try:
            self.store.add_checkpoint(checkpoint)
            _write_anchor(self.anchor_path, checkpoint)
        except Exception as error:  # noqa: BLE001 - retried on the next round
            get_logger().error("audit checkpoint failed", error=type(error).__name__)
            return
        self._last_checkpoint_sequence, self._last_checkpoint_time = sequence, time.monotonic()

    def checkpoint_now(self) -> None:
        """Sign the current head at once (operators before a backup; tests)."""
        with self._wake:
            self._maybe_checkpoint(force=True)

    def close(self) -> None:
        """Commit what is waiting, write a final checkpoint, stop the writer."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
