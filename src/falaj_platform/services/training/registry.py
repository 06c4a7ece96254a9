"""Model registry rules shared by the job runner and the API.

- A registered model has one residency region and one task; every version matches them,
  and the service only holds models of its own region.
- Version numbers grow by one per registration, allocated atomically.
- Aliases are free-form names; protected ones (`production` by default) move only
  through an approved promotion request, approved by an identity other than the one that
  trained or imported the version (separation of duties).
- An artifact is encrypted before its version row is written; if the row cannot be
  written the artifact file is removed, so nothing half-registered remains.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session

from falaj_platform.runtime.audit import SecurityEvent
from falaj_platform.runtime.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.training import names
from falaj_platform.services.training.artifacts import ArtifactStore, StoredArtifact
from falaj_platform.services.training.errors import ArtifactIntegrityError
from falaj_platform.services.training.store import ModelVersionRecord, RegisteredModelRecord, TrainingStore, artifact_columns


class AuditSink(Protocol):
    """What the service needs of the audit log (`runtime.audit.AuditReporter` in production)."""

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
    ) -> object: ...


def new_etag() -> str:
    return secrets.token_hex(8)


def check_separation_of_duties(decider: str, trained_by: str, action: str) -> None:
    """The identity that trained or imported a version may not approve (or reject) its promotion."""
    if decider == trained_by:
        raise PermissionDenied(
            f"{decider} trained or imported this version and may not {action} its promotion; another identity must (separation of duties)",
            reason="SEPARATION_OF_DUTIES",
            metadata={"trained_by": trained_by},
        )


def check_etag(given: str, current: str, what: str) -> None:
    if given and given != current:
        raise Aborted(f"{what} changed since it was read (etag {given} is stale); read it again", reason="ETAG_MISMATCH")


@dataclass(frozen=True)
class NewVersion:
    """Everything a registration records besides the artifact."""

    source: str
    signature_json: str
    metrics: dict[str, float]
    results_json: str
    lineage_json: str
    tags: dict[str, str]
    description: str
    trained_by: str
    training_job: str | None = None


class Registry:
    """Registered models and versions over the store and the encrypted artifact store."""

    def __init__(self, store: TrainingStore, artifacts: ArtifactStore, region: str, protected_aliases: frozenset[str]):
        self.store = store
        self.artifacts = artifacts
        self.region = region
        self.protected_aliases = protected_aliases

    def check_region(self, region: str) -> None:
        if region != self.region:
            raise PermissionDenied(
                f"this training service holds models of region {self.region}; {region} is another region",
                reason="RESIDENCY_VIOLATION",
                metadata={"residency_region": region},
            )

    def require_model(self, session: Session, model: str) -> RegisteredModelRecord:
        record = self.store.get_model(session, model)
        if record is None:
            raise NotFound(f"registered model models/{model} does not exist", reason="MODEL_NOT_FOUND")
        return record

    def ensure_model(self, session: Session, model: str, *, task: str, region: str, owner: str, now: dt.datetime) -> RegisteredModelRecord:
        """The registered model, created (owned by `owner`) when absent; its task and region must match."""
        record = self.store.get_model(session, model)
        if record is None:
            self.check_region(region)
            self.store.insert_model(
                session,
                name=model,
                display_name=model,
                owner=owner,
                residency_region=region,
                task=task,
                etag=new_etag(),
                created_by=owner,
                created_at=now,
                updated_by=owner,
                updated_at=now,
            )
            return self.require_model(session, model)
        if record.task != task:
            raise FailedPrecondition(f"models/{model} is a {record.task} model; this version is {task}", reason="TASK_MISMATCH")
        if record.residency_region != region:
            raise FailedPrecondition(
                f"models/{model} lives in region {record.residency_region}; this version's data is from {region}",
                reason="RESIDENCY_MISMATCH",
            )
        return record

    def resolve_version(self, session: Session, model: str, version: str) -> ModelVersionRecord:
        """A version by number or alias."""
        target = int(version) if names.is_number(version) else self.store.alias_target(session, model, names.check_alias(version))
        if target is None:
            self.require_model(session, model)
            raise NotFound(f"models/{model} has no alias {version!r}", reason="ALIAS_NOT_FOUND")
        number = target
        record = self.store.get_version(session, model, number)
        if record is None:
            self.require_model(session, model)
            raise NotFound(f"model version models/{model}/versions/{number} does not exist", reason="VERSION_NOT_FOUND")
        return record

    def register(
        self,
        model: RegisteredModelRecord,
        version: NewVersion,
        pieces: Iterable[bytes],
        *,
        actor: str,
        now: Callable[[], dt.datetime],
        aliases: Iterable[str] = (),
        within: Callable[[Session, int], None] = lambda _session, _number: None,
    ) -> int:
        """Encrypt the artifact, then record the version (and move `aliases`) in one transaction.

        `within(session, number)` runs in the same transaction (a job marks itself
        succeeded there), so the job and its version commit together or not at all.
        """
        stored = self.artifacts.write(model.name, pieces)
        try:
            with self.store.session() as session:
                number = self.store.next_version_number(session, model.name)
                self.insert_version(session, model, number, version, stored, actor=actor, now=now())
                for alias in aliases:
                    self.store.set_alias(session, model.name, alias, number, actor, now())
                within(session, number)
        except BaseException:
            self.artifacts.delete(stored.path)
            raise
        return number

    def insert_version(
        self,
        session: Session,
        model: RegisteredModelRecord,
        number: int,
        version: NewVersion,
        stored: StoredArtifact,
        *,
        actor: str,
        now: dt.datetime,
    ) -> None:
        self.store.insert_version(
            session,
            model=model.name,
            version_number=number,
            source=version.source,
            state="READY",
            residency_region=model.residency_region,
            training_job=version.training_job,
            signature_json=version.signature_json,
            metrics_json=json.dumps(version.metrics, sort_keys=True),
            results_json=version.results_json,
            lineage_json=version.lineage_json,
            artifact_format="ONNX",
            tags_json=json.dumps(version.tags, sort_keys=True),
            description=version.description,
            trained_by=version.trained_by,
            etag=new_etag(),
            created_by=actor,
            created_at=now,
            updated_by=actor,
            updated_at=now,
            **artifact_columns(stored),
        )

    def load_verified(self, record: ModelVersionRecord, audit: AuditSink, *, action: str, caller: str | None = None) -> bytes:
        """The plaintext artifact after its tags and digest are checked; a mismatch is audited."""
        try:
            return self.artifacts.read_all(record.artifact)
        except ArtifactIntegrityError as error:
            report_digest_mismatch(audit, record, error, action=action, caller=caller)
            raise


def report_digest_mismatch(
    audit: AuditSink, record: ModelVersionRecord, error: ArtifactIntegrityError, *, action: str, caller: str | None
) -> None:
    """Record a tampered artifact in the audit log; the refusal stands even if the log is down."""
    resource = names.version_name(record.model, record.version_number)
    try:
        audit.report(
            SecurityEvent.ARTIFACT_DIGEST_MISMATCH,
            resource=resource,
            action=action,
            allowed=False,
            detail=error.message,
            attributes={"artifact_path": record.artifact.path, "sha256": record.artifact.sha256, "reason": error.reason},
            caller=caller,
        )
    except Exception as failure:  # noqa: BLE001 - the artifact stays refused; the failure is logged
        get_logger().error("could not audit an artifact digest mismatch", resource=resource, error=str(failure))
