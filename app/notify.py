"""Bridge from jobs to :mod:`app.webhooks`: URL checks at submission and delivery of job events."""

from __future__ import annotations

import base64
import hashlib
import logging

from sqlalchemy import select

from app.core.config import Settings
from app.core.errors import ValidationFailed
from app.db.models import Job
from app.db.session import session_scope
from app.webhooks import WebhookURLRejected, build_event, deliver, validate_webhook_url
from subclone.errors import FieldError

logger = logging.getLogger(__name__)


def check_webhook_url(settings: Settings, url: str) -> None:
    """Raise ValidationFailed naming ``webhook_url`` unless the URL may receive this server's webhooks.

    The same check runs again before every delivery, because DNS answers change.
    """
    if not settings.webhook_secret:
        raise ValidationFailed(
            "webhooks are disabled on this server because no signing secret is configured",
            errors=[
                FieldError(
                    "webhook_url",
                    url,
                    "webhooks are disabled; set SUBCLONE_WEBHOOK_SECRET on the server",
                )
            ],
        )
    try:
        validate_webhook_url(url, settings.webhook_allowlist)
    except WebhookURLRejected as exc:
        raise ValidationFailed(
            str(exc), errors=[FieldError("webhook_url", url, exc.reason)]
        ) from None


def webhook_event_id(job_id: str, event_type: str) -> str:
    """Return the same event id for every delivery of one job event, so receivers can dedupe redeliveries."""
    digest = hashlib.sha256(f"{job_id}:{event_type}".encode()).digest()
    return "evt_" + base64.b32encode(digest).decode("ascii").lower()[:26]


def deliver_job_event(settings: Settings, job_id: str, event_type: str) -> bool:
    """Send one job event to the job's webhook URL with retries; return whether it was delivered."""
    if not settings.webhook_secret:
        logger.warning(
            "job %s: %s not delivered because no webhook secret is configured", job_id, event_type
        )
        return False
    with session_scope(settings.resolved_database_url) as session:
        row = session.execute(select(Job.webhook_url, Job.status).where(Job.id == job_id)).first()
    if row is None or not row.webhook_url:
        return False
    event = build_event(
        job_id, row.status, event_type=event_type, event_id=webhook_event_id(job_id, event_type)
    )
    result = deliver(
        row.webhook_url, settings.webhook_secret, event, allowlist=settings.webhook_allowlist
    )
    if not result.delivered:
        logger.error("job %s: webhook %s not delivered: %s", job_id, event_type, result.as_dict())
    return result.delivered
