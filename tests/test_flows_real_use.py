"""The login flows against local providers that bend the rules, as real ones do.

The last poll at the deadline, "code expired" against "our timeout", a device code
granted and then refused at the token endpoint, a dead refresh token refused with a
bare 400 or 401, and a device endpoint's refusal carried into the code flow's error.
"""

from __future__ import annotations

import asyncio
import time
import webbrowser
from typing import Any

import pytest

from conftest import (
    DEVICE,
    LOGIN,
    TOKEN,
    device_answer,
    oauth_error,
    redirect_to_provider,
    token_answer,
)
from tests import oac

WELL_KNOWN = "/.well-known/openid-configuration"


def device_flow(fake: Any, store: oac.TokenStore, **kwargs: Any) -> oac.DeviceFlow:
    return oac.DeviceFlow(fake.url, store=store, interactive=False, **kwargs)


async def device_login(flow: oac.DeviceFlow) -> oac.Token:
    code = await flow.get_device_code()
    return await flow.poll(code["device_code"], code["interval"])


def approved_after(seconds: float) -> Any:
    """A token route that answers authorization_pending until *seconds* from now."""
    approved = time.monotonic() + seconds

    def answer(req: Any) -> tuple[int, dict[str, str], Any]:
        if time.monotonic() < approved:
            return 400, {}, oauth_error("authorization_pending")
        return 200, {}, token_answer()

    return answer


def by_grant(**answers: tuple[int, Any]) -> Any:
    """A token route that answers per grant_type ("device-code" as device_code, ...)."""
    def answer(req: Any) -> tuple[int, dict[str, str], Any]:
        grant = req.form.get("grant_type", "").replace("-", "_")
        grant = grant.rsplit(":", 1)[-1]  # urn:ietf:params:oauth:grant-type:device_code
        status, body = answers[grant]
        return status, {}, body() if callable(body) else body

    return answer


def expired(make_token: Any, store: oac.TokenStore, host: str) -> oac.Token:
    """An entry whose access token has expired and whose refresh token is still good."""
    token = make_token(lifetime=-10)
    store.put(host, token)
    return token


@pytest.fixture
def nobody_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """BROWSER is a program that opens nothing: a login is allowed, nobody completes it."""
    monkeypatch.setenv("BROWSER", "true")
    monkeypatch.setattr(webbrowser, "_tryorder", None, raising=False)


# ---------------------------------------------------------------------------
# 1. The last poll is made at the deadline
# ---------------------------------------------------------------------------


@pytest.mark.timeout(15)
def test_an_interval_longer_than_the_timeout_still_polls_once_at_the_deadline(
    fake_server, tmp_store
):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=4))
    fake_server.reply("POST", TOKEN, 200, token_answer())  # approved before the deadline
    start = time.monotonic()
    token = asyncio.run(device_login(device_flow(fake_server, tmp_store, timeout=2)))
    (poll,) = fake_server.hits(TOKEN)
    assert 1.9 <= poll.time - start < 2.8, poll.time - start
    assert tmp_store.get(fake_server.url) == token


@pytest.mark.timeout(15)
def test_an_approval_between_the_last_interval_and_the_deadline_counts(fake_server, tmp_store):
    # Polls at 2 s (pending) and, as the next would be at 4 s, at the 3-s deadline.
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=2))
    fake_server.reply("POST", TOKEN, 200, approved_after(2.5))
    start = time.monotonic()
    token = asyncio.run(device_login(device_flow(fake_server, tmp_store, timeout=3)))
    times = [p.time - start for p in fake_server.hits(TOKEN)]
    assert len(times) == 2, times
    assert 2.9 <= times[1] < 3.8, times
    assert token["refresh_token"]


