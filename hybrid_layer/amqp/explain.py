"""Why the link is not up, in words an operator can act on; URLs made safe to log.

``_explain(exc, cfg)`` turns what connecting or serving raised (aiormq's exceptions, a
TLS error wrapped in one, a timeout, an ``OSError``) into ``(L.REASON_*, a sentence)``:
the reason code goes into the leader's registry word ``LQ_REASON`` (participants and
``statistics()`` read it), the sentence into the logs and ``info()["reason"]``. The
sentence says what to check (CONFIG key, credentials, permissions, the URL's port), not
the AMQP client's internals. ``_safe(url)`` drops a URL's password before it is logged.

No state, no I/O (aiormq is imported only for its exception classes). Called by the
connection loop (``connection.Connection._run``) when an attempt fails or a connection
is lost, and by ``info()``; never per message.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiormq

from ..shm import layout as L

if TYPE_CHECKING:
    from ..config import LayerConfig


def _explain(exc: BaseException, cfg: LayerConfig) -> tuple[int, str]:
    """(L.REASON_*, a sentence) for why connecting or serving failed: what an operator
    needs to act on, not the AMQP client's internals."""

    tls = _tls_error(exc)
    if tls is not None:
        why = tls
        return L.REASON_TLS, (
            f"TLS handshake failed ({why}): check CONFIG['ssl_context'] (its CA file, "
            "client certificate) and that the URL's host name matches the certificate"
        )
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return L.REASON_TIMEOUT, (
            f"no answer within connect_timeout ({cfg.connect_timeout:g}s) while connecting "
            "or declaring: the address accepts TCP but does not speak AMQP there (a TLS "
            "port without amqps://? a firewall?), or the broker is overloaded"
        )
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in text:
        return L.REASON_REFUSED, (
            "RabbitMQ closed the connection while opening it: the vhost in the URL does "
            "not exist or the user has no permission on it (rabbitmqctl list_permissions)"
        )
    if isinstance(
        exc,
        aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError,
    ):
        return L.REASON_REFUSED, f"RabbitMQ refused the login ({text}): check user and password"
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return L.REASON_REFUSED, f"RabbitMQ refused access ({text}): check the user's permissions"
    if isinstance(exc, aiormq.exceptions.AMQPChannelError):
        return L.REASON_DECLARE, f"{type(exc).__name__}: {text}"
    if isinstance(exc, OSError):  # (aiormq's connection errors are OSErrors too)
        return L.REASON_UNREACHABLE, f"{exc.strerror or text or type(exc).__name__}"
    return L.REASON_LOST, f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tls_error(exc: BaseException) -> str | None:
    """The certificate or handshake error in ``exc`` or what caused it (aiormq wraps
    an ``ssl.SSLError`` in an AMQPConnectionError carrying only its text), else None."""
    import ssl

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            verify = getattr(e, "verify_message", None)
            reason = getattr(e, "reason", None)
            if verify:
                return f"certificate verify failed: {verify}"
            return str(reason or e)
        for arg in e.args:
            text = str(arg)
            if "[SSL" in text or "CERTIFICATE_VERIFY_FAILED" in text:
                return text.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]
        e = e.__cause__ or e.__context__
    return None


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"
