"""The worker's Prometheus metrics: one bundle built on an injectable registry, so each test
(and each worker in one process) gets a fresh set. Base units, ``_total`` on counters, and
no per-session labels (sessions are unbounded; label cardinality must not be). The registry
also carries the standard process collector (``process_resident_memory_bytes``,
``process_cpu_seconds_total``, ``process_open_fds``, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class Metrics:
    registry: CollectorRegistry
    events: Counter
    label_records: Counter
    latency: Histogram
    inference: Histogram
    batch_size: Histogram
    coverage: Gauge
    open_sessions: Gauge
    model_info: Gauge
    model_swaps: Counter
    model_rejected: Gauge
    dlq: Counter
    consumer_lag: Gauge
    partitions: Gauge
    finals: Counter
    infra_errors: Counter
    timer_errors: Counter
    timer_last_run: Gauge
    dependency_up: Gauge
    duplicate_run: Gauge
    duplicate_runs: Counter
    repeats_suppressed: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> "Metrics":
        r = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=r)  # process_*: memory, CPU, open files of this worker
        return cls(
            registry=r,
            events=Counter("tagger_events", "Input messages by outcome (accepted, duplicate, invalid, session_end)",
                           ["result"], registry=r),
            label_records=Counter("tagger_label_records", "Label records emitted, by kind (first, revision, final)",
                                  ["kind"], registry=r),
            latency=Histogram("tagger_end_to_end_latency_seconds",
                              "From an event's publication to its first label record being produced",
                              buckets=LATENCY_BUCKETS, registry=r),
            inference=Histogram("tagger_inference_seconds", "Model time per event (batch time / batch events)",
                                buckets=INFERENCE_BUCKETS, registry=r),
            batch_size=Histogram("tagger_batch_events", "Events per processed batch",
                                 buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000), registry=r),
            coverage=Gauge("tagger_coverage_ratio", "Share of recent final labels that were not abstentions",
                           registry=r),
            open_sessions=Gauge("tagger_open_sessions", "Sessions held open by this worker", registry=r),
            model_info=Gauge("tagger_model_info", "The model version being served (value 1)", ["version"],
                             registry=r),
            model_swaps=Counter("tagger_model_swaps", "Hot-swap attempts after start-up by result (ok, "
                                "rejected); the initial load is not a swap", ["result"], registry=r),
            model_rejected=Gauge("tagger_model_current_rejected", "1 while the model `current` names was "
                                 "refused by this worker (the previous one keeps serving); 0 once it "
                                 "serves the current one", registry=r),
            dlq=Counter("tagger_dlq", "Messages sent to the dead-letter topic, by reason", ["reason"], registry=r),
            consumer_lag=Gauge("tagger_consumer_lag_messages", "Messages behind the end of each input partition",
                               ["partition"], registry=r),
            partitions=Gauge("tagger_assigned_partitions", "Input partitions assigned to this worker", registry=r),
            finals=Counter("tagger_final_labels", "Final labels by outcome (labelled, abstained)", ["outcome"],
                           registry=r),
            infra_errors=Counter("tagger_infrastructure_errors", "Failed Redis or Kafka operations, retried or "
                                 "held in memory (never dead-lettered), by component (redis, kafka)",
                                 ["component"], registry=r),
            timer_errors=Counter("tagger_timer_errors", "Exceptions caught in a periodic task (it keeps running)",
                                 ["timer"], registry=r),
            timer_last_run=Gauge("tagger_timer_last_run_timestamp_seconds", "When each periodic task last "
                                 "completed (sweep, model_poll, broker_probe)", ["timer"], registry=r),
            dependency_up=Gauge("tagger_dependency_up", "1 while a dependency answers (kafka: a metadata request "
                                "within the last few seconds; redis: PING and the last write-through "
                                "succeeded); what /readyz reports", ["dependency"], registry=r),
            duplicate_run=Gauge("tagger_duplicate_run_events", "Input events in a row dropped as already seen "
                                "(0 after any accepted event)", registry=r),
            duplicate_runs=Counter("tagger_duplicate_runs", "Runs of dropped duplicates long enough to be "
                                   "suspicious (a session store that outlived its broker?)", registry=r),
            repeats_suppressed=Counter("tagger_label_repeats_suppressed",
                                       "Label records not sent again because a stopped worker's unacknowledged "
                                       "copy was found on the label topic", registry=r),
        )

    def __post_init__(self) -> None:
        # Every known label value exists from the start at 0, so Prometheus sees the first
        # increment of each (rate() and increase() need a sample before it).
        for result in ("accepted", "duplicate", "invalid", "session_end"):
            self.events.labels(result=result)
        for kind in ("first", "revision", "final"):
            self.label_records.labels(kind=kind)
        for outcome in ("labelled", "abstained"):
            self.finals.labels(outcome=outcome)
        for result in ("ok", "rejected"):
            self.model_swaps.labels(result=result)
        for component in ("redis", "kafka"):
            self.infra_errors.labels(component=component)
            self.dependency_up.labels(dependency=component)
        for timer in ("sweep", "model_poll", "broker_probe"):
            self.timer_errors.labels(timer=timer)

    def model_event(self, result: str, version: str) -> None:
        """A ``ModelHolder`` event: ``loaded`` (the initial load, not a swap), ``ok`` (a hot
        swap) or ``rejected`` (a promoted artifact refused; the old model serves on)."""
        if result in ("ok", "rejected"):
            self.model_swaps.labels(result=result).inc()
        self.model_rejected.set(1 if result == "rejected" else 0)
        if result in ("loaded", "ok") and version:
            self.set_model(version)

    def set_model(self, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version).set(1)