@pytest.mark.timeout(15)
def test_the_last_poll_is_made_within_authenticates_time_limit(fake_server, tmp_store,
                                                               nobody_opens):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=4))
    fake_server.reply("POST", TOKEN, 200, approved_after(1.5))
    start = time.monotonic()
    token = oac.authenticate(fake_server.url, store=tmp_store, timeout=2)
    assert time.monotonic() - start < 3.5
    assert len(fake_server.hits(TOKEN)) == 1
    assert tmp_store.get(fake_server.url) == token


# ---------------------------------------------------------------------------
# 3. "The code expired" is not "our timeout"
# ---------------------------------------------------------------------------


@pytest.mark.timeout(15)
def test_a_device_code_that_expires_says_so_and_to_start_again(fake_server, tmp_store):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1, expires_in=2))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_login(device_flow(fake_server, tmp_store, timeout=30)))
    assert info.value.error == "expired_token"
    assert "expired" in info.value.message and "start the login again" in info.value.message
    assert "timeout" not in info.value.message
    assert "Gave up" not in info.value.message


@pytest.mark.timeout(15)
def test_our_timeout_names_the_option_that_gives_more_time(fake_server, tmp_store):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1, expires_in=600))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_login(device_flow(fake_server, tmp_store, timeout=2)))
    assert info.value.error == "timeout"
    assert info.value.status_code == 408
    assert "timeout of 2 s" in info.value.message
    assert "timeout=" in info.value.message
    assert "expired" not in info.value.message


@pytest.mark.timeout(15)
def test_authenticates_timeout_is_the_whole_logins(fake_server, tmp_store, nobody_opens):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store, timeout=2)
    assert info.value.error == "timeout"
    assert "timeout of 2 s" in info.value.message and "timeout=" in info.value.message


# ---------------------------------------------------------------------------
# 2. A device code granted, then refused at the token endpoint
# ---------------------------------------------------------------------------


def refusing_provider(fake: Any, error: str, wrapped: bool) -> None:
    """A py-oidc-auth server whose provider refuses the device grant only when polled."""
    refusal = (oauth_error(error) if wrapped
               else {"error": error, "error_description": "not for this client"})
    fake.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake.reply("POST", TOKEN, 200, by_grant(device_code=(400, refusal),
                                            authorization_code=(200, token_answer)))
    fake.reply("GET", LOGIN, 307, redirect_to_provider(fake))


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("error", "wrapped"), [("unauthorized_client", True),
                                                ("unauthorized_client", False),
                                                ("unsupported_grant_type", False)])
def test_a_device_grant_refused_when_polled_falls_back_to_the_code_flow(
    fake_server, tmp_store, browser, capsys, error, wrapped
):
    refusing_provider(fake_server, error, wrapped)
    token = oac.authenticate(fake_server.url, store=tmp_store, timeout=10)

    grants = [r.form["grant_type"] for r in fake_server.hits(TOKEN)]
    assert grants == ["device-code", "authorization_code"]
    assert tmp_store.get(fake_server.url) == token
    told = capsys.readouterr().err
    assert "device login was refused" in told and error in told, told
    assert "browser login instead" in told


@pytest.mark.timeout(20)
def test_an_explicit_device_flow_does_not_fall_back(fake_server, tmp_store):
    refusing_provider(fake_server, "unauthorized_client", True)
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_login(device_flow(fake_server, tmp_store, timeout=10)))
    assert info.value.error == "unauthorized_client"
    assert "may not use the device flow" in info.value.message
    assert fake_server.hits(LOGIN) == []


# ---------------------------------------------------------------------------
# 5. A dead refresh token refused with a bare 400 or 401
# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("status", [400, 401])
@pytest.mark.parametrize("body", [b"", b"<html><body>Bad Request</body></html>"],
                         ids=["empty", "html"])
