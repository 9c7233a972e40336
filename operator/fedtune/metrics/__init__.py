"""Prometheus metrics shared by the operator, the aggregator and the clients.

Labels stay low-cardinality: run name, namespace, client; never a round number.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RUN = ("namespace", "name")
CLIENT = (*RUN, "client")

ROUNDS_COMPLETED = Gauge("fedtune_rounds_completed", "Rounds whose next global is committed.", RUN)
ROUNDS_TOTAL = Gauge("fedtune_rounds", "Rounds the run is configured for.", RUN)
ROUND_SECONDS = Histogram(
    "fedtune_round_duration_seconds",
    "Seconds from a global's commit to the next one.",
    RUN,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
UPDATES_ACCEPTED = Counter("fedtune_updates_accepted_total", "Client updates aggregated.", CLIENT)
UPDATES_REJECTED = Counter("fedtune_updates_rejected_total", "Client updates rejected by validation.", CLIENT)
UPDATE_BYTES = Counter("fedtune_update_bytes_total", "Bytes of client updates received.", CLIENT)
EVAL_LOSS = Gauge("fedtune_eval_loss", "Example-weighted eval loss of the latest global.", RUN)
TRAIN_LOSS = Gauge("fedtune_train_loss", "Example-weighted training loss of the latest round.", RUN)
EPSILON = Gauge("fedtune_dp_epsilon", "Differential-privacy epsilon spent so far: the maximum over clients.", RUN)
CLIENT_EPSILON = Gauge("fedtune_dp_client_epsilon", "Differential-privacy epsilon a client has spent.", CLIENT)
CLIENT_TRAIN_LOSS = Gauge("fedtune_client_train_loss", "A client's training loss in its latest round.", CLIENT)
RUN_CONDITION = Gauge("fedtune_run_condition", "1 for the state a run is in, 0 for the others.", (*RUN, "state"))
RUN_INFO = Gauge("fedtune_run_info", "Static facts about a run (always 1).", (*RUN, "strategy", "clients"))
CLIENT_STEPS = Counter("fedtune_client_steps_total", "Local optimizer steps a client has taken.", CLIENT)
CLIENT_STEP_SECONDS = Histogram(
    "fedtune_client_step_duration_seconds",
    "Wall time of a client's optimizer steps.",
    CLIENT,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CLIENT_TOKENS_PER_SECOND = Gauge(
    "fedtune_client_tokens_per_second",
    "Input tokens per second of a client's training in its latest round, all its GPUs together.",
    CLIENT,
)
CLIENT_SENT_BYTES = Counter("fedtune_client_sent_bytes_total", "Bytes of updates a client has uploaded.", CLIENT)
CLIENT_GPU_MEMORY = Gauge(
    "fedtune_client_gpu_memory_bytes", "Peak GPU memory a client's training allocated (where it has a GPU).", CLIENT
)


def forget_run(namespace: str, name: str) -> None:
    """Remove every series of a run from every metric, so nothing of a deleted run is exported."""
    for metric in (m for m in globals().values() if isinstance(m, Counter | Gauge | Histogram)):
        series = set()
        for family in metric.collect():
            for sample in family.samples:
                labels = sample.labels
                if labels.get("namespace") == namespace and labels.get("name") == name:
                    series.add(tuple(v for k, v in labels.items() if k not in ("le", "quantile")))
        for values in series:
            metric.remove(*values)


def serve(port: int | None, address: str = "") -> None:
    """Expose /metrics on port (0 or None: not served) at address (empty: every interface).

    Pods bind their own pod IP, so pods that share one network (as on the test cluster) never clash.
    A taken port costs the metrics, not the run.
    """
    if not port:
        return
    try:
        start_http_server(port, addr=address or "0.0.0.0")
    except OSError as e:
        logging.getLogger("fedtune.metrics").warning("metrics not served on %s:%d: %s", address, port, e.strerror)
