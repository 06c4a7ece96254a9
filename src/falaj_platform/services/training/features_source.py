"""The production training-data source: the features service's historical retrieval.

`FeaturesServiceDataSource` calls `falaj.features.v1.FeaturesService/GetHistoricalFeatures`
through the gateway with the training service's own identity, streams the joined rows
as Arrow IPC batches (bounded messages, never one giant one), checks each batch's row
count and the manifest's content hash, and leaves out rows of data subjects who have
not consented to training (the features service applies the `training` purpose).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import grpc
import pyarrow as pa
import pyarrow.ipc
from google.protobuf import timestamp_pb2

from falaj.features.v1 import message_pb2 as features_messages
from falaj.features.v1 import request_response_pb2 as features_requests
from falaj.features.v1 import service_pb2_grpc as features_service
from falaj.sdk.errors import from_rpc_error
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from falaj_platform.services.training.data import TrainingSet, check_training_table, pick_timestamp_column
from falaj_platform.services.training.plan import JobFailed
from falaj_platform.services.training.spec import DataSelection

PHASE = "TRAINING_PHASE_PREPARING_DATA"
TRAINING_PURPOSE = "training"


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(round(unix_seconds * 1e9)))
    return stamp


def retrieval_request(selection: DataSelection, consent_purpose: str = TRAINING_PURPOSE) -> features_requests.GetHistoricalFeaturesRequest:
    """The GetHistoricalFeatures request of a job's data selection."""
    features = (
        features_messages.FeatureSelection(feature_service=selection.feature_service)
        if selection.feature_service
        else features_messages.FeatureSelection(features=features_messages.FeatureReferences(references=selection.feature_references))
    )
    entities = features_messages.EntityDatasetSource(
        dataset_version=selection.dataset_version,
        event_timestamp_column=selection.event_timestamp_column,
        carry_columns=[selection.label_column],
    )
    if selection.start_time_unix is not None:
        entities.start_time.CopyFrom(_timestamp(selection.start_time_unix))
    if selection.end_time_unix is not None:
        entities.end_time.CopyFrom(_timestamp(selection.end_time_unix))
    return features_requests.GetHistoricalFeaturesRequest(
        features=features, entity_dataset=entities, full_feature_names=True, consent_purpose=consent_purpose
    )


def _failure(error: grpc.RpcError, selection: DataSelection) -> JobFailed:
    """The job failure for a refused retrieval, classified by the features service's ErrorInfo reason."""
    typed = from_rpc_error(error)
    reason = typed.reason.upper()
    message = f"the features service refused the training set: {typed.message}"
    label = selection.label_column
    if reason == "CONSENT_FILTER_UNAVAILABLE":
        return JobFailed(
            "POLICY_DENIED",
            f"{message}. Jobs train only on rows whose data subjects consented to training; nothing was trained. "
            "An operator may set FALAJ_TRAINING_CONSENT_PURPOSE='' for data without data subjects.",
            phase=PHASE,
        )
    if (
        label
        and (f"'{label}'" in typed.message or f'"{label}"' in typed.message)
        and isinstance(typed, NotFound | InvalidArgument | FailedPrecondition)
    ):
        return JobFailed("MISSING_LABEL", message, phase=PHASE)
    if isinstance(typed, NotFound):
        if "FEATURE" in reason or ("dataset" not in typed.message.lower() and not reason.startswith("DATASET")):
            return JobFailed("UNKNOWN_FEATURE", message, phase=PHASE)
        return JobFailed("INSUFFICIENT_DATA", message, phase=PHASE)
    if isinstance(typed, PermissionDenied) or "RESIDENCY" in reason or "CONSENT" in reason:
        return JobFailed("POLICY_DENIED", message, phase=PHASE)
    if isinstance(typed, InvalidArgument | FailedPrecondition):
        return JobFailed("UNKNOWN_FEATURE" if "FEATURE" in reason else "INSUFFICIENT_DATA", message, phase=PHASE)
    return JobFailed("INTERNAL", f"the features service could not be read ({typed.code.name}): {typed.message}", phase=PHASE)


