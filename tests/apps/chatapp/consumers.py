"""The chat consumer and its little JSON protocol.

Server -> client (every frame carries ``pid``, the pid of the worker that sent it):

* ``{"type": "hello", "pid", "channel"}`` once, after joining group ``"room"``;
* ``{"type": "message", "pid", "channel", "via", "text", "from_pid", "from_channel"}``
  for every layer message delivered to this consumer (``via`` is ``"group"`` or
  ``"direct"``; ``channel`` is the receiving consumer's channel name);
* ``{"type": "ack", "pid", "ref"}`` once a command has been carried out, or
  ``{"type": "error", "pid", "ref", "error"}`` if it raised.

Client -> server (text frames, JSON):

* ``{"cmd": "group", "text", "ref"}``: ``group_send("room", ...)``;
* ``{"cmd": "direct", "to": <channel name>, "text", "ref"}``: ``channel_layer.send``;
* ``{"cmd": "stats", "ref"}``: the ack carries ``layer.statistics()`` as ``stats``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

GROUP = "room"


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        # joined by hand (not with ``groups = [...]``) so that the join is part of the test
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        await self.send_json({"type": "hello", "pid": os.getpid(), "channel": self.channel_name})

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        ref = content.get("ref") if isinstance(content, dict) else None
        try:
            extra = await self._command(content)
        except Exception as exc:  # report it to the client; the test decides
            await self.send_json(
                {"type": "error", "pid": os.getpid(), "ref": ref, "error": repr(exc)}
            )
            return
        await self.send_json({"type": "ack", "pid": os.getpid(), "ref": ref, **extra})

    async def _command(self, content: Any) -> dict[str, Any]:
        if not isinstance(content, dict):
            raise ValueError(f"a command must be a JSON object, got {content!r}")
        cmd = content.get("cmd")
        if cmd == "stats":
            return {"stats": dataclasses.asdict(self.channel_layer.statistics())}
        message = {
            "type": "chat.message",
            "text": content.get("text"),
            "from_pid": os.getpid(),
            "from_channel": self.channel_name,
        }
        if cmd == "group":
            await self.channel_layer.group_send(GROUP, {**message, "via": "group"})
        elif cmd == "direct":
            await self.channel_layer.send(content["to"], {**message, "via": "direct"})
        else:
            raise ValueError(f"unknown command {cmd!r}")
        return {}

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json(
            {
                "type": "message",
                "pid": os.getpid(),
                "channel": self.channel_name,
                "via": event["via"],
                "text": event["text"],
                "from_pid": event["from_pid"],
                "from_channel": event["from_channel"],
            }
        )
