"""Small ASGI applications that the integration tests run under real servers."""
