"""Bodies of the webhooks endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from registry_api.kit.schemas import PatchBody, RequestBody
from registry_api.kit.validate import REPO_ID_PATTERN
from registry_shared.webhooks import SUBSCRIBABLE_EVENTS, SubscriptionName

#: The names accepted in `event_types` (the list, with who receives what, is shared with the notifier).
EventTypeName = SubscriptionName

_URL_EXAMPLE = "https://hooks.example.com/registry"


def _unique(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("at least one event type is required")
    return sorted(set(values))


class WebhookIn(RequestBody):
    """A new subscription: where to POST, which events, optionally only one model's."""

    url: str = Field(min_length=8, max_length=2000, examples=[_URL_EXAMPLE])
    event_types: list[EventTypeName] = Field(
        min_length=1, max_length=len(SUBSCRIBABLE_EVENTS), examples=[["upload.verified", "upload.rejected"]]
    )
    repo_id: str | None = Field(
        None, pattern=REPO_ID_PATTERN, max_length=193, description="Only events of this model.", examples=[None]
    )
    description: str = Field("", max_length=500, examples=["CI pipeline"])
    enabled: bool = True

    _types = field_validator("event_types")(_unique)


class WebhookUpdate(PatchBody):
    """Change a subscription. Enabling it again resets its failure count. `repo_id: null` subscribes to
    every model; the other fields cannot be null."""

    url: str = Field(None, min_length=8, max_length=2000, examples=[_URL_EXAMPLE])
    event_types: list[EventTypeName] = Field(None, min_length=1, max_length=len(SUBSCRIBABLE_EVENTS))
    repo_id: str | None = Field(None, pattern=REPO_ID_PATTERN, max_length=193)
    description: str = Field(None, max_length=500)
    enabled: bool = Field(None, examples=[True])

    _types = field_validator("event_types")(_unique)


class WebhookOut(BaseModel):
    """A subscription (its secret is never shown again after creation)."""

    id: int = Field(examples=[7])
    url: str = Field(examples=[_URL_EXAMPLE])
    description: str = Field(examples=["CI pipeline"])
    event_types: list[str] = Field(examples=[["upload.rejected", "upload.verified"]])
    repo_id: str | None = Field(examples=[None])
    enabled: bool = Field(examples=[True])
    consecutive_failures: int = Field(examples=[0])
    disabled_reason: str | None = Field(None, examples=[None])
    disabled_ts: int | None = Field(None, examples=[None])
    created_ts: int = Field(examples=[1711972800])
    updated_ts: int = Field(examples=[1711972800])


class WebhookCreated(WebhookOut):
    """A new subscription with its signing secret, shown this once."""

    secret: str = Field(
        description="Standard Webhooks signing secret; verify `webhook-signature` with it.",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class WebhookList(BaseModel):
    items: list[WebhookOut]


class EventTypeOut(BaseModel):
    name: str = Field(examples=["upload.verified"])
    cloudevents_type: str = Field(examples=["registry.upload.verified.v1"])
    description: str


class EventTypeList(BaseModel):
    items: list[EventTypeOut]


class AttemptOut(BaseModel):
    """One try of a delivery."""

    attempt: int = Field(examples=[1])
    status_code: int | None = Field(examples=[200])
    latency_ms: int | None = Field(examples=[12])
    error: str | None = Field(examples=[None])
    attempted_ts: float = Field(examples=[1711972800.5])


class DeliveryOut(BaseModel):
    """A delivery of one event to one subscription, with the outcome of its last attempt."""

    id: int = Field(examples=[1001])
    webhook_id: int = Field(examples=[7])
    event_id: str = Field(examples=["0b9b0c1e-7f3a-4a59-9a8e-2f1f3c1d2e4f"])
    event_type: str = Field(examples=["registry.upload.verified.v1"])
    message_id: str = Field(description="The `webhook-id` header: stable across retries.", examples=["msg_2b7c"])
    status: Literal["pending", "sending", "delivered", "failed"] = Field(examples=["delivered"])
    attempts: int = Field(examples=[1])
    next_attempt_ts: float | None = Field(None, description="When the next attempt is due (pending only).")
    last_status_code: int | None = Field(None, examples=[200])
    last_latency_ms: int | None = Field(None, examples=[12])
    last_error: str | None = Field(None, examples=[None])
    delivered_ts: float | None = Field(None, examples=[1711972800.5])
    created_ts: float = Field(examples=[1711972800.4])


class DeliveryDetail(DeliveryOut):
    """A delivery with every attempt."""

    attempt_log: list[AttemptOut]


class DeliveryList(BaseModel):
    items: list[DeliveryOut]
    limit: int
    offset: int
