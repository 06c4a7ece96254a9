"""Thin gRPC servicer of `falaj.ingest.v1.IngestService`: proto -> domain -> proto.

Every method names the caller (the identity the gateway authenticated) and delegates;
typed errors raised below become gRPC statuses in the runtime's interceptor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj.ingest.v1 import service_pb2_grpc
from falaj_platform.runtime.errors import Aborted, InvalidArgument
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.settings import Settings
from falaj_platform.runtime.validate import optional_datetime
from falaj_platform.services.ingest import names, paging, readers
from falaj_platform.services.ingest.catalog import Catalog
from falaj_platform.services.ingest.commits import Committer, Idempotency, IngestInput, Options, Origin
from falaj_platform.services.ingest.config import IngestConfig
from falaj_platform.services.ingest.consent import Consents
from falaj_platform.services.ingest.erasure import Eraser
from falaj_platform.services.ingest.quarantine import Quarantine
from falaj_platform.services.ingest.residency import AuditSink, ResidencyGuard
from falaj_platform.services.ingest.sources import SERVICE, SourceManager
from falaj_platform.services.ingest.storage import VersionStorage
from falaj_platform.services.ingest.store import IngestStore
from falaj_platform.services.ingest.versions import Versions


def _until_cut(requests: Iterator[rr.IngestBatchesRequest]) -> Iterator[rr.IngestBatchesRequest]:
    """The stream's messages; a client that goes away mid-stream is a cut stream, not a server fault."""
    try:
        yield from requests
    except grpc.RpcError:
        raise Aborted("the stream was cut before the client closed it; nothing was committed", reason="STREAM_CUT") from None


def _caller() -> str:
    return current_caller() or "spiffe://falaj.local/service/gateway"


