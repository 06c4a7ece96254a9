"""The real ingest service in a child process that stops dead between writing a commit's files and its catalog row.

Run by test_crash_recovery.py: the store's catalog insert is replaced by one that
announces (by creating MARKER) that the Parquet files are written, synced and renamed
into place, then waits to be killed with SIGKILL.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import load_settings
from falaj_platform.services.ingest import store
from falaj_platform.services.ingest.server import SPEC


def main() -> None:
    marker = Path(os.environ["CRASH_MARKER"])

    def stall(self: store.IngestStore, session: Any, version: store.NewVersion) -> str:
        marker.write_text(version.commit_dir)
        threading.Event().wait()  # until SIGKILL
        raise AssertionError("unreachable")

    store.IngestStore.insert_version = stall  # type: ignore[method-assign]
    settings = load_settings("ingest")
    running, _ = start_service(SPEC, settings)
    print(f"listening {running.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
