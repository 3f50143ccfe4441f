from __future__ import annotations

import os
from typing import Any

from django.shortcuts import render


def index(request: Any) -> Any:
    return render(request, "chat/index.html", {"pid": os.getpid()})


def room(request: Any, room_name: str) -> Any:
    return render(request, "chat/room.html", {"room_name": room_name, "pid": os.getpid()})
