"""Monitoring service: data and prediction drift, model quality, serving figures, alert
rules that notify webhooks and start retraining, HTML drift reports, erasure.

How it is put together (outer to inner):

- `server.py` wires the store, the shared `Context` and the servicer onto the runtime and
  starts the `Worker`; `api.py` is the thin servicer: one call into a use-case module per
  RPC. Errors are the runtime's typed errors, mapped to status codes by its interceptor.
- Use cases: `catalog.py` (profiles, monitors, rules, channels, alerts), `ingestion.py`
  (prediction log and label streams, erasure), `evaluation.py` (closed windows become
  drift reports and quality/serving figures; rules are checked), `lifecycle.py` (an
  alert's transitions and the work they queue), `delivery.py` (webhooks with retries,
  retraining starts, time windows closing, retention), `worker.py` (the loop that runs
  `delivery` outside requests).
- Domain, with neither grpc nor SQLAlchemy: `drift.py` (PSI, KS, normalized Wasserstein,
  Jensen-Shannon, chi-square, z; the test chosen by type and size as Evidently does),
  `quality.py` (accuracy/precision/recall/F1/AUC/log loss, RMSE/MAE/R2, latency
  percentiles, error rate, throughput), `windows.py`, `alerting.py` (the pending -> firing
  -> resolved state machine, backoff, signatures), `profiles.py` (column types, summaries,
  the reference sample file), `prediction_logs.py` (which rows are kept and why the others
  are not), `report_html.py` (the page, with inline SVG plots).
- Adapters: `store.py` (SQLAlchemy tables and queries), `upstream.py` (training and
  ingest through the gateway), `webhooks.py` (HTTP POST), `metrics.py` (Prometheus gauges
  in the runtime's registry), `messages.py` (proto <-> domain).

Flow: serving streams prediction logs -> rows are validated and stored with an arrival
sequence -> when a count window fills or a time window's end (plus a small lateness
allowance) passes, the window is evaluated once: drift against the reference sample,
serving figures, quality over the labels joined so far (recomputed as late labels
arrive) -> the monitor's rules are checked -> a firing or resolving alert queues webhook
deliveries and, when the rule says so, a retraining start, which the worker carries out.
"""
