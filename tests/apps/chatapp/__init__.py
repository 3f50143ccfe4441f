"""A tiny Channels chat app for the real-server tests (no database, no migrations).

Run it with any ASGI server, e.g.::

    HL_TEST_PREFIX=mytest gunicorn -k uvicorn_worker.UvicornWorker -w 3 \
        tests.apps.chatapp.asgi:application

Every websocket client joins group ``"room"`` and is told its worker's pid and its
consumer's channel name; it can then ask for a ``group_send`` to the room or a direct
``channel_layer.send`` to any channel name. See :mod:`.consumers` for the protocol.
"""
