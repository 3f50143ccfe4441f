"""One site per namespace: the site check made when a process attaches.

Two Django projects run by one user on one host with the same ``CONFIG['prefix']``
would silently share groups, normal channels and ``flush()``. The registry records the
site of its first process (a fingerprint, a label, and whether it was given
explicitly as ``CONFIG['site']`` or guessed from ``DJANGO_SETTINGS_MODULE`` and
``BASE_DIR``); every process that attaches compares its own under ``INIT_LOCK``
(``check_site``). Two explicit sites that differ are refused; a clash involving a guess
is logged and counted (``site_clash``), never refused, since one site's processes may
guess differently.

Owns ``site_clash`` (in ``registry_state``) and the registry's site words. Called at
attach only: nothing here is hot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct

from ..config import LayerConfig
from ..errors import NamespaceMismatch
from . import layout as L
from .registry_state import RegistryState, _put_text, _text

log = logging.getLogger("hybrid_layer")


class SiteCheck(RegistryState):
    """Part of ``Namespace``: the site recorded in the registry, checked at attach."""

    def check_site(self) -> None:
        """Caller holds INIT_LOCK. Two sites with one prefix (same user, same host) would
        silently share groups, normal channels and flush(): compare this process's site
        with the one recorded in the registry. Two explicit CONFIG['site'] values that
        differ are refused; a clash involving a guess is an ERROR and a counted
        ``site_clash`` (a guess may differ between one site's own processes)."""
        assert self.reg is not None
        buf = self.reg.buf
        label, explicit = site_identity(self.cfg)
        if not label:
            return
        fp = _site_hash(label)
        theirs_fp, theirs_flags = struct.unpack_from("<QQ", buf, L.H_SITE)
        theirs = _text(buf, L.H_SITE_LABEL, L.H_SITE_LABEL_LEN)
        theirs_explicit = bool(theirs_flags & L.SITE_EXPLICIT)
        if theirs_fp == 0 or (explicit and not theirs_explicit and not _clash(label, theirs)):
            struct.pack_into("<QQ", buf, L.H_SITE, fp, L.SITE_EXPLICIT if explicit else 0)
            _put_text(buf, L.H_SITE_LABEL, L.H_SITE_LABEL_LEN, label)
            return
        if theirs_fp == fp or not _clash(label, theirs):
            return
        what = (
            f"{self.ns} (CONFIG['prefix'] {self.cfg.prefix!r}) is in use by site {theirs!r}, "
            f"this process is site {label!r}: two sites sharing one prefix would exchange "
            "group messages and normal-channel jobs, and one's flush() would erase the "
            "other's groups. Give each site its own CONFIG['prefix']"
        )
        if explicit and theirs_explicit:
            raise NamespaceMismatch(what)
        self.site_clash = what
        log.error(
            "hybrid_layer: %s (or set CONFIG['site'] the same in every process of one site "
            "if this is one site seen two ways)",
            what,
        )

    def site(self) -> tuple[str, bool]:
        """The site recorded in the registry: (label, explicit)."""
        assert self.reg is not None
        flags = struct.unpack_from("<Q", self.reg.buf, L.H_SITE + 8)[0]
        return _text(self.reg.buf, L.H_SITE_LABEL, L.H_SITE_LABEL_LEN), bool(
            flags & L.SITE_EXPLICIT
        )


def site_identity(cfg: LayerConfig) -> tuple[str, bool]:
    """(label, explicit): CONFIG['site'], else a guess from Django's settings module and
    BASE_DIR - the same for uvicorn, gunicorn, runworker, management commands and Celery
    of one project - else ("", False): unknown, nothing is checked."""
    if cfg.site:
        return cfg.site, True
    module = os.environ.get("DJANGO_SETTINGS_MODULE", "")
    if not module:
        return "", False
    base = ""
    try:
        from django.conf import settings

        if settings.configured and getattr(settings, "BASE_DIR", None):
            base = os.path.realpath(str(settings.BASE_DIR))
    except Exception:  # no Django, or settings that cannot load: the module is enough
        base = ""
    return f"django:{module}@{base}" if base else f"django:{module}", False


def _site_hash(label: str) -> int:
    h = int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")
    return h or 1


def _clash(a: str, b: str) -> bool:
    """Two site labels that cannot be one site. A guess without BASE_DIR (settings not
    loaded yet) matches a guess with it when the settings modules agree."""
    if a == b:
        return False
    if a.startswith("django:") and b.startswith("django:"):
        ma, _, ba = a.partition("@")
        mb, _, bb = b.partition("@")
        return ma != mb or bool(ba and bb and ba != bb)
    return True
