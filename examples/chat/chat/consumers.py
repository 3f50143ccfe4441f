"""The tutorial's ChatConsumer, saying which worker process served each step."""

from __future__ import annotations

import os
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        self.room_name = self.scope["url_route"]["kwargs"]["room_name"]
        self.room_group_name = f"chat_{self.room_name}"
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)
        await self.accept()
        await self.send_json({"type": "hello", "pid": os.getpid()})

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        message = str(content.get("message", "")) if isinstance(content, dict) else ""
        await self.channel_layer.group_send(
            self.room_group_name,
            {"type": "chat.message", "message": message, "from_pid": os.getpid()},
        )

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json(
            {
                "type": "message",
                "message": event["message"],
                "from_pid": event["from_pid"],
                "pid": os.getpid(),
            }
        )
