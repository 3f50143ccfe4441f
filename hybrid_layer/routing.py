"""Pure routing decisions and the process-local group table.

:class:`GroupTable` keeps group -> {channel: joined_at} for the members this process
added. Its mutators return whether the group became non-empty (``JOIN``) or empty
(``LEAVE``): the caller turns that into a change of the slot's published group set
(and, in broker mode, into a binding).
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from .names import ProcessAddress, parse


class Action(Enum):
    NONE = 0
    JOIN = 1
    LEAVE = 2


class Route(Enum):
    OWN = 1  # a process channel of this very participant
    SLOT = 2  # a process channel of another participant on this host
    NORMAL = 3  # a normal channel: any one reader
    UNROUTABLE = 4  # a process channel of another host, or not minted by this layer


class Destination(NamedTuple):
    route: Route
    address: ProcessAddress | None


def route(name: str, host_id: str, my_slot: int, my_gen: int) -> Destination:
    if "!" not in name:
        return Destination(Route.NORMAL, None)
    addr = parse(name)
    if addr is None or addr.host_id != host_id:
        return Destination(Route.UNROUTABLE, addr)
    if addr.slot == my_slot and addr.gen == my_gen:
        return Destination(Route.OWN, addr)
    return Destination(Route.SLOT, addr)


class GroupTable:
    """group -> {channel: joined_at}; pure, not thread-safe (callers hold a lock)."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, float]] = {}

    def add(self, group: str, channel: str, now: float) -> Action:
        members = self.groups.get(group)
        if members is None:
            self.groups[group] = {channel: now}
            return Action.JOIN
        members[channel] = now
        return Action.NONE

    def discard(self, group: str, channel: str) -> Action:
        members = self.groups.get(group)
        if members is None or channel not in members:
            return Action.NONE
        del members[channel]
        if not members:
            del self.groups[group]
            return Action.LEAVE
        return Action.NONE

    def members(self, group: str, now: float, expiry: float) -> tuple[list[str], int, Action]:
        """Current members; expired ones (joined over ``expiry`` s ago) are removed."""
        members = self.groups.get(group)
        if not members:
            return [], 0, Action.NONE
        cutoff = now - expiry
        expired = [c for c, t in members.items() if t < cutoff]
        for c in expired:
            del members[c]
        if not members:
            del self.groups[group]
            return [], len(expired), Action.LEAVE
        return list(members), len(expired), Action.NONE

    def clear(self) -> list[str]:
        gone = list(self.groups)
        self.groups.clear()
        return gone

    def __len__(self) -> int:
        return len(self.groups)
