"""BearerAuth on the real stack: requests and httpx calling an ``auth.required()`` route
of a real py-oidc-auth app for longer than the provider's short-lived tokens last."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests import extra

requests = extra("requests")
httpx = extra("httpx")

pytestmark = pytest.mark.integration

SHORT = 4  # seconds: the access token lifetime of this stack
RUN = 7.0  # seconds of calls: past the first token's expiry, and the second's


def run_requests(auth, url):
    with requests.Session() as session:
        session.auth = auth
        return _loop(lambda: session.get(url, timeout=10))


def run_httpx(auth, url):
    with httpx.Client(auth=auth, timeout=10) as client:
        return _loop(lambda: client.get(url))


def run_httpx_async(auth, url):
    async def go():
        out = []
        async with httpx.AsyncClient(auth=auth, timeout=10) as client:
            out.append(await client.get(url))
            end = time.monotonic() + RUN
            while time.monotonic() < end:
                await asyncio.sleep(0.25)
                out.append(await client.get(url))
        return out

    return asyncio.run(go())


def _loop(call):
    out = [call()]
    end = time.monotonic() + RUN
    while time.monotonic() < end:
        time.sleep(0.25)
        out.append(call())
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("run", [run_requests, run_httpx, run_httpx_async],
                         ids=["requests", "httpx", "httpx-async"])
def test_calls_outlive_the_tokens(client_module, make_stack, store, browser, run):
    stack = make_stack(access_ttl=SHORT)
    first = client_module.authenticate(stack.host, store=store, timeout=30)  # the one login
    stack.reset_requests()
    auth = client_module.BearerAuth(stack.host, store=store, timeout=30)

    responses = run(auth, f"{stack.host}/protected")

    assert {r.status_code for r in responses} == {200}
    assert all(not r.history for r in responses)  # refreshed in time: never a 401
    assert {r.json()["sub"] for r in responses} == {"alice"}
    assert time.time() > first["expires"]  # the first token expired during the run
    seen = [(r["method"], r["path"], r["status"]) for r in stack.requests()]
    refreshes = seen.count(("POST", "/auth/v2/token", 200))
    assert refreshes >= 2
    assert seen.count(("GET", "/protected", 200)) == len(responses)
    assert {s for s in seen if s[1] != "/protected"} == {("POST", "/auth/v2/token", 200)}
    assert browser.launches() == 1
