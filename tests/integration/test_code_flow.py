"""Authorization code flow through the scripted BROWSER, and the fallback to it."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.integration


def _paths(requests):
    return [(r["method"], r["path"]) for r in requests]


@pytest.mark.timeout(60)
def test_code_flow_logs_in_twice_on_the_same_port(
    client_module, stack, store, browser, redirect_port
):
    flow = client_module.CodeFlow(stack.host, store=store, redirect_ports=[redirect_port],
                                  timeout=30)
    first = asyncio.run(flow.authenticate())
    second = asyncio.run(flow.authenticate(force=True))

    # Each login: GET login (not followed), then one code exchange.
    assert _paths(stack.requests()) == [("GET", "/auth/v2/login"), ("POST", "/auth/v2/token")] * 2
    events = browser.wait_done(2)
    assert not browser.errors(), events
    callbacks = browser.events("callback")
    assert [c["port"] for c in callbacks] == [redirect_port, redirect_port]
    assert [c["status"] for c in callbacks] == [200, 200], callbacks
    assert all(c["params"] == ["code", "iss", "state"] for c in callbacks)
    for token in (first, second):
        status, claims = stack.protected(token)
        assert status == 200, claims
        assert claims["sub"] == "alice"
        assert token["refresh_token"]
    assert first["access_token"] != second["access_token"]
    assert flow.token == second


@pytest.mark.timeout(60)
def test_code_flow_access_denied_fails_at_once(
    client_module, stack, store, browser, redirect_port
):
    browser.set(action="deny")
    flow = client_module.CodeFlow(stack.host, store=store, redirect_ports=[redirect_port],
                                  timeout=30)
    start = time.monotonic()
    with pytest.raises(client_module.AuthError) as info:
        asyncio.run(flow.authenticate())
    took = time.monotonic() - start

    assert took < 5, took
    assert "access_denied" in f"{info.value} {info.value.detail}"
    events = browser.wait_done()
    callback = browser.events("callback")
    assert callback and callback[0]["error"] == "access_denied", events
    assert 400 <= callback[0]["status"] < 500
    assert ("POST", "/auth/v2/token") not in _paths(stack.requests())
    assert store.get(stack.host) is None


@pytest.mark.timeout(60)
def test_callback_with_tampered_state_is_refused_and_its_code_never_exchanged(
    client_module, stack, store, browser, redirect_port
):
    browser.set(tamper="state")
    flow = client_module.CodeFlow(stack.host, store=store, redirect_ports=[redirect_port],
                                  timeout=5)
    with pytest.raises(client_module.AuthError):
        asyncio.run(flow.authenticate())

    events = browser.wait_done()
    callback = browser.events("callback")
    assert callback and callback[0]["tampered"], events
    assert 400 <= callback[0]["status"] < 500, callback
    assert _paths(stack.requests()) == [("GET", "/auth/v2/login")]
    assert store.get(stack.host) is None
    # The proof that the code was never exchanged: it is still good for exactly one
    # exchange (oidc-provider codes are single use).
    status, body = stack.exchange_code(callback[0]["code"], callback[0]["state"])
    assert status == 200, body
    assert body["access_token"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "variant, device_status",
    [
        ({"device": False}, 502),  # provider without device grant: the app answers 502
        ({"app_device_route": False}, 404),  # the app has no device route at all
    ],
    ids=["provider-without-device-flow", "app-without-device-route"],
)
def test_without_device_flow_authenticate_falls_back_to_the_code_flow(
    client_module, make_stack, store, browser, redirect_port, variant, device_status
):
    stack = make_stack(**variant)
    start = time.time()
    token = client_module.authenticate(stack.host, store=store, redirect_ports=[redirect_port],
                                       timeout=30)

    requests = stack.requests()
    # "No device flow here" is a definitive answer, not a fault to retry: one request,
    # and the browser opens on the code flow at once.
    device_posts = [r for r in requests if r["path"] == "/auth/v2/device"]
    assert len(device_posts) == 1, (
        f"{len(device_posts)} POSTs to the device route (HTTP {device_status}) before the "
        f"fallback; the browser opened {browser.events('launch')[0]['t'] - start:.1f} s "
        "after the start"
    )
    assert browser.events("launch")[0]["t"] - start < 2
    assert _paths(requests) == [
        ("POST", "/auth/v2/device"), ("GET", "/auth/v2/login"), ("POST", "/auth/v2/token"),
    ]
    assert requests[0]["status"] == device_status
    assert stack.protected(token)[0] == 200
    events = browser.wait_done()
    assert not browser.errors(), events
    assert not browser.events("confirm")  # no device page was involved
    assert [c["status"] for c in browser.events("callback")] == [200]
    assert store.get(stack.host)["access_token"] == token["access_token"]
