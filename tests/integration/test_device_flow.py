"""Device flow against the real stack: login, cache, denial, slow_down."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.integration


def _paths(requests):
    return [(r["method"], r["path"]) for r in requests]


@pytest.mark.timeout(60)
def test_authenticate_logs_in_with_the_device_flow_then_uses_the_cache(
    client_module, stack, store, browser
):
    token = client_module.authenticate(stack.host, store=store, timeout=30)

    assert set(token) >= {"access_token", "token_type", "expires", "refresh_token",
                          "refresh_expires", "scope", "headers"}
    assert token["headers"] == {"Authorization": f"Bearer {token['access_token']}"}
    assert token["expires"] > time.time() + 60
    assert token["refresh_token"]
    status, claims = stack.protected(token)
    assert status == 200, claims
    assert claims["sub"] == "alice"
    assert claims["iss"] == stack.issuer
    assert "offline_access" in token["scope"].split()

    # The browser was opened on verification_uri_complete: it could confirm the
    # user code without being told it.
    events = browser.wait_done()
    assert not browser.errors(), events
    confirm = browser.events("confirm")
    assert len(confirm) == 1 and confirm[0]["user_code"]
    assert browser.events("approved")
    assert _paths(stack.requests())[:1] == [("POST", "/auth/v2/device")]

    # A second call is answered from the cache: not one request to the server.
    stack.reset_requests()
    again = client_module.authenticate(stack.host, store=store, timeout=30)
    assert again == token
    assert asyncio.run(client_module.authenticate_async(stack.host, store=store)) == token

    async def inside_a_running_loop():
        return client_module.authenticate(stack.host, store=store)

    assert asyncio.run(inside_a_running_loop()) == token
    assert stack.requests() == []
    assert browser.launches() == 1
    assert store.get(stack.host)["access_token"] == token["access_token"]


@pytest.mark.timeout(60)
def test_device_flow_step_by_step(client_module, stack, store, person):
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=30, interactive=False)

    async def login():
        code = await flow.get_device_code()
        assert set(code) >= {"uri", "user_code", "device_code", "interval"}
        # py-oidc-auth forwards verification_uri_complete: the uri carries the code.
        assert code["uri"].startswith(stack.issuer + "/device?")
        assert "user_code=" in code["uri"]
        assert code["interval"] == 1
        approved = asyncio.ensure_future(asyncio.to_thread(person.approve_device, code["uri"]))
        token = await flow.poll(code["device_code"], code["interval"])
        events = await approved
        return code, token, events

    code, token, events = asyncio.run(login())
    assert [e["event"] for e in events][-1] == "approved"
    assert stack.protected(token)[0] == 200
    assert flow.token == token
    polls = stack.polls(code["device_code"])
    assert polls and polls[-1]["answer"] == "token"
    assert all(p["answer"] == "authorization_pending" for p in polls[:-1])


@pytest.mark.timeout(60)
def test_device_denial_ends_within_one_interval(client_module, make_stack, store, browser):
    # The provider sends no interval here: py-oidc-auth announces its default, 5 s.
    stack = make_stack(device_interval=None)
    browser.set(action="deny")
    start = time.time()
    with pytest.raises(client_module.AuthError) as info:
        client_module.authenticate(stack.host, store=store, timeout=30)
    ended = time.time()

    events = browser.wait_done()
    denied = browser.events("denied")
    assert denied, events
    interval = 5
    assert ended - denied[0]["t"] <= interval + 1, (ended - denied[0]["t"])
    assert ended - start <= interval + 3
    text = f"{info.value} {info.value.detail}"
    assert "access_denied" in text or "denied" in str(info.value).lower(), text
    assert "Traceback" not in str(info.value)
    assert store.get(stack.host) is None


@pytest.mark.timeout(60)
def test_device_denial_step_by_step(client_module, stack, store, person):
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=30, interactive=False)

    async def denied():
        code = await flow.get_device_code()
        await asyncio.to_thread(person.deny_device, code["uri"])
        denied_at = time.time()
        with pytest.raises(client_module.AuthError) as info:
            await flow.poll(code["device_code"], code["interval"])
        return code, time.time() - denied_at, info.value

    code, took, error = asyncio.run(denied())
    assert took <= code["interval"] + 1, took
    assert "access_denied" in f"{error} {error.detail}"
    assert stack.polls(code["device_code"])[-1]["answer"] == "access_denied"


@pytest.mark.timeout(90)
def test_slow_down_adds_five_seconds_each_time(client_module, make_stack, store, person):
    stack = make_stack(slow_down=2)
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=60, interactive=False)

    async def login():
        code = await flow.get_device_code()
        await asyncio.to_thread(person.approve_device, code["uri"])
        token = await flow.poll(code["device_code"], code["interval"])
        return code, token

    code, token = asyncio.run(login())
    assert stack.protected(token)[0] == 200
    polls = stack.polls(code["device_code"])
    assert [p["answer"] for p in polls] == ["slow_down", "slow_down", "token"], polls
    # Provider-side timestamps: interval + 5 after the first slow_down, + 10 after the second.
    gaps = [b["t"] - a["t"] for a, b in zip(polls, polls[1:])]
    base = code["interval"]
    assert base + 5 - 0.5 <= gaps[0] <= base + 5 + 2, gaps
    assert base + 10 - 0.5 <= gaps[1] <= base + 10 + 2, gaps
    assert 4 <= gaps[1] - gaps[0] <= 6.5, gaps
