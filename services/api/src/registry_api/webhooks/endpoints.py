"""HTTP: /v1/webhooks — your webhook subscriptions, their delivery log, redelivery."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status

from registry_api.auth import CurrentUser
from registry_api.kit.schemas import Offset, RowId, errors
from registry_api.webhooks import service
from registry_api.webhooks.schemas import (
    DeliveryDetail,
    DeliveryList,
    DeliveryOut,
    EventTypeList,
    EventTypeOut,
    WebhookCreated,
    WebhookIn,
    WebhookList,
    WebhookOut,
    WebhookUpdate,
)
from registry_shared.webhooks import SUBSCRIBABLE_EVENTS

router = APIRouter(prefix="/v1/webhooks", tags=["Webhooks"])
_ERR = errors(401, 404, 409, 422)

_SIGNING = (
    "Deliveries follow Standard Webhooks: a POST whose body is the CloudEvent (JSON), with the headers "
    "`webhook-id` (stable across retries of one event), `webhook-timestamp` and `webhook-signature` "
    "(`v1,<base64 HMAC-SHA256>` with the secret). Failed deliveries are retried with exponential backoff "
    "for hours, in order per model; after too many consecutive failures the webhook is disabled and its "
    "owner e-mailed. Targets must be public addresses (private, loopback and link-local are refused)."
)


@router.get(
    "/event-types",
    response_model=EventTypeList,
    summary="Event types you can subscribe to",
    description="The names accepted in `event_types`, their CloudEvents type and who receives them.",
    responses=errors(401),
)
async def event_types(_: CurrentUser) -> EventTypeList:
    return EventTypeList(
        items=[
            EventTypeOut(name=e.name, cloudevents_type=e.cloudevents_type, description=e.description)
            for e in SUBSCRIBABLE_EVENTS
        ]
    )


@router.post(
    "",
    response_model=WebhookCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create a webhook",
    description="Subscribes a URL to event types (optionally of one model). The answer carries the signing "
    "secret, shown this once (stored sealed with WEBHOOK_SECRET_KEY). You only ever receive events about "
    "what you may see. " + _SIGNING,
    responses=errors(401, 404, 409, 422, 503),
)
async def create_webhook(body: WebhookIn, request: Request, principal: CurrentUser) -> WebhookCreated:
    async with request.app.state.pool.connection() as conn:
        return WebhookCreated(**await service.create_webhook(conn, principal, body, request.app.state.secret_box))


@router.get("", response_model=WebhookList, summary="Your webhooks", responses=errors(401))
async def list_webhooks(request: Request, principal: CurrentUser) -> WebhookList:
    async with request.app.state.pool.connection() as conn:
        rows = await service.list_webhooks(conn, principal)
    return WebhookList(items=[WebhookOut(**r) for r in rows])


@router.get("/{webhook_id}", response_model=WebhookOut, summary="One of your webhooks", responses=_ERR)
async def get_webhook(webhook_id: RowId, request: Request, principal: CurrentUser) -> WebhookOut:
    async with request.app.state.pool.connection() as conn:
        return WebhookOut(**await service.get_webhook(conn, principal, webhook_id))


@router.patch(
    "/{webhook_id}",
    response_model=WebhookOut,
    summary="Change a webhook",
    description="Any of url, event_types, repo_id, description, enabled. `enabled: true` re-enables a webhook "
    "disabled after failures and resets its failure count; its pending deliveries then resume.",
    responses=_ERR,
)
async def update_webhook(
    webhook_id: RowId, body: WebhookUpdate, request: Request, principal: CurrentUser
) -> WebhookOut:
    async with request.app.state.pool.connection() as conn:
        return WebhookOut(**await service.update_webhook(conn, principal, webhook_id, body))


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a webhook",
    description="Stops deliveries at once and deletes the delivery log.",
    responses=_ERR,
)
async def delete_webhook(webhook_id: RowId, request: Request, principal: CurrentUser) -> Response:
    async with request.app.state.pool.connection() as conn:
        await service.delete_webhook(conn, principal, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryList,
    summary="Delivery log",
    description="Deliveries of this webhook, newest first: attempts, last status code, latency and error.",
    responses=_ERR,
)
async def list_deliveries(
    webhook_id: RowId,
    request: Request,
    principal: CurrentUser,
    status_filter: Annotated[Literal["pending", "sending", "delivered", "failed"] | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> DeliveryList:
    async with request.app.state.pool.connection() as conn:
        rows = await service.list_deliveries(conn, principal, webhook_id, status_filter, limit, offset)
    return DeliveryList(items=[DeliveryOut(**r) for r in rows], limit=limit, offset=offset)


@router.get(
    "/{webhook_id}/deliveries/{delivery_id}",
    response_model=DeliveryDetail,
    summary="One delivery with every attempt",
    responses=_ERR,
)
async def get_delivery(
    webhook_id: RowId, delivery_id: RowId, request: Request, principal: CurrentUser
) -> DeliveryDetail:
    async with request.app.state.pool.connection() as conn:
        return DeliveryDetail(**await service.get_delivery(conn, principal, webhook_id, delivery_id))


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver",
    response_model=DeliveryOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a delivery again",
    description="Schedules a delivered or failed delivery for another attempt now, with the same `webhook-id` "
    "(receivers de-duplicate on it). 409 while it is still pending or the webhook is disabled.",
    responses=_ERR,
)
async def redeliver(webhook_id: RowId, delivery_id: RowId, request: Request, principal: CurrentUser) -> DeliveryOut:
    async with request.app.state.pool.connection() as conn:
        return DeliveryOut(**await service.redeliver(conn, principal, webhook_id, delivery_id))
