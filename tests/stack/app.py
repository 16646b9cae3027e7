"""A real ``py-oidc-auth[fastapi]`` server for the integration tests.

Run as ``python tests/stack/app.py`` with the provider already up.  Configured by
environment variables:

``APP_PORT``          listening port on 127.0.0.1 (0, the default: any free port)
``APP_DISCOVERY_URL`` the provider's ``/.well-known/openid-configuration`` (required)
``APP_CLIENT_ID``     OAuth client id (default ``py-oidc-auth``)
``APP_CLIENT_SECRET`` its secret; empty or unset: a public client
``APP_PREFIX``        prefix for every route, e.g. ``/api/v1`` (default none)
``APP_SCOPES``        scopes the server asks for (default ``profile email``)
``APP_DEVICE_ROUTE``  ``0``: leave out the device route (a server without device flow)

Routes (under the prefix): the standard ``/auth/v2/*`` routes of ``py-oidc-auth``,
``GET /protected`` (``auth.required()``, answers the caller's claims), and two
test-only routes, ``GET /__test/requests`` (every request seen so far, without the
test routes themselves) and ``DELETE /__test/requests`` (forget them).

When the server listens it prints ``py-oidc-auth app ready url=http://127.0.0.1:PORT``
on stdout.  py-oidc-auth logs raw tokens at WARNING: keep this process's output in a
private file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Request
from py_oidc_auth import FastApiOIDCAuth, IDToken

PORT = int(os.environ.get("APP_PORT", "0") or 0)
DISCOVERY_URL = os.environ.get("APP_DISCOVERY_URL", "")
CLIENT_ID = os.environ.get("APP_CLIENT_ID", "py-oidc-auth")
CLIENT_SECRET = os.environ.get("APP_CLIENT_SECRET") or None
PREFIX = os.environ.get("APP_PREFIX", "").rstrip("/")
SCOPES = os.environ.get("APP_SCOPES", "profile email")
DEVICE_ROUTE = os.environ.get("APP_DEVICE_ROUTE", "1") not in ("0", "false", "no", "off")

TEST_ROUTE = f"{PREFIX}/__test/requests"
_PORT_BOUND = 0  # set by main() once the socket is bound

auth = FastApiOIDCAuth(
    client_id=CLIENT_ID,
    client_secret=CLIENT_SECRET,
    discovery_url=DISCOVERY_URL,
    scopes=SCOPES,
    offline_access=True,
)

@contextlib.asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # The socket is bound before uvicorn starts, so the port is known here.
    sys.stdout.write(f"py-oidc-auth app ready url=http://127.0.0.1:{_PORT_BOUND}\n")
    sys.stdout.flush()
    yield


app = FastAPI(title="py-oidc-auth test app", lifespan=_lifespan)
app.include_router(
    auth.create_auth_router(prefix=PREFIX, device_flow="/auth/v2/device" if DEVICE_ROUTE else None)
)

_requests: list[dict[str, Any]] = []


@app.middleware("http")
async def _record(request: Request, call_next: Any) -> Any:
    """Count every request, so tests can prove that a call made none."""
    if request.url.path == TEST_ROUTE:
        return await call_next(request)
    entry: dict[str, Any] = {
        "t": time.time(),
        "method": request.method,
        "path": request.url.path,
        "status": None,
    }
    _requests.append(entry)
    response = await call_next(request)
    entry["status"] = response.status_code
    return response


@app.get(f"{PREFIX}/protected")
async def protected(token: Annotated[IDToken, auth.required()]) -> dict[str, Any]:
    """Answer the verified claims of the caller's access token."""
    return token.model_dump(exclude_none=True)


@app.get(TEST_ROUTE)
async def requests_seen() -> list[dict[str, Any]]:
    return _requests


@app.delete(TEST_ROUTE)
async def forget_requests() -> list[dict[str, Any]]:
    _requests.clear()
    return _requests



def main() -> None:
    global _PORT_BOUND
    if not DISCOVERY_URL:
        sys.exit("app.py: set APP_DISCOVERY_URL to the provider's discovery URL")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", PORT))
    _PORT_BOUND = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="info", access_log=True, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
