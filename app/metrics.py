"""Prometheus metrics computed from the job table at scrape time.

Workers run in other processes (Celery pool children, the embedded worker), so
in-process counters in the API would miss their work. The database contains
every status and every stage duration, so each scrape reads them from there.
In Celery mode the broker's queue depth is read from Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, select

from app.context import DEFAULT_QUEUE, GPU_QUEUE, ServiceContext
from app.db.models import Job, JobEvent
from app.jobs.lifecycle import QUEUED, STAGE_WEIGHTS, STATUSES

logger = logging.getLogger(__name__)

STAGE_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


class JobTableCollector(Collector):
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Any]:
        try:
            with self.ctx.session() as session:
                counts = dict(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
                stage_rows = self._stage_rows(session)
        except Exception:
            logger.exception("metrics: reading the job table failed")
            return

        jobs = GaugeMetricFamily("subclone_jobs", "Jobs by status.", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs

        durations = HistogramMetricFamily(
            "subclone_stage_duration_seconds", "Duration of finished job stages.", labels=["stage"]
        )
        for stage, row in stage_rows.items():
            buckets = [
                (str(bound), row[f"le_{index}"] or 0) for index, bound in enumerate(STAGE_BUCKETS)
            ]
            buckets.append(("+Inf", row["count"]))
            durations.add_metric([stage], buckets, sum_value=row["total"] or 0.0)
        yield durations

        depth = GaugeMetricFamily(
            "subclone_queue_depth",
            "Jobs waiting: broker messages per queue in Celery mode, queued rows in embedded mode.",
            labels=["queue"],
        )
        for queue, value in self._queue_depths(counts.get(QUEUED, 0)).items():
            depth.add_metric([queue], value)
        yield depth

    def _stage_rows(self, session: Any) -> dict[str, dict[str, Any]]:
        columns = [
            func.sum(case((JobEvent.duration_s <= bound, 1), else_=0)).label(f"le_{index}")
            for index, bound in enumerate(STAGE_BUCKETS)
        ]
        query = (
            select(
                JobEvent.stage,
                func.count().label("count"),
                func.sum(JobEvent.duration_s).label("total"),
                *columns,
            )
            .where(JobEvent.type == "stage_finished", JobEvent.stage.in_(list(STAGE_WEIGHTS)))
            .group_by(JobEvent.stage)
        )
        return {row.stage: row._asdict() for row in session.execute(query).all()}

    def _queue_depths(self, queued_rows: int) -> dict[str, int]:
        if self.ctx.dispatcher.name == "table":
            return {"table": queued_rows}
        try:
            import redis

            settings = self.ctx.settings
            client = redis.Redis.from_url(
                settings.broker_url, socket_timeout=2, socket_connect_timeout=2
            )
            try:
                return {
                    queue: int(client.llen(settings.broker_key_prefix + queue))
                    for queue in (GPU_QUEUE, DEFAULT_QUEUE)
                }
            finally:
                client.close()
        except Exception as exc:
            logger.warning("metrics: reading broker queue lengths failed: %s", exc)
            return {}


def build_registry(ctx: ServiceContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobTableCollector(ctx))
    return registry
