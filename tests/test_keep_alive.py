"""Keep-alive between our HTTP hops: a client that reuses a pooled connection just as the server
closes it fails the request (ReadError: a forwarded critic push answered 503, seen in `make test`).
Our servers keep idle connections longer than any pooled client (httpx: 5 s); our critic client
drops its own before a 5-s server (uvicorn's default, vLLM's) closes them."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI

from espo_server import serve
from espo_server.critic_http import KEEPALIVE_EXPIRY_S
from espo_server.process import free_port
from tests.waiting import wait_until

UVICORN_DEFAULT_KEEP_ALIVE_S = 5


def test_our_server_keeps_an_idle_connection_past_a_clients_pool_expiry(monkeypatch) -> None:
    """A connection left idle for 6 s (more than httpx's 5-s pool expiry and uvicorn's default 5-s
    keep-alive) still answers on `serve_app` (the critic server's uvicorn)."""
    started: list[uvicorn.Server] = []

    class Recorded(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            started.append(self)

    monkeypatch.setattr(serve.uvicorn, "Server", Recorded)
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    port = free_port()
    thread = threading.Thread(
        target=lambda: asyncio.run(serve.serve_app(app, "127.0.0.1", port, "warning")), daemon=True
    )
    thread.start()
    try:
        wait_until(lambda: started and started[0].started, "the server listening")
        request = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(request)
            assert b"200 OK" in answer(conn)
            time.sleep(UVICORN_DEFAULT_KEEP_ALIVE_S + 1)  # idle: the input, not a wait for a state
            conn.sendall(request)
            assert b"200 OK" in answer(conn), "the server closed the idle connection"
        assert started[0].config.timeout_keep_alive == serve.KEEP_ALIVE_S > 5.0
    finally:
        started[0].should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive()


def answer(conn: socket.socket) -> bytes:
    """One whole answer to /ping (headers and body may come in separate reads); b"" if closed."""
    got = b""
    while b'{"ok":true}' not in got:
        chunk = conn.recv(4096)
        if not chunk:
            return got
        got += chunk
    return got


def test_the_critic_client_drops_idle_connections_before_a_5s_server_does() -> None:
    assert KEEPALIVE_EXPIRY_S < UVICORN_DEFAULT_KEEP_ALIVE_S
    assert httpx.Limits().keepalive_expiry >= UVICORN_DEFAULT_KEEP_ALIVE_S  # why ours is set apart
