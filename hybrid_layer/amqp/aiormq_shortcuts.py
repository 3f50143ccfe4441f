"""Where the link reaches into aiormq's channel, for speed: publish without a task per
message, consume without a task per delivery, assemble a delivered body with one join.

aiormq's public API costs, per message, a task and a lock on the way out
(``basic_publish``), a task per delivery on the way in, and copies of a large body
through a ``BytesIO``. The three functions here do what aiormq would, with less:

* ``_publish_frame`` (hot: every publish of the link): take the channel's next delivery
  tag, register the confirmation future, marshal the method, header and body frames
  into one write (``amqpframes.publish_frames``) for ``ch.write_queue``;
* ``_run_inline`` (hot: every delivery): aiormq calls the link's consumer as it reads
  the delivery, not in a task of its own;
* ``_join_content`` (every delivered body): one ``b"".join`` of the body frames.

Each is used only where the channel has exactly the members it relies on (aiormq 6.8
to 7: ``_can_publish_directly``, the ``consumers`` dict, ``_get_frame`` and
``_read_content``); otherwise aiormq's own way stays. No state of their own; the
invariant that matters is ``_publish_frame``'s: tags follow the order frames reach the
write queue (the link is the channel's only publisher), and no tag is taken for a frame
that could not be built. Called by ``connection`` (declare) and ``publisher`` (emit).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from . import amqpframes, wire

log = logging.getLogger("hybrid_layer")

_CHANNEL_PUBLISH_STATE = (
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "number",
    "create_future",
    "_split_body",
)


def _can_publish_directly(ch: Any) -> bool:
    return bool(getattr(ch, "publisher_confirms", False)) and all(
        hasattr(ch, a) for a in _CHANNEL_PUBLISH_STATE
    )


def _publish_frame(
    ch: Any, body: bytes | wire.Parts, exchange: str, rk: str, props: Any, mandatory: bool
) -> tuple[asyncio.Future[Any], Any]:
    """What ``ch.basic_publish`` does before it waits, without its task, lock, timeout
    and drain: take the next delivery tag, register the confirmation future (and the
    message id that a ``basic.return`` is matched by), and marshal the frames into one
    write (``amqpframes.publish_frames`` when the body fits one frame; else
    ``amqpframes.publish_frames_parts``, which copies the body once where pamqp and aiormq's
    ``_split_body`` copy it several times).
    Returns (the confirmation, the frame for ``ch.write_queue``).

    The link is the only publisher on ``ch`` and puts each frame on the queue before it
    takes the next tag, so tags follow the order on the wire, which is all confirms
    need. Publishing does not wait for an RPC on the channel (``queue_bind``) to be
    answered: basic.publish is an asynchronous method, which AMQP allows meanwhile.
    Used only where the channel has the state it relies on (aiormq 6.8 to 7).
    """
    tag = ch.delivery_tag + 1
    mid = props.message_id  # unique per publish: a basic.return is matched by it
    # the frame first: if it cannot be built, no tag is taken (a gap would shift every
    # later confirmation onto the wrong message)
    max_content = getattr(ch, "max_content_size", 0)
    if type(body) is bytes and 0 < len(body) < max_content:  # one body frame
        data = amqpframes.publish_frames(
            ch.number, exchange, rk, mandatory, body, props.delivery_mode, props.expiration, mid
        )
        frame = ChannelFrame(payload=data, should_close=False)
    elif max_content > 0:  # (a large one: its body frames cut from its parts, one copy)
        data = amqpframes.publish_frames_parts(
            ch.number,
            exchange,
            rk,
            mandatory,
            (body.head, body.payload) if isinstance(body, wire.Parts) else (body,),
            props.delivery_mode,
            props.expiration,
            mid,
            max_content,
        )
        frame = ChannelFrame(payload=data, should_close=False)
    else:
        if isinstance(body, wire.Parts):
            body = body.join()
        frame = ChannelFrame.marshall(
            channel_number=ch.number,
            frames=[
                spec.Basic.Publish(exchange=exchange, routing_key=rk, mandatory=mandatory),
                ContentHeader(properties=props, body_size=len(body)),
                *ch._split_body(body),
            ],
        )
    fut = ch.create_future()
    ch.delivery_tag = tag
    ch.confirmations[tag] = fut
    ids = ch.message_id_delivery_tag
    ids[mid] = tag
    fut.add_done_callback(lambda _: ids.pop(mid, None))
    return fut, frame


async def _nothing() -> None:
    return None


def _run_inline(ch: Any, tag: str, callback: Any) -> None:
    """Have aiormq call ``callback`` (a plain function) as it reads a delivery, not in
    a task of its own per message (one event-loop pass less on every delivery). aiormq
    wraps a consumer in a coroutine function and makes a task of what it returns; this
    returns a finished one. Only if that dict is there: else aiormq's own way stays."""
    consumers = getattr(ch, "consumers", None)
    if isinstance(consumers, dict) and tag in consumers:

        def inline(msg: DeliveredMessage) -> Any:
            try:
                callback(msg)
            except Exception:  # aiormq's reader must go on (it logged a task's failure)
                log.exception("hybrid_layer: cannot handle a delivery from RabbitMQ")
            return _nothing()

        consumers[tag] = inline


def _join_content(ch: Any) -> None:
    """Have aiormq assemble a delivered body from its body frames with one join (none
    for a body in one frame) instead of writing them into a ``BytesIO`` one by one and
    copying its value out: a large message's body is copied once less. Only where the
    channel reads content as this was written against (aiormq 6.8 to 7): a
    ``_read_content(frame, header)`` that takes ``ContentBody`` frames from
    ``_get_frame()``; else aiormq's own way stays."""
    get_frame = getattr(ch, "_get_frame", None)
    if get_frame is None or not callable(getattr(ch, "_read_content", None)):
        return

    async def read_content(frame: Any, header: ContentHeader) -> DeliveredMessage:
        size = header.body_size or 0
        parts: list[bytes] = []
        got = 0
        while got < size:
            content = await get_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"Unexpected frame {content!r}", content)
            parts.append(content.value)
            got += len(content.value)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return DeliveredMessage(delivery=frame, header=header, body=body, channel=ch)

    ch._read_content = read_content
