"""No HTTP views: the app is websocket-only (a plain GET gets a 404)."""

urlpatterns: list[object] = []
