"""Why a link is not up, in words an operator can act on (``amqp.explain._explain``)."""

from __future__ import annotations

import ssl
from types import SimpleNamespace

import aiormq
import pytest

from hybrid_layer.amqp.explain import _explain, _safe, _tls_error
from hybrid_layer.shm import layout as L

CFG = SimpleNamespace(connect_timeout=5.0)


def test_tls_error_wrapped_by_aiormq_is_named() -> None:
    # aiormq turns an ssl.SSLError into an AMQPConnectionError with only its text
    exc = aiormq.exceptions.AMQPConnectionError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
        "certificate in certificate chain (_ssl.c:1006)",
    )
    reason, text = _explain(exc, CFG)
    assert reason == L.REASON_TLS
    assert "TLS handshake failed (certificate verify failed: self-signed certificate" in text
    assert "ssl_context" in text


def test_tls_error_as_the_cause() -> None:
    inner = ssl.SSLCertVerificationError(1, "x")
    inner.verify_message = "unable to get local issuer certificate"  # type: ignore[attr-defined]
    outer = ConnectionError("handshake")
    outer.__cause__ = inner
    assert _tls_error(outer) == "certificate verify failed: unable to get local issuer certificate"


def test_timeout_says_what_timed_out() -> None:
    reason, text = _explain(TimeoutError(), CFG)
    assert reason == L.REASON_TIMEOUT
    assert "connect_timeout (5s)" in text


def test_unreachable_and_other_errors() -> None:
    reason, text = _explain(ConnectionRefusedError(111, "Connection refused"), CFG)
    assert reason == L.REASON_UNREACHABLE and text == "Connection refused"
    assert _tls_error(ValueError("plain")) is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:secret@127.0.0.1:5672/", "amqp://guest@127.0.0.1:5672/"),
        ("amqps://u:p@w@host/v", "amqps://u@host/v"),
        ("amqp://host/", "amqp://host/"),
    ],
)
def test_passwords_never_logged(url: str, shown: str) -> None:
    assert _safe(url) == shown