class IngestApi(service_pb2_grpc.IngestServiceServicer):
    def __init__(
        self, store: IngestStore, settings: Settings, *, audit: AuditSink, config: IngestConfig | None = None, data_root: Path | None = None
    ):
        self.store = store
        self.settings = settings
        self.config = config or IngestConfig()
        self.audit = audit
        self.storage = VersionStorage(data_root or settings.data_dir, self.config.row_group_rows)
        self.guard = ResidencyGuard(settings.region, self.config.allowed_foreign_regions, audit)
        self.committer = Committer(store, self.storage, self.guard, import_workers=self.config.import_workers)
        self.catalog = Catalog(store, self.storage, self.committer, self.guard)
        self.sources = SourceManager(store, self.committer, self.guard, self.config)
        self.quarantine = Quarantine(store, self.committer, self.guard, audit)
        self.consents = Consents(store)
        self.eraser = Eraser(store, self.storage, self.committer, audit)
        self.versions = Versions(store, self.storage, self.guard)

    def start(self) -> None:
        """At boot: clean what an unclean stop left, then start sources that run on their own."""
        self.committer.recover()
        self.sources.start()

    def close(self) -> None:
        self.sources.close()
        self.committer.close()

    # -- datasets --------------------------------------------------------------------------------
    def CreateDataset(self, request: rr.CreateDatasetRequest, context: grpc.ServicerContext) -> rr.CreateDatasetResponse:
        return self.catalog.create_dataset(request, _caller())

    def GetDataset(self, request: rr.GetDatasetRequest, context: grpc.ServicerContext) -> rr.GetDatasetResponse:
        return rr.GetDatasetResponse(dataset=self.catalog.get_dataset(request.name))

    def ListDatasets(self, request: rr.ListDatasetsRequest, context: grpc.ServicerContext) -> rr.ListDatasetsResponse:
        return self.catalog.list_datasets(request)

    def UpdateDataset(self, request: rr.UpdateDatasetRequest, context: grpc.ServicerContext) -> rr.UpdateDatasetResponse:
        return self.catalog.update_dataset(request, _caller())

    def DeleteDataset(self, request: rr.DeleteDatasetRequest, context: grpc.ServicerContext) -> rr.DeleteDatasetResponse:
        def stop_sources(dataset_id: str) -> None:
            for source in self.store.list_sources(dataset_id, 0):
                if source.WhichOneof("spec") == "nats":
                    self.sources.worker.stop_consumer(names.parse_child(source.name, "sources"))

        return self.catalog.delete_dataset(request, _caller(), stop_sources)

    # -- schema versions ---------------------------------------------------------------------------
    def EvolveSchema(self, request: rr.EvolveSchemaRequest, context: grpc.ServicerContext) -> rr.EvolveSchemaResponse:
        return self.catalog.evolve_schema(request, _caller())

    def GetSchemaVersion(self, request: rr.GetSchemaVersionRequest, context: grpc.ServicerContext) -> rr.GetSchemaVersionResponse:
        return rr.GetSchemaVersionResponse(schema_version=self.catalog.get_schema_version(request.name))

    def ListSchemaVersions(self, request: rr.ListSchemaVersionsRequest, context: grpc.ServicerContext) -> rr.ListSchemaVersionsResponse:
        return self.catalog.list_schema_versions(request)

    # -- ingestion -------------------------------------------------------------------------------------
    def IngestBatches(self, request_iterator: Iterator[rr.IngestBatchesRequest], context: grpc.ServicerContext) -> rr.IngestBatchesResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message of an ingest stream must be the header", reason="HEADER_REQUIRED")
        header = first.header
        dataset_id = names.parse_dataset(header.dataset, "header.dataset")
        max_bytes = self.config.max_stream_bytes

        def batches() -> Iterator[common.ArrowBatch]:
            for message in _until_cut(request_iterator):
                if message.WhichOneof("payload") != "batch":
                    raise InvalidArgument("only the first message of an ingest stream may be a header", reason="HEADER_REPEATED")
                yield message.batch
            if not context.is_active():
                raise Aborted("the stream was cut before the client closed it; nothing was committed", reason="STREAM_CUT")

        def read() -> IngestInput:
            return readers.read_stream(header, batches(), max_bytes)

        caller = _caller()
        return self.committer.run(
            dataset_id,
            read,
            Origin(m.SOURCE_KIND_GRPC_STREAM, header.source_description or f"grpc stream from {caller}"),
            Options(header.write_mode or m.WRITE_MODE_APPEND, header.validate_only, header.expected_schema_version),
            lambda ingestion: rr.IngestBatchesResponse(ingestion=ingestion),
            rr.IngestBatchesResponse,
            caller,
            idempotency=Idempotency(SERVICE + "IngestBatches", header.request_id) if header.request_id else None,
        )

    def ImportFile(self, request: rr.ImportFileRequest, context: grpc.ServicerContext) -> rr.ImportFileResponse:
        return self.sources.import_file(request, _caller())

    def ImportSql(self, request: rr.ImportSqlRequest, context: grpc.ServicerContext) -> rr.ImportSqlResponse:
        return self.sources.import_sql(request, _caller())

    # -- stored sources --------------------------------------------------------------------------------
    def CreateSource(self, request: rr.CreateSourceRequest, context: grpc.ServicerContext) -> rr.CreateSourceResponse:
        return self.sources.create(request, _caller())

    def GetSource(self, request: rr.GetSourceRequest, context: grpc.ServicerContext) -> rr.GetSourceResponse:
        return rr.GetSourceResponse(source=self.sources.get(request.name))

    def ListSources(self, request: rr.ListSourcesRequest, context: grpc.ServicerContext) -> rr.ListSourcesResponse:
        found = self.sources.list_sources(request.parent, request.state)
        page, token = paging.paginate(
            found, paging.page_size(request.page_size, 50), request.page_token, {"p": request.parent, "s": request.state}
        )
        return rr.ListSourcesResponse(sources=page, next_page_token=token)

    def UpdateSource(self, request: rr.UpdateSourceRequest, context: grpc.ServicerContext) -> rr.UpdateSourceResponse:
        return self.sources.update(request, _caller())

    def DeleteSource(self, request: rr.DeleteSourceRequest, context: grpc.ServicerContext) -> rr.DeleteSourceResponse:
        return self.sources.delete(request, _caller())

    def RunSource(self, request: rr.RunSourceRequest, context: grpc.ServicerContext) -> rr.RunSourceResponse:
        return self.sources.run(request, _caller())

    def PauseSource(self, request: rr.PauseSourceRequest, context: grpc.ServicerContext) -> rr.PauseSourceResponse:
        return self.sources.pause(request, _caller())

    def ResumeSource(self, request: rr.ResumeSourceRequest, context: grpc.ServicerContext) -> rr.ResumeSourceResponse:
        return self.sources.resume(request, _caller())

    # -- ingestions ------------------------------------------------------------------------------------
    def GetIngestion(self, request: rr.GetIngestionRequest, context: grpc.ServicerContext) -> rr.GetIngestionResponse:
        dataset_id, ingestion_id = names.parse_child(request.name, "ingestions")
        return rr.GetIngestionResponse(ingestion=self.store.get_ingestion(dataset_id, ingestion_id))

    def ListIngestions(self, request: rr.ListIngestionsRequest, context: grpc.ServicerContext) -> rr.ListIngestionsResponse:
        dataset_id = names.parse_dataset(request.parent, "parent")
        found = self.store.list_ingestions(dataset_id, request.state, request.source_kind, request.source)
        filters = {"p": dataset_id, "s": request.state, "k": request.source_kind, "src": request.source}
        page, token = paging.paginate(found, paging.page_size(request.page_size, 50), request.page_token, filters)
        return rr.ListIngestionsResponse(ingestions=page, next_page_token=token)

    # -- versions ----------------------------------------------------------------------------------------
    def GetDatasetVersion(self, request: rr.GetDatasetVersionRequest, context: grpc.ServicerContext) -> rr.GetDatasetVersionResponse:
        return rr.GetDatasetVersionResponse(dataset_version=self.versions.get(request.name))

    def ListDatasetVersions(self, request: rr.ListDatasetVersionsRequest, context: grpc.ServicerContext) -> rr.ListDatasetVersionsResponse:
        return self.versions.list_versions(request)

    def ReadDatasetVersion(
        self, request: rr.ReadDatasetVersionRequest, context: grpc.ServicerContext
    ) -> Iterator[rr.ReadDatasetVersionResponse]:
        yield from self.versions.read(request, _caller())

    def GetDatasetProfile(self, request: rr.GetDatasetProfileRequest, context: grpc.ServicerContext) -> rr.GetDatasetProfileResponse:
        return rr.GetDatasetProfileResponse(profile=self.versions.profile(request, _caller()))

    # -- quarantine ---------------------------------------------------------------------------------------
    def ListQuarantinedRows(self, request: rr.ListQuarantinedRowsRequest, context: grpc.ServicerContext) -> rr.ListQuarantinedRowsResponse:
        return self.quarantine.list_rows(request, _caller())

    def ResubmitQuarantinedRows(
        self, request: rr.ResubmitQuarantinedRowsRequest, context: grpc.ServicerContext
    ) -> rr.ResubmitQuarantinedRowsResponse:
        return self.quarantine.resubmit(request, _caller())

    def DiscardQuarantinedRows(
        self, request: rr.DiscardQuarantinedRowsRequest, context: grpc.ServicerContext
    ) -> rr.DiscardQuarantinedRowsResponse:
        return self.quarantine.discard(request, _caller())

    # -- consent --------------------------------------------------------------------------------------------
    def RecordConsent(self, request: rr.RecordConsentRequest, context: grpc.ServicerContext) -> rr.RecordConsentResponse:
        return self.consents.record(request, _caller())

    def WithdrawConsent(self, request: rr.WithdrawConsentRequest, context: grpc.ServicerContext) -> rr.WithdrawConsentResponse:
        return self.consents.withdraw(request, _caller())

    def ListConsents(self, request: rr.ListConsentsRequest, context: grpc.ServicerContext) -> rr.ListConsentsResponse:
        return self.consents.list_consents(request)

    def CheckConsent(self, request: rr.CheckConsentRequest, context: grpc.ServicerContext) -> rr.CheckConsentResponse:
        return self.consents.check(request)

    # -- erasure ---------------------------------------------------------------------------------------------
    def EraseSubject(self, request: rr.EraseSubjectRequest, context: grpc.ServicerContext) -> rr.EraseSubjectResponse:
        receipt = self.eraser.erase(
            request.subject_id, request.legal_basis, list(request.datasets), request.validate_only, request.request_id, _caller()
        )
        return rr.EraseSubjectResponse(receipt=receipt)

    def GetErasureReceipt(self, request: rr.GetErasureReceiptRequest, context: grpc.ServicerContext) -> rr.GetErasureReceiptResponse:
        return rr.GetErasureReceiptResponse(receipt=self.store.get_receipt(names.parse_top(request.name, "erasureReceipts")))

    def ListErasureReceipts(self, request: rr.ListErasureReceiptsRequest, context: grpc.ServicerContext) -> rr.ListErasureReceiptsResponse:
        after = optional_datetime(request, "completed_after")
        found = self.store.list_receipts(after, request.state)
        filters = {"a": request.completed_after.ToJsonString() if after else "", "s": request.state}
        page, token = paging.paginate(found, paging.page_size(request.page_size, 50), request.page_token, filters)
        return rr.ListErasureReceiptsResponse(receipts=page, next_page_token=token)
