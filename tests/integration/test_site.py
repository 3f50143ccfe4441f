"""Two sites sharing one prefix are detected (issue 12 point 6)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from hybrid_layer import HybridChannelLayer
from hybrid_layer.errors import NamespaceMismatch
from hybrid_layer.shm.registry import _clash


async def test_two_explicit_sites_on_one_prefix_are_refused(layer_config: dict[str, Any]) -> None:
    a = HybridChannelLayer(**layer_config, site="shop")
    ch = await a.new_channel()
    b = HybridChannelLayer(**layer_config, site="blog")
    with pytest.raises(
        NamespaceMismatch, match=r"site 'shop'.*site 'blog'.*own CONFIG\['prefix'\]"
    ):
        await b.new_channel()
    same = HybridChannelLayer(**layer_config, site="shop")  # one site: joins
    await same.send(ch, {"type": "ok"})
    assert await a.receive(ch) == {"type": "ok"}
    assert a.statistics().extra["site_clash"] == 0
    await same.close()
    await a.close()


async def test_guessed_sites_that_differ_are_logged_and_counted(
    layer_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "shop.settings")
    a = HybridChannelLayer(**layer_config)
    ch = await a.new_channel()
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "blog.settings")
    b = HybridChannelLayer(**layer_config)
    with caplog.at_level(logging.ERROR, logger="hybrid_layer"):
        await b.send(ch, {"type": "still works"})
    assert "is in use by site 'django:shop.settings" in caplog.text
    assert b.statistics().extra["site_clash"] == 1
    assert b.global_statistics().extra["site_clash"] == 1  # (status shows it too)
    assert await a.receive(ch) == {"type": "still works"}
    await b.close()
    await a.close()


def test_one_project_seen_from_any_entry_point_is_one_site() -> None:
    # settings loaded (runworker, uvicorn) or not yet (an early management command)
    assert not _clash("django:proj.settings@/srv/proj", "django:proj.settings")
    assert not _clash("django:proj.settings@/srv/proj", "django:proj.settings@/srv/proj")
    assert _clash("django:config.settings@/srv/shop", "django:config.settings@/srv/blog")
    assert _clash("django:shop.settings", "django:blog.settings")
    assert _clash("shop", "blog")


def test_site_key_is_validated() -> None:
    with pytest.raises(ValueError, match=r"CONFIG\['site'\]"):
        HybridChannelLayer(site="")
    with pytest.raises(ValueError, match=r"CONFIG\['site'\]"):
        HybridChannelLayer(site=3)
