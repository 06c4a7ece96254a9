"""Materialization: ingest versions into the offline store, offline store into the online store.

A view's offline data is one ingest dataset version (pinned, or the latest) copied once
into the Parquet offline store. Materializing writes the latest value per entity within
an event-time window to the online store with Feast:
- full: everything up to the window end (from the window start, or the beginning),
  replacing what the view had online;
- incremental: from where the view's last materialization ended up to now (or the
  window end); when the dataset has a newer version, it is pulled first and the window
  reaches back one TTL, so rows that arrived late (event time before the last window's
  end) are not missed.
Every run records rows written per view and the freshness it left (age of the newest
event online). Runs start on demand, on a view's cron schedule, or when its dataset
gets a new version; one background worker runs queued ones.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from croniter import croniter

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, InvalidArgument, NotFound
from falaj_platform.runtime.identity import service_id
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.validate import enum_name, optional_datetime
from falaj_platform.services.features import names
from falaj_platform.services.features.catalog import Catalog
from falaj_platform.services.features.config import FeaturesConfig
from falaj_platform.services.features.feast_repo import EPOCH, FeastRepo
from falaj_platform.services.features.paging import paginate
from falaj_platform.services.features.sources import DatasetSource, VersionInfo
from falaj_platform.services.features.store import FeaturesStore, OfflineSnapshot, ViewState

log = logging.getLogger(__name__)

MODE = messages.MaterializationMode
STATE = messages.MaterializationState
TRIGGER = messages.MaterializationTrigger
_ONE_MICROSECOND = dt.timedelta(microseconds=1)
INTERRUPTED = "the features service stopped before this run finished; materialize again"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def freshness_of(view_name: str, state: ViewState, now: dt.datetime, behind_source: bool = False) -> messages.FeatureViewFreshness:
    answer = messages.FeatureViewFreshness(
        feature_view=view_name,
        last_materialization=f"{names.MATERIALIZATIONS}/{state.last_materialization}" if state.last_materialization else "",
        materialized_dataset_version=state.materialized_dataset_version or "",
        behind_source=behind_source,
    )
    answer.observe_time.FromDatetime(now)
    if state.newest_event_time is not None:
        answer.newest_event_time.FromDatetime(state.newest_event_time)
        answer.freshness.FromTimedelta(max(now - state.newest_event_time, dt.timedelta(0)))
    if state.materialized_until is not None:
        answer.materialized_until.FromDatetime(state.materialized_until)
    return answer


class OfflineData:
    """Keeps each view's offline data at the ingest version it should read."""

    def __init__(self, store: FeaturesStore, repo: FeastRepo, source: DatasetSource, catalog: Catalog):
        self.store = store
        self.repo = repo
        self.source = source
        self.catalog = catalog
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def snapshot(self, version: VersionInfo, event_time_column: str) -> OfflineSnapshot:
        """The offline copy of an ingest version, pulled now unless already held unchanged."""
        with self._lock(version.name):
            with self.store.transaction() as session:
                held = self.store.get_snapshot(session, version.name)
            if held is not None and held.content_hash == version.content_hash and Path(held.path).exists():
                return held
            batches = self.source.read_version(version.name, expected_content_hash=version.content_hash)
            written = self.repo.write_snapshot(version.name, batches, event_time_column)
            snapshot = OfflineSnapshot(
                version.name,
                version.dataset,
                written.path,
                version.content_hash,
                written.row_count,
                written.min_event_time,
                written.max_event_time,
            )
            with self.store.transaction() as session:
                self.store.put_snapshot(session, snapshot)
            return snapshot

    def ensure(self, view_id: str) -> tuple[messages.FeatureView, VersionInfo, OfflineSnapshot]:
        """Point the view's Feast source at the version it should read, pulling it if needed."""
        with self.store.transaction() as session:
            view = self.store.get_feature_view(session, view_id)
        if view is None:
            raise NotFound(f"feature view featureViews/{view_id} does not exist", reason="FEATURE_VIEW_NOT_FOUND")
        version = self.source.get_version(view.source.pinned_version or f"{view.source.dataset}/versions/latest")
        if version.residency_region and version.residency_region != view.residency.region:
            raise FailedPrecondition(
                f"{version.name} is data of region {version.residency_region}, not {view.residency.region}", reason="RESIDENCY_MISMATCH"
            )
        snapshot = self.snapshot(version, view.source.timestamp_column)
        with self.store.transaction() as session:
            state = self.store.get_view_state(session, view_id)
            if state.offline_dataset_version != version.name:
                self.store.put_view_state(session, ViewState(**{**state.__dict__, "offline_dataset_version": version.name}))
                self.catalog.sync_feast(session)
        return view, version, snapshot


