"""hybrid_layer: a Django Channels channel layer on POSIX shared memory (and RabbitMQ).

``CHANNEL_LAYERS = {"default": {"BACKEND": "hybrid_layer.HybridChannelLayer"}}``
"""

from .errors import (
    ChannelFull,
    HybridLayerError,
    LayerClosed,
    MessageTooLarge,
    NamespaceFull,
    NamespaceMismatch,
    NamespaceTaken,
    SharedMemoryCorrupt,
)
from .layer import HybridChannelLayer
from .stats import ChannelStatistics, Statistics

__version__ = "0.2.0.dev0"

__all__ = [
    "ChannelFull",
    "ChannelStatistics",
    "HybridChannelLayer",
    "HybridLayerError",
    "LayerClosed",
    "MessageTooLarge",
    "NamespaceFull",
    "NamespaceMismatch",
    "NamespaceTaken",
    "SharedMemoryCorrupt",
    "Statistics",
    "__version__",
]
