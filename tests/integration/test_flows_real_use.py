"""The login flows at their edges, against the real stack.

An approval made at the very end of ``timeout`` counts (the last poll is made at the
deadline), a device code that expires is told apart from our own timeout, and a
client that gets device codes but is refused at the token endpoint once approved
(``unauthorized_client``) falls back to the code flow.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest

pytestmark = pytest.mark.integration

# tests/stack/provider.mjs: device codes, then unauthorized_client at the token endpoint.
NO_DEVICE_CLIENT_ID = "py-oidc-auth-no-device"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def grants(stack: Any) -> list[dict[str, Any]]:
    """Every token endpoint request the provider saw since the last reset."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{stack.issuer}/__test/grants", timeout=15) as resp:
        return list(json.loads(resp.read()))


def reset_grants(stack: Any) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"{stack.issuer}/__test/grants", method="DELETE")
    with opener.open(req, timeout=15):
        pass


@pytest.mark.timeout(60)
def test_an_approval_at_the_end_of_the_timeout_counts(client_module, make_stack, store, person):
    # The provider sends no interval: py-oidc-auth announces 5 s. With timeout=7 the
    # polls are at 5 s (pending) and, since the next would be at 10 s, at the 7-s deadline.
    stack = make_stack(device_interval=None)
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=7, interactive=False)

    async def login() -> tuple[dict[str, Any], Any, float, float]:
        code = await flow.get_device_code()
        assert code["interval"] == 5
        start = time.time()

        def approve_late() -> float:
            time.sleep(5.3)
            person.approve_device(code["uri"])
            return time.time()

        approval = asyncio.ensure_future(asyncio.to_thread(approve_late))
        token = await flow.poll(code["device_code"], code["interval"])
        return code, token, start, await approval

    code, token, start, approved = asyncio.run(login())
    assert approved - start < 7, approved - start  # the person was in time
    assert stack.protected(token)[0] == 200
    polls = stack.polls(code["device_code"])
    assert [p["answer"] for p in polls] == ["authorization_pending", "token"], polls
    assert 6.8 <= polls[-1]["t"] - start < 8.2, polls[-1]["t"] - start


@pytest.mark.timeout(60)
def test_a_device_code_that_expires_is_not_our_timeout(client_module, make_stack, store):
    stack = make_stack(device_ttl=3)
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=30, interactive=False)

    async def wait() -> tuple[dict[str, Any], BaseException, float]:
        code = await flow.get_device_code()
        start = time.monotonic()
        with pytest.raises(client_module.AuthError) as info:
            await flow.poll(code["device_code"], code["interval"])
        return code, info.value, time.monotonic() - start

    code, error, waited = asyncio.run(wait())
    assert waited < 5, waited
    assert error.error == "expired_token", (error.message, error.detail)
    assert "expired" in error.message and "start the login again" in error.message
    assert "timeout" not in error.message
    assert stack.polls(code["device_code"])  # it polled up to the end


@pytest.mark.timeout(60)
def test_our_timeout_names_timeout(client_module, stack, store):
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=2, interactive=False)

    async def wait() -> BaseException:
        code = await flow.get_device_code()
        with pytest.raises(client_module.AuthError) as info:
            await flow.poll(code["device_code"], code["interval"])
        return info.value

    error = asyncio.run(wait())
    assert error.error == "timeout"
    assert error.status_code == 408
    assert "timeout of 2 s" in error.message and "timeout=" in error.message
    assert "expired" not in error.message


@pytest.mark.timeout(90)
def test_a_device_grant_refused_after_approval_falls_back_to_the_code_flow(
    client_module, stack, store, browser, capfd
):
    reset_grants(stack)
    token = client_module.authenticate(stack.issuer, client_id=NO_DEVICE_CLIENT_ID,
                                       store=store, timeout=30)
    assert stack.protected(token)[0] == 200

    browser.wait_done(count=2)
    assert not browser.errors(), browser.events()
    assert browser.events("approved")  # the person approved the device login first
    assert browser.events("callback")  # and then went through the code flow
    seen = [(g["grant"], g["client"]) for g in grants(stack)]
    assert seen[-1] == ("authorization_code", NO_DEVICE_CLIENT_ID), seen
    assert set(seen[:-1]) == {(DEVICE_GRANT, NO_DEVICE_CLIENT_ID)}, seen
    assert stack.polls()[-1]["answer"] == "unauthorized_client"
    told = capfd.readouterr().err
    assert "device login was refused" in told and "unauthorized_client" in told, told
    key = client_module._store_key(stack.issuer, NO_DEVICE_CLIENT_ID)
    assert store.get(key) == token


@pytest.mark.timeout(60)
def test_an_explicit_device_flow_with_that_client_says_why_it_failed(
    client_module, stack, store, person
):
    flow = client_module.DeviceFlow(stack.issuer, client_id=NO_DEVICE_CLIENT_ID, store=store,
                                    timeout=30, interactive=False)

    async def login() -> BaseException:
        code = await flow.get_device_code()
        await asyncio.to_thread(person.approve_device, code["uri"])
        with pytest.raises(client_module.AuthError) as info:
            await flow.poll(code["device_code"], code["interval"])
        return info.value

    error = asyncio.run(login())
    assert error.error == "unauthorized_client"
    assert "may not use the device flow" in error.message
    assert urllib.parse.urlsplit(stack.issuer).netloc in error.message


@pytest.mark.timeout(60)
def test_authenticate_counts_an_approval_made_just_before_its_timeout(
    client_module, make_stack, store, browser
):
    # The whole login has 7 s; polls every 5 s: at 5 s (pending) and at the 7-s deadline.
    stack = make_stack(device_interval=None)
    browser.set(delay=5.3)
    start = time.time()
    token = client_module.authenticate(stack.host, store=store, timeout=7)
    assert stack.protected(token)[0] == 200
    approved = browser.events("approved")
    assert approved and approved[0]["t"] - start < 7, browser.events()
    assert time.time() - start < 8.5