class Materializer:
    """Runs materializations and answers for their records and the views' freshness."""

    def __init__(
        self,
        store: FeaturesStore,
        repo: FeastRepo,
        source: DatasetSource,
        offline: OfflineData,
        config: FeaturesConfig,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.store = store
        self.repo = repo
        self.source = source
        self.offline = offline
        self.config = config
        self.on_change = on_change
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-materialize")
        self._cancelled: set[str] = set()
        self._guard = threading.Lock()

    # -- requests ---------------------------------------------------------------------------
    def _views(self, requested: list[str]) -> list[str]:
        with self.store.transaction() as session:
            if not requested:
                views = [v for v in self.store.list_feature_views(session) if v.online]
                if not views:
                    raise FailedPrecondition("there is no online feature view to materialize", reason="NO_ONLINE_VIEWS")
                return [v.name for v in views]
            found = []
            for reference in requested:
                view = self.store.get_feature_view(session, names.parse(reference, names.FEATURE_VIEWS, "feature_views"))
                if view is None:
                    raise NotFound(
                        f"feature view {reference} does not exist", reason="FEATURE_VIEW_NOT_FOUND", metadata={"name": reference}
                    )
                if not view.online:
                    raise FailedPrecondition(f"{reference} is not an online view; nothing to materialize", reason="VIEW_NOT_ONLINE")
                found.append(view.name)
            return found

    def materialize(self, request: requests.MaterializeRequest) -> messages.Materialization:
        if request.mode == MODE.MATERIALIZATION_MODE_UNSPECIFIED:
            raise InvalidArgument("mode is required (FULL or INCREMENTAL)", reason="MODE_REQUIRED")
        enum_name(MODE, request.mode, "mode")
        window_start = optional_datetime(request, "window_start")
        window_end = optional_datetime(request, "window_end")
        if window_start is not None and window_end is not None and window_start >= window_end:
            raise InvalidArgument("window_start must be before window_end", reason="INVALID_WINDOW")
        if request.request_id:
            with self.store.transaction() as session:
                earlier = self.store.materialization_by_request_id(session, request.request_id)
            if earlier is not None:
                return earlier
        run = messages.Materialization(
            name=f"{names.MATERIALIZATIONS}/{uuid.uuid4().hex}",
            feature_views=self._views(list(request.feature_views)),
            mode=request.mode,
            trigger=TRIGGER.MATERIALIZATION_TRIGGER_ON_DEMAND,
            state=STATE.MATERIALIZATION_STATE_QUEUED,
            request_id=request.request_id,
        )
        if request.HasField("window_start"):
            run.window_start.CopyFrom(request.window_start)
        if request.HasField("window_end"):
            run.window_end.CopyFrom(request.window_end)
        return self.submit(run, wait=not request.return_immediately)

    def submit(self, run: messages.Materialization, *, wait: bool) -> messages.Materialization:
        run.create_stamp.actor = current_caller() or service_id("features")
        run.create_stamp.time.FromDatetime(_now())
        with self.store.transaction() as session:
            self.store.insert_materialization(session, run)
        if wait:
            return self._run(run)
        self._executor.submit(self._run_logged, run)
        return run

    def get(self, name: str) -> messages.Materialization:
        run_id = names.parse(name, names.MATERIALIZATIONS)
        with self.store.transaction() as session:
            run = self.store.get_materialization(session, run_id)
        if run is None:
            raise NotFound(f"materialization {name} does not exist", reason="MATERIALIZATION_NOT_FOUND", metadata={"name": name})
        return run

    def list_runs(self, request: requests.ListMaterializationsRequest) -> tuple[list[messages.Materialization], str]:
        with self.store.transaction() as session:
            runs = self.store.list_materializations(
                session,
                state=enum_name(STATE, request.state, "state") if request.state else "",
                trigger=enum_name(TRIGGER, request.trigger, "trigger") if request.trigger else "",
            )
        if request.feature_view:
            runs = [r for r in runs if request.feature_view in r.feature_views]
        filters = {"feature_view": request.feature_view, "state": request.state, "trigger": request.trigger}
        return paginate(runs, request.page_size, request.page_token, filters)

    def cancel(self, request: requests.CancelMaterializationRequest) -> messages.Materialization:
        run = self.get(request.name)
        if run.state == STATE.MATERIALIZATION_STATE_CANCELLED:
            return run
        if run.state not in (STATE.MATERIALIZATION_STATE_QUEUED, STATE.MATERIALIZATION_STATE_RUNNING):
            raise FailedPrecondition(f"{run.name} already finished ({STATE.Name(run.state)})", reason="MATERIALIZATION_FINISHED")
        with self._guard:
            self._cancelled.add(run.name)
        if run.state == STATE.MATERIALIZATION_STATE_QUEUED:
            run.state = STATE.MATERIALIZATION_STATE_CANCELLED
            run.run_end_time.FromDatetime(_now())
            with self.store.transaction() as session:
                self.store.update_materialization(session, run)
        return run

    def freshness(self, requested: list[str]) -> list[messages.FeatureViewFreshness]:
        views = self._views(requested)
        now = _now()
        answers = []
        for name in views:
            view_id = names.parse(name, names.FEATURE_VIEWS)
            with self.store.transaction() as session:
                state = self.store.get_view_state(session, view_id)
                view = self.store.get_feature_view(session, view_id)
            behind = False
            if view is not None and not view.source.pinned_version and state.materialized_dataset_version:
                try:
                    latest = self.source.get_dataset(view.source.dataset).latest_version
                    behind = bool(latest) and latest != state.materialized_dataset_version
                except FalajError:
                    behind = False  # ingest unreachable: freshness still answers from what is known
            answers.append(freshness_of(name, state, now, behind))
        return answers

    # -- running ----------------------------------------------------------------------------
    def _run_logged(self, run: messages.Materialization) -> None:
        try:
            self._run(run)
        except Exception:  # a background run must not die silently
            log.exception("materialization %s failed", run.name)

    def _is_cancelled(self, run: messages.Materialization) -> bool:
        with self._guard:
            return run.name in self._cancelled

    def _run(self, run: messages.Materialization) -> messages.Materialization:
        if self._is_cancelled(run):
            return self.get(run.name)
        run.state = STATE.MATERIALIZATION_STATE_RUNNING
        run.run_start_time.FromDatetime(_now())
        with self.store.transaction() as session:
            self.store.update_materialization(session, run)
        for name in list(run.feature_views):
            if self._is_cancelled(run):
                run.state = STATE.MATERIALIZATION_STATE_CANCELLED
                break
            result = self._materialize_view(run, names.parse(name, names.FEATURE_VIEWS))
            run.results.append(result)
            run.rows_written += result.rows_written
            if result.state == STATE.MATERIALIZATION_STATE_FAILED:
                run.state = STATE.MATERIALIZATION_STATE_FAILED
                run.error_message = run.error_message or f"{name}: {result.error_message}"
        if run.state == STATE.MATERIALIZATION_STATE_RUNNING:
            run.state = STATE.MATERIALIZATION_STATE_SUCCEEDED
        run.run_end_time.FromDatetime(_now())
        with self.store.transaction() as session:
            self.store.update_materialization(session, run)
        with self._guard:
            self._cancelled.discard(run.name)
        self.on_change()
        return run

    def _materialize_view(self, run: messages.Materialization, view_id: str) -> messages.FeatureViewMaterialization:
        view_name = names.name(names.FEATURE_VIEWS, view_id)
        result = messages.FeatureViewMaterialization(feature_view=view_name)
        try:
            view, version, _ = self.offline.ensure(view_id)
            view_ttl_seconds = view.ttl.seconds
            result.dataset_version = version.name
            with self.store.transaction() as session:
                state = self.store.get_view_state(session, view_id)
            end = run.window_end.ToDatetime(dt.UTC) if run.HasField("window_end") else _now()
            full = run.mode == MODE.MATERIALIZATION_MODE_FULL
            if run.HasField("window_start"):
                start = run.window_start.ToDatetime(dt.UTC)
            elif full or state.materialized_until is None:
                start = EPOCH
            elif state.materialized_dataset_version != version.name:
                # A new ingest version may hold rows with event times before the last window's
                # end (late data). Only values younger than the TTL can be served, so the scan
                # goes back one TTL (to the beginning when values never expire).
                ttl = dt.timedelta(seconds=view_ttl_seconds)
                start = min(state.materialized_until, end - ttl) if view_ttl_seconds else EPOCH
            else:
                # Feast's file store reads both window ends inclusively; start just after the last end.
                start = state.materialized_until + _ONE_MICROSECOND
            with self.repo.write_lock:
                if full and start > end:
                    self.repo.clear_online(view_id)
                # A full run replaces the view's online values in one write: old or new, never a mix.
                written = self.repo.materialize(view_id, start, end, replace=full) if start <= end else None
            rows = written.rows_written if written else 0
            newest_candidates = [
                t for t in (None if full else state.newest_event_time, written.newest_event_time if written else None) if t
            ]
            state = ViewState(
                view_id,
                offline_dataset_version=state.offline_dataset_version or version.name,
                materialized_dataset_version=version.name,
                materialized_until=max(end, state.materialized_until) if state.materialized_until and not full else end,
                newest_event_time=max(newest_candidates) if newest_candidates else None,
                last_materialization=run.name.rpartition("/")[2],
            )
            with self.store.transaction() as session:
                self.store.put_view_state(session, state)
            result.window_start.FromDatetime(start)
            result.window_end.FromDatetime(end)
            result.rows_written = rows
            result.state = STATE.MATERIALIZATION_STATE_SUCCEEDED
            result.freshness.CopyFrom(freshness_of(view_name, state, _now()))
        except FalajError as error:
            result.state = STATE.MATERIALIZATION_STATE_FAILED
            result.error_message = error.message
        except Exception as error:  # recorded on the run; the traceback goes to the log
            log.exception("materializing %s failed", view_name)
            result.state = STATE.MATERIALIZATION_STATE_FAILED
            result.error_message = f"internal error ({type(error).__name__}); see the service log"
        return result

    # -- automatic runs ---------------------------------------------------------------------
    def automatic(self, view_name: str, trigger: messages.MaterializationTrigger.ValueType) -> messages.Materialization:
        run = messages.Materialization(
            name=f"{names.MATERIALIZATIONS}/{uuid.uuid4().hex}",
            feature_views=[view_name],
            mode=MODE.MATERIALIZATION_MODE_INCREMENTAL,
            trigger=trigger,
            state=STATE.MATERIALIZATION_STATE_QUEUED,
        )
        return self.submit(run, wait=False)

    def recover(self) -> int:
        """At boot: runs a stopped process left QUEUED or RUNNING end FAILED, saying so; else they
        would stay RUNNING forever, and so would the answer to a retry with their request_id.
        On SQLite a view's online values change only when its write commits (see
        FeastRepo.materialize), so a view the run had not finished keeps its previous values."""
        failed = 0
        with self.store.transaction() as session:
            for state in (STATE.MATERIALIZATION_STATE_QUEUED, STATE.MATERIALIZATION_STATE_RUNNING):
                for run in self.store.list_materializations(session, state=STATE.Name(state)):
                    run.state = STATE.MATERIALIZATION_STATE_FAILED
                    run.error_message = INTERRUPTED
                    run.run_end_time.FromDatetime(_now())
                    self.store.update_materialization(session, run)
                    failed += 1
        if failed:
            log.warning("failed %d materialization(s) left unfinished by a stopped process", failed)
        return failed

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Scheduler:
    """Starts incremental materializations on cron schedules and on new ingest versions."""

    def __init__(
        self, store: FeaturesStore, source: DatasetSource, materializer: Materializer, *, poll_seconds: float, version_poll_seconds: float
    ):
        self.store = store
        self.source = source
        self.materializer = materializer
        self.poll_seconds = poll_seconds
        self.version_poll_seconds = version_poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_due: dict[str, tuple[str, dt.datetime]] = {}
        self._last_version_check = dt.datetime.min.replace(tzinfo=dt.UTC)
        # The last automatic run per view; no new one starts while it is queued or running.
        self._pending: dict[str, str] = {}

    def start(self, stopped: Callable[[float], bool] | None = None) -> None:
        """Tick every poll interval until `stopped(timeout)` (waits up to timeout) says so, or stop()."""
        self._thread = threading.Thread(target=self._loop, args=(stopped,), name="features-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self, stopped: Callable[[float], bool] | None) -> None:
        while not (stopped(self.poll_seconds) if stopped is not None else self._stop.wait(self.poll_seconds)) and not self._stop.is_set():
            try:
                self.tick(_now())
            except Exception:  # the scheduler keeps going; the next tick retries
                log.exception("materialization scheduler tick failed")
        self.materializer.close()

    def tick(self, now: dt.datetime) -> list[messages.Materialization]:
        started = []
        with self.store.transaction() as session:
            views = [v for v in self.store.list_feature_views(session) if v.online]
            states = {v.name: self.store.get_view_state(session, names.parse(v.name, names.FEATURE_VIEWS)) for v in views}
        check_versions = now - self._last_version_check >= dt.timedelta(seconds=self.version_poll_seconds)
        if check_versions:
            self._last_version_check = now
        for view in views:
            if self._busy(view.name):
                continue
            schedule = view.materialization.schedule
            if schedule:
                known = self._next_due.get(view.name)
                if known is None or known[0] != schedule:
                    self._next_due[view.name] = (schedule, croniter(schedule, now).get_next(dt.datetime))
                elif known[1] <= now:
                    self._next_due[view.name] = (schedule, croniter(schedule, now).get_next(dt.datetime))
                    started.append(self._start(view.name, TRIGGER.MATERIALIZATION_TRIGGER_SCHEDULE))
                    continue
            if check_versions and view.materialization.on_new_dataset_version and not view.source.pinned_version:
                materialized = states[view.name].materialized_dataset_version
                try:
                    latest = self.source.get_dataset(view.source.dataset).latest_version
                except FalajError as error:
                    log.warning("cannot check %s for new versions: %s", view.source.dataset, error.message)
                    continue
                if latest and latest != materialized:
                    started.append(self._start(view.name, TRIGGER.MATERIALIZATION_TRIGGER_NEW_DATASET_VERSION))
        return started

    def _start(self, view_name: str, trigger: messages.MaterializationTrigger.ValueType) -> messages.Materialization:
        run = self.materializer.automatic(view_name, trigger)
        self._pending[view_name] = run.name
        return run

    def _busy(self, view_name: str) -> bool:
        pending = self._pending.get(view_name)
        if pending is None:
            return False
        state = self.materializer.get(pending).state
        if state in (STATE.MATERIALIZATION_STATE_QUEUED, STATE.MATERIALIZATION_STATE_RUNNING):
            return True
        del self._pending[view_name]
        return False
