"""Pure: mint and parse channel names.

A process channel says where its reader lives::

    <user prefix>.<host_id>.<slot>.<gen>!<bucket>.<token>

``slot`` and ``gen`` (hex) are the participant's slot on the host and the slot's
incarnation, so a recycled slot never receives a dead process's messages. ``bucket``
(hex) indexes the reader's capacity counters, so a sender can check ``capacity``
without asking the reader. ``token`` makes the name unique and unguessable.

A name without ``!`` is a *normal* channel (any one reader gets each message).
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from typing import NamedTuple


class ProcessAddress(NamedTuple):
    host_id: str
    slot: int
    gen: int
    bucket: int


def mint(prefix: str, host_id: str, slot: int, gen: int, bucket: int) -> str:
    return f"{prefix}.{host_id}.{slot:x}.{gen:x}!{bucket:x}.{secrets.token_hex(6)}"


@lru_cache(maxsize=65536)
def parse(name: str) -> ProcessAddress | None:
    """The address of a process channel minted by :func:`mint`, else ``None``.

    ``None`` for a name that has a ``!`` but was not minted here (another layer's name):
    the caller treats it as unroutable.
    """
    left, bang, right = name.partition("!")
    if not bang:
        return None
    parts = left.rsplit(".", 3)
    if len(parts) != 4:
        return None
    bucket_s, dot, token = right.partition(".")
    if not dot or not token:
        return None
    try:
        return ProcessAddress(parts[1], int(parts[2], 16), int(parts[3], 16), int(bucket_s, 16))
    except ValueError:
        return None


def is_process_channel(name: str) -> bool:
    return "!" in name
