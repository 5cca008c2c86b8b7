"""The ports a server listens on: its port and, optionally, an admin port for the admin routes.

The admin routes change what the server serves, or give its weights away: weight pushes (policy and
critic), writes of the server-owned ESPO state (`PUT /v1/espo/state`, `POST /v1/espo/commit`), and
the weight files a replica that joins copies (`GET /v1/weights/files`, weight_files.py). With
`--admin-port` set, the server listens on both ports; the admin port answers every route, the other
port every route but those, which it answers 403 `permission_error`. Kubernetes NetworkPolicies work
on ports (L4), not on paths: this is what lets one keep the admin routes to the learner's namespace
while the rollout routes, /metrics and the probes stay reachable
(deploy/kubernetes/base/networkpolicy.yaml).
The gRPC port is one port for all its RPCs: restrict it like the admin port.

Both HTTP apps use it: the rollout server (`espo-server serve --admin-port`) and the critic server
(`espo-server critic --admin-port`, where the push route is the admin route).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import Request

from .errors import Forbidden


def admin_only(admin_port: int | None) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: with `admin_port` set, the route answers only on that port (403 on the
    other). The port is the one the connection came in on (the ASGI scope's `server`)."""

    async def on_admin_port(request: Request) -> None:
        if admin_port is None:
            return
        server = request.scope.get("server")
        if server is None or server[1] != admin_port:
            raise Forbidden(
                f"{request.method} {request.url.path} is an admin route: it is served on the admin "
                f"port ({admin_port}) only, not on this one"
            )

    return on_admin_port


async def serve(server: uvicorn.Server, admin_port: int | None) -> None:
    """Run `server` on its configured host and port, and on `admin_port` too when it is set."""
    if admin_port is None:
        await server.serve()
        return
    await server.serve(sockets=[bind(server.config, port) for port in (server.config.port, admin_port)])


def bind(config: uvicorn.Config, port: int) -> socket.socket:
    """A socket bound to `config.host` and `port`, as uvicorn binds its own (IPv6 hosts too; a port
    in use ends the process with uvicorn's start-up failure status)."""
    return uvicorn.Config(config.app, host=config.host, port=port, log_config=None).bind_socket()
