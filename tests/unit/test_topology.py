"""The link's names and queue arguments (``hybrid_layer.amqp.topology``): pure."""

from __future__ import annotations

from hybrid_layer.amqp import topology as T
from hybrid_layer.config import parse_config


def test_broker_names() -> None:
    assert T.host_queue("asgi", "h1") == "asgi.h1"
    assert T.group_key("asgi", 0xAB) == "asgi.g.00000000000000ab"
    assert T.normal_queue("asgi", 0xCD) == "asgi.n.00000000000000cd"


def test_claim_and_dead_letter_names() -> None:
    assert T.claim_queue("asgi", "h1") == "asgi.h1.claim"
    assert T.dead_exchange("asgi") == "asgi.dead"
    assert T.dead_queue("asgi", "h1") == "asgi.h1.dead"
    assert T.normal_dead_queue("asgi") == "asgi.normal.dead"
    assert T.NORMAL_DEAD_ARGS == {"x-expires": 24 * 3600 * 1000, "x-max-length": T.DEAD_MAX}


def test_host_queue_args_classic_and_quorum() -> None:
    cfg = parse_config(host="amqp://x/", prefix="p", host_id="h1", expiry=30, remote_capacity=500)
    durable, args = T.host_queue_args(cfg)
    assert durable is False
    assert args == {
        "x-max-length": 500,
        "x-overflow": "reject-publish",
        "x-message-ttl": 30_000,
        "x-expires": int(cfg.host_queue_expires * 1000),
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": "p.dead",
        "x-dead-letter-routing-key": "p.h1",
    }
    quorum = parse_config(host="amqp://x/", prefix="p", host_id="h1", queue_type="quorum")
    durable, qargs = T.host_queue_args(quorum)
    assert durable is True
    assert qargs["x-queue-type"] == "quorum"


def test_normal_queue_args() -> None:
    cfg = parse_config(
        host="amqp://x/",
        prefix="p",
        expiry=10,
        capacity=100,
        channel_capacity={"jobs*": 7},
    )
    args = T.normal_queue_args(cfg, "jobs.a")
    assert args == {
        "x-max-length": 7,
        "x-overflow": "reject-publish",
        "x-message-ttl": 10_000,
        "x-expires": 300_000,  # at least 5 minutes
        "x-dead-letter-exchange": "p.dead",
        "x-dead-letter-routing-key": "p.normal.dead",
    }
    assert T.normal_queue_args(cfg, "other")["x-max-length"] == 100
    long = parse_config(host="amqp://x/", prefix="p", expiry=200)
    assert T.normal_queue_args(long, "x")["x-expires"] == 800_000  # 4 x expiry
