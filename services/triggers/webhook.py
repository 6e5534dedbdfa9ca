"""Alertmanager's webhook body (version 4), validated, and the identity of one notification.

Format: https://prometheus.io/docs/alerting/latest/configuration/#webhook_config — receiver, status,
alerts[] (status, labels, annotations, startsAt, endsAt, generatorURL, fingerprint), groupLabels,
commonLabels, commonAnnotations, externalURL, version "4", groupKey, truncatedAlerts.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Labels = dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=4096)]]


class _Body(BaseModel):
    # Alertmanager may add fields in a later minor version: ignore what we do not read, validate what we do.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Alert(_Body):
    status: Literal["firing", "resolved"]
    labels: Labels
    annotations: Labels = Field(default_factory=dict)
    starts_at: datetime = Field(alias="startsAt")
    ends_at: datetime | None = Field(None, alias="endsAt")
    generator_url: str = Field("", alias="generatorURL", max_length=4096)
    fingerprint: str = Field("", max_length=128)


class Notification(_Body):
    version: Literal["4"]
    receiver: str = Field(min_length=1, max_length=256)
    status: Literal["firing", "resolved"]
    alerts: list[Alert] = Field(min_length=1, max_length=10_000)
    group_key: str = Field(alias="groupKey", min_length=1, max_length=4096)
    group_labels: Labels = Field(default_factory=dict, alias="groupLabels")
    common_labels: Labels = Field(default_factory=dict, alias="commonLabels")
    common_annotations: Labels = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field("", alias="externalURL", max_length=4096)
    truncated_alerts: int = Field(0, alias="truncatedAlerts", ge=0)

    def retrain_alerts(self, action: str) -> list[Alert]:
        """The firing alerts that ask for a retrain (label action=<action>)."""
        return [a for a in self.alerts if a.status == "firing" and a.labels.get("action") == action]


CAUSE_MAX_CHARS = 2000
"""A run's recorded cause is a summary, not the notification: longer descriptions are cut (the trigger's log keeps the rest)."""


def describe(alerts: list[Alert]) -> str:
    """The alerts that start a run, for its record and the registry run's lineage: name, other labels, start time —
    e.g. `VitrineInputDrift{feature="unknown_item_rate", variant="treatment"} since 2026-12-01T19:40:02+00:00`."""
    parts = []
    for a in sorted(alerts, key=lambda a: (a.labels.get("alertname", ""), sorted(a.labels.items()))):
        labels = ", ".join(f'{k}="{v}"' for k, v in sorted(a.labels.items()) if k not in ("alertname", "action", "severity"))
        parts.append(f"{a.labels.get('alertname', 'alert')}{{{labels}}} since {a.starts_at.isoformat()}")
    text = "; ".join(parts)
    return text if len(text) <= CAUSE_MAX_CHARS else text[: CAUSE_MAX_CHARS - 1] + "…"


def notification_key(notification: Notification, alerts: list[Alert]) -> str:
    """Identity of a notification for idempotency: the group plus each firing alert's fingerprint (or, when
    absent, its sorted labels) and start time. Alertmanager re-sends the same group every repeat_interval and
    retries a failed delivery: all of those map to one key, while a new firing of the same alert (a new
    startsAt) is a new key."""
    parts = sorted(f"{a.fingerprint or sorted(a.labels.items())}@{a.starts_at.isoformat()}" for a in alerts)
    return hashlib.sha256("\x1f".join([notification.group_key, *parts]).encode()).hexdigest()
