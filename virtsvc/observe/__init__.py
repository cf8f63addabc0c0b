"""Observability: what the virtual services were asked, how they answered, and how long it took.

Everything here reads what the engine already records, never a second path through a call: the journal
(``Journal.subscribe``: each call's entry once it has ended; the admin API's ``WatchJournal`` from another
process) and the pipeline's call events (``virtsvc.engine.observers``: a call as it starts and as it ends,
for in-flight gauges and spans that start with the call). From those come the per-call logs, the
Prometheus metrics, the OpenTelemetry spans, the run reports with their gates, and the dashboard.

Imports the contracts, scenarios, engine and admin stages only; the server, the CLI and the testing side
import it.
"""