def test_a_bare_refusal_of_the_refresh_token_starts_a_new_login(
    fake_server, tmp_store, make_token, nobody_opens, status, body
):
    old = expired(make_token, tmp_store, fake_server.url)
    fresh = token_answer(refresh="refresh-2")
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 200, by_grant(refresh_token=(status, body),
                                                   device_code=(200, fresh)))
    token = oac.authenticate(fake_server.url, store=tmp_store, timeout=10)

    grants = [r.form["grant_type"] for r in fake_server.hits(TOKEN)]
    assert grants == ["refresh-token", "device-code"]
    assert token["access_token"] == fresh["access_token"] != old["access_token"]
    assert tmp_store.get(fake_server.url)["refresh_token"] == "refresh-2"


@pytest.mark.timeout(20)
def test_a_bare_refusal_where_nobody_can_log_in_says_how_to_log_in(
    fake_server, tmp_store, make_token
):
    expired(make_token, tmp_store, fake_server.url)
    fake_server.reply("POST", TOKEN, 400, b"")
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store, timeout=10)
    assert info.value.error == "login_required"
    assert "Not logged in" in info.value.message
    assert "no OAuth error" not in info.value.message
    assert tmp_store.get(fake_server.url) is None  # the dead refresh token is forgotten
    assert fake_server.hits(DEVICE) == []


@pytest.mark.timeout(20)
def test_a_refresh_refused_for_the_client_is_still_an_error(fake_server, tmp_store,
                                                            make_token):
    # invalid_client is about the client, not the refresh token: keep the token, say so.
    expired(make_token, tmp_store, fake_server.url)
    fake_server.reply("POST", TOKEN, 401, {"error": "invalid_client"})
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store, timeout=10)
    assert info.value.error == "invalid_client"
    assert tmp_store.get(fake_server.url) is not None


# ---------------------------------------------------------------------------
# 6. The device endpoint's refusal reaches the code flow's final error
# ---------------------------------------------------------------------------


def provider_refusing_the_device_flow(fake: Any) -> None:
    """A standard provider: the device endpoint refuses the client, no redirect ever."""
    meta = {"issuer": fake.url, "authorization_endpoint": f"{fake.url}/authorize",
            "token_endpoint": f"{fake.url}/token",
            "device_authorization_endpoint": f"{fake.url}/device",
            "jwks_uri": f"{fake.url}/jwks", "scopes_supported": ["openid", "offline_access"]}
    fake.reply("GET", WELL_KNOWN, 200, meta)
    fake.reply("POST", "/device", 403, {"error": "unauthorized_client",
                                        "error_description": "client not allowed\x1b[31m"})
    fake.reply("GET", "/authorize", 200, "<html>Error: unknown client</html>")


@pytest.fixture
def no_cached_documents():
    oac._FETCHED.clear()
    yield
    oac._FETCHED.clear()


@pytest.mark.timeout(20)
def test_the_device_endpoints_refusal_is_in_the_code_flows_final_error(
    fake_server, tmp_store, nobody_opens, no_cached_documents, capsys
):
    provider_refusing_the_device_flow(fake_server)
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, client_id="cli", store=tmp_store, timeout=2)
    message = info.value.message
    assert info.value.error == "timeout"
    assert info.value.status_code == 408
    assert info.value.detail["device_error"] == "unauthorized_client"
    assert "timeout of 2 s" in message
    assert "device login was refused" in message
    assert "403: unauthorized_client: client not allowed" in message
    assert "client id" in message
    assert "\x1b" not in message
    told = capsys.readouterr().err
    assert "device login was refused" in told and "browser login instead" in told


@pytest.mark.timeout(20)
def test_a_server_without_the_device_flow_falls_back_without_a_word(
    fake_server, tmp_store, nobody_opens, capsys
):
    fake_server.reply("GET", LOGIN, 307, redirect_to_provider(fake_server))
    with pytest.raises(oac.AuthError) as info:  # 404 at the device route; nobody logs in
        oac.authenticate(fake_server.url, store=tmp_store, timeout=2)
    assert info.value.error == "timeout"
    assert "device" not in info.value.message
    assert "refused" not in capsys.readouterr().err