class FeaturesServiceDataSource:
    """Training sets from the features service, called through the gateway."""

    def __init__(
        self, channel_factory: Callable[[], grpc.Channel], *, consent_purpose: str = TRAINING_PURPOSE, timeout_seconds: float = 3600.0
    ):
        self._channel_factory = channel_factory
        self._channel: grpc.Channel | None = None
        # "training" leaves out rows of data subjects who did not consent; "" (an operator's
        # choice, for data without data subjects) asks for no consent filter.
        self.consent_purpose = consent_purpose
        self.timeout_seconds = timeout_seconds

    def _stub(self) -> features_service.FeaturesServiceStub:
        if self._channel is None:
            self._channel = self._channel_factory()
        return features_service.FeaturesServiceStub(self._channel)

    def fetch(self, selection: DataSelection, *, job_id: str, cancelled: Callable[[], bool]) -> TrainingSet:
        request = retrieval_request(selection, self.consent_purpose)
        batches: list[pa.Table] = []
        digest = hashlib.sha256()
        manifest: features_messages.RetrievalManifest | None = None
        call = self._stub().GetHistoricalFeatures(request, timeout=self.timeout_seconds, metadata=[("x-request-id", f"training-{job_id}")])
        try:
            for message in call:
                if cancelled():
                    call.cancel()
                    raise JobFailed("INTERNAL", "cancelled while fetching the training set", phase=PHASE)
                if message.WhichOneof("payload") == "manifest":
                    manifest = message.manifest
                    continue
                data = message.batch.arrow_ipc
                digest.update(data)
                table = pyarrow.ipc.open_stream(pa.BufferReader(data)).read_all()
                if message.batch.row_count and table.num_rows != message.batch.row_count:
                    raise JobFailed(
                        "INTERNAL",
                        f"a training-set batch has {table.num_rows} rows, not the {message.batch.row_count} announced",
                        phase=PHASE,
                    )
                batches.append(table)
        except grpc.RpcError as error:
            raise _failure(error, selection) from None
        if manifest is None:
            raise JobFailed("INTERNAL", "the features service ended the training set without its manifest", phase=PHASE)
        content_hash = digest.hexdigest()
        if manifest.content_hash and manifest.content_hash != content_hash:
            raise JobFailed("INTERNAL", "the training set changed in transit: its SHA-256 differs from the manifest's", phase=PHASE)
        references = tuple(manifest.feature_references) or selection.feature_references
        table = pa.concat_tables(batches, promote_options="default") if batches else pa.table({})
        renamed = {}
        for reference in references:
            view, feature = reference.split(":", 1)
            for candidate in (f"{view}__{feature}", reference, feature):
                if candidate in table.column_names:
                    renamed[reference] = table.column(candidate)
                    break
        if len(renamed) < len(references) and table.num_columns >= len(references):
            # Feature columns come last, in reference order (a feature service may prefix
            # them with a projection alias rather than the view name).
            renamed = dict(zip(references, table.columns[-len(references) :], strict=True))
        if selection.label_column in table.column_names:
            renamed[selection.label_column] = table.column(selection.label_column)
        timestamp = pick_timestamp_column(table, selection.event_timestamp_column, {selection.label_column})
        if timestamp and timestamp not in renamed:
            renamed[timestamp] = table.column(timestamp)
        result = pa.table(renamed) if renamed else table
        check_training_table(result, references, selection.label_column)
        views = tuple(snapshot.feature_view.removeprefix("featureViews/") for snapshot in manifest.feature_views)
        versions = tuple(
            dict.fromkeys(
                [manifest.entity_dataset_version or selection.dataset_version, *(s.dataset_version for s in manifest.feature_views)]
            )
        )
        return TrainingSet(
            table=result,
            feature_references=references,
            label_column=selection.label_column,
            timestamp_column=timestamp,
            retrieval_id=manifest.retrieval_id,
            feature_service=manifest.feature_service or selection.feature_service,
            feature_views=views or tuple(sorted({r.split(":", 1)[0] for r in references})),
            dataset_versions=versions,
            content_hash=content_hash,
            rows_excluded_without_consent=manifest.rows_excluded_without_consent,
        )

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
