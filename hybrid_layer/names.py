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

import re
import secrets
from functools import lru_cache
from typing import NamedTuple

# strictly what mint() produces: lowercase hex, no signs, no underscores, no 0x; the
# incarnation is never 0 (a slot's gen starts at 1 and skips 0 when it wraps), and the
# writer treats gen 0 as "whichever process holds the slot now": a name with gen 0 was
# not minted by anyone, so it must not parse (else it would reach a stranger)
_ADDR = re.compile(
    r"\.([A-Za-z0-9_-]{1,32})\.([0-9a-f]{1,8})\.([1-9a-f][0-9a-f]{0,7})!([0-9a-f]{1,8})\.[0-9a-f]+"
)


class ProcessAddress(NamedTuple):
    host_id: str
    slot: int
    gen: int
    bucket: int


def mint(prefix: str, host_id: str, slot: int, gen: int, bucket: int) -> str:
    if not 0 < gen <= 0xFFFFFFFF:
        raise ValueError(f"incarnation {gen} is not a u32 above 0")
    # channels passes "specific." by default: do not double the dot
    base = prefix[:-1] if prefix.endswith(".") else prefix
    return f"{base}.{host_id}.{slot:x}.{gen:x}!{bucket:x}.{secrets.token_hex(6)}"


@lru_cache(maxsize=65536)
def parse(name: str) -> ProcessAddress | None:
    """The address of a process channel minted by :func:`mint`, else ``None``.

    ``None`` for a name that has a ``!`` but was not minted here (another layer's name):
    the caller treats it as unroutable.
    """
    bang = name.find("!")
    if bang < 0:
        return None
    # the host id is the third dot-separated field from the right of the part before "!"
    dot = name.rfind(".", 0, name.rfind(".", 0, name.rfind(".", 0, bang)))
    if dot < 0:
        return None
    m = _ADDR.fullmatch(name, dot)
    if m is None:
        return None
    return ProcessAddress(m[1], int(m[2], 16), int(m[3], 16), int(m[4], 16))


def is_process_channel(name: str) -> bool:
    return "!" in name
