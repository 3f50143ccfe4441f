"""The whole exception tree of hybrid_layer.

``ChannelFull`` and ``MessageTooLarge`` subclass channels' own exceptions, so code that
catches ``channels.exceptions.ChannelFull`` keeps working. "You closed it"
(:class:`LayerClosed`) is kept apart from "it broke" (:class:`SharedMemoryCorrupt`,
:class:`NamespaceMismatch`).
"""

from __future__ import annotations

from channels.exceptions import ChannelFull as _ChannelsChannelFull

try:  # channels >= 4.1 has MessageTooLarge
    from channels.exceptions import MessageTooLarge as _ChannelsMessageTooLarge
except ImportError:  # pragma: no cover - older channels

    class _ChannelsMessageTooLarge(Exception):  # type: ignore[no-redef]
        pass


class HybridLayerError(Exception):
    """Base of every error this package raises on its own account."""


class ChannelFull(HybridLayerError, _ChannelsChannelFull):  # type: ignore[misc]  # (untyped)
    """The destination channel holds ``capacity`` messages, or its reader's inbox is full."""


class MessageTooLarge(HybridLayerError, _ChannelsMessageTooLarge):  # type: ignore[misc]  # (untyped)
    """The encoded message is larger than ``max_message_bytes``."""


class LayerClosed(HybridLayerError, RuntimeError):
    """The layer was closed by this process; create a new one to go on."""


class ChannelNotOwned(HybridLayerError, ValueError):
    """``receive()`` on a process channel (``…!…``) that this process did not mint: its
    messages go to the process named in it, so the receive would wait for ever."""


class SharedMemoryCorrupt(HybridLayerError):
    """A record in shared memory failed validation (bad magic, impossible length)."""


class NamespaceMismatch(HybridLayerError, RuntimeError):
    """Live processes use this namespace with a different layout (sizing keys)."""


class NamespaceFull(HybridLayerError, RuntimeError):
    """Every participant slot on this host is taken by a live process."""


class NamespaceTaken(HybridLayerError, PermissionError):
    """A name of this namespace (shared memory, lock file, doorbell) exists and is not
    this user's to use: another user's, a symlink, or the wrong kind of file. The text
    names the object, its owner and what to do."""


__all__ = [
    "ChannelFull",
    "ChannelNotOwned",
    "HybridLayerError",
    "LayerClosed",
    "MessageTooLarge",
    "NamespaceFull",
    "NamespaceMismatch",
    "NamespaceTaken",
    "SharedMemoryCorrupt",
]
