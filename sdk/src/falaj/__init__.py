"""Falaj SDK: generated gRPC stubs for every Falaj contract and a small typed client.

    from falaj.sdk import connect
    with connect("127.0.0.1:8443", cert="cert.pem", key="key.pem", ca="ca.pem") as falaj:
        falaj.ingest.ListDatasets(ingest_pb2.ListDatasetsRequest())
"""
