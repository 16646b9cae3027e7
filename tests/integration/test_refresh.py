"""Real expiry and refresh, with and without rotation; dead refresh tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.integration

SHORT = 4  # seconds: the access token lifetime of these stacks


def _paths(requests):
    return [(r["method"], r["path"]) for r in requests]


@pytest.mark.timeout(90)
def test_expired_token_is_refreshed_and_the_rotated_refresh_token_stored(
    client_module, make_stack, store, browser, expire
):
    stack = make_stack(access_ttl=SHORT)
    first = client_module.authenticate(stack.host, store=store, timeout=30)
    assert first["expires"] - time.time() <= SHORT + 1
    assert browser.launches() == 1

    expire(first)
    stack.reset_requests()
    second = client_module.authenticate(stack.host, store=store, timeout=30)
    assert _paths(stack.requests()) == [("POST", "/auth/v2/token")]  # one refresh, no login
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]  # rotated...
    assert store.get(stack.host)["refresh_token"] == second["refresh_token"]  # ...and stored
    assert stack.protected(second)[0] == 200

    # The stored, rotated refresh token is the one that works next time.
    expire(second)
    third = client_module.authenticate(stack.host, store=store, timeout=30)
    assert third["access_token"] != second["access_token"]
    assert third["refresh_token"] not in (first["refresh_token"], second["refresh_token"])
    assert stack.protected(third)[0] == 200
    assert browser.launches() == 1  # never a browser again


@pytest.mark.timeout(90)
def test_without_rotation_the_old_refresh_token_is_kept_and_still_works(
    client_module, make_stack, store, browser, expire
):
    stack = make_stack(access_ttl=SHORT, rotate=False)
    first = client_module.authenticate(stack.host, store=store, timeout=30)

    expire(first)
    stack.reset_requests()
    second = client_module.authenticate(stack.host, store=store, timeout=30)
    assert _paths(stack.requests()) == [("POST", "/auth/v2/token")]
    assert second["access_token"] != first["access_token"]
    # The app answered refresh_token: null (and an invented refresh_expires).
    assert second["refresh_token"] == first["refresh_token"]
    assert second["refresh_expires"] == first["refresh_expires"]
    assert store.get(stack.host)["refresh_token"] == first["refresh_token"]
    assert stack.protected(second)[0] == 200

    expire(second)
    third = client_module.authenticate(stack.host, store=store, timeout=30)
    assert third["access_token"] != second["access_token"]
    assert third["refresh_token"] == first["refresh_token"]
    assert stack.protected(third)[0] == 200

    # The explicit API does the same.
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=30)
    fourth = asyncio.run(flow.refresh(first["refresh_token"]))
    assert fourth["refresh_token"] == first["refresh_token"]
    assert stack.protected(fourth)[0] == 200
    assert browser.launches() == 1


@pytest.mark.timeout(90)
def test_revoked_refresh_token_falls_back_to_a_new_login(
    client_module, make_stack, store, browser, expire
):
    stack = make_stack(access_ttl=SHORT)
    first = client_module.authenticate(stack.host, store=store, timeout=30)
    stack.revoke(first["refresh_token"])

    expire(first)
    stack.reset_requests()
    second = client_module.authenticate(stack.host, store=store, timeout=30)
    paths = _paths(stack.requests())
    assert paths[0] == ("POST", "/auth/v2/token")  # the refused refresh
    assert ("POST", "/auth/v2/device") in paths  # then a new device login
    assert browser.launches() == 2
    assert second["refresh_token"] != first["refresh_token"]
    assert stack.protected(second)[0] == 200
    assert store.get(stack.host)["access_token"] == second["access_token"]


@pytest.mark.timeout(90)
def test_revoked_refresh_token_in_a_batch_job_fails_promptly(
    client_module, make_stack, store, browser, expire, monkeypatch
):
    stack = make_stack(access_ttl=SHORT)
    first = client_module.authenticate(stack.host, store=store, timeout=30)
    stack.revoke(first["refresh_token"])
    expire(first)

    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # BROWSER stays set: the batch job wins
    stack.reset_requests()
    start = time.monotonic()
    with pytest.raises(client_module.AuthError) as info:
        client_module.authenticate(stack.host, store=store, timeout=30)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "Traceback" not in message
    assert "slurm" in message.lower() or "batch" in message.lower(), message
    assert "OIDC_TOKEN_FILE" in message, message
    assert browser.launches() == 1
    assert ("POST", "/auth/v2/device") not in _paths(stack.requests())


@pytest.mark.timeout(30)
def test_no_cache_in_a_batch_job_fails_at_once(
    client_module, stack, store, browser, monkeypatch
):
    monkeypatch.setenv("PBS_JOBID", "17.server")
    start = time.monotonic()
    with pytest.raises(client_module.AuthError) as info:
        client_module.authenticate(stack.host, store=store, timeout=30)
    assert time.monotonic() - start < 2
    assert "OIDC_TOKEN_FILE" in str(info.value)
    assert stack.requests() == []
    assert browser.launches() == 0
