"""A standard OpenID provider, directly: the client talks to oidc-provider with no
py-oidc-auth server in between.

The provider is the stack's own (``tests/stack/provider.mjs``) and its two clients:
the public ``py-oidc-auth-public`` and the confidential ``py-oidc-auth`` (HTTP Basic).
The py-oidc-auth app of the stack is only used as a resource server that checks the
access tokens; the client never calls it here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.integration.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    PUBLIC_CLIENT_ID,
    call,
    refresh_at_provider,
)

pytestmark = pytest.mark.integration

SHORT = 4  # seconds: the access token lifetime of the refresh stack


def grants(stack: Any) -> list[dict[str, Any]]:
    """Every token endpoint request the provider saw (test-only route)."""
    status, body = call("GET", f"{stack.issuer}/__test/grants")
    assert status == 200, body
    return list(body)


def reset_grants(stack: Any) -> None:
    call("DELETE", f"{stack.issuer}/__test/grants")


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()[:12]


def claims_of(jwt: str) -> dict[str, Any]:
    part = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


@pytest.fixture(autouse=True)
def fresh_discovery(client_module):
    """Each test fetches the provider's documents itself (stacks are reused)."""
    client_module._FETCHED.clear()
    yield
    client_module._FETCHED.clear()


# -- device flow -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_device_flow_with_a_public_client(client_module, stack, store, browser):
    reset_grants(stack)
    token = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                       timeout=30)
    assert token["refresh_token"]
    assert token["headers"] == {"Authorization": f"Bearer {token['access_token']}"}
    status, claims = stack.protected(token)  # a real resource server accepts it
    assert status == 200, claims
    assert claims["sub"] == "alice"
    assert claims["client_id"] == PUBLIC_CLIENT_ID

    events = browser.wait_done()
    assert not browser.errors(), events
    assert browser.events("approved")
    assert [g["grant"] for g in grants(stack)][-1] == "urn:ietf:params:oauth:grant-type:device_code"
    assert {g["client"] for g in grants(stack)} == {PUBLIC_CLIENT_ID}
    # The py-oidc-auth app only saw the resource request above, no login.
    assert [r["path"] for r in stack.requests()] == ["/protected"]

    key = f"{stack.issuer}#client_id={PUBLIC_CLIENT_ID}&scope=offline_access+openid"
    assert store.hosts() == [key]
    assert store.get(key)["access_token"] == token["access_token"]
    # Cached: no request at all the second time, also through the key as the host.
    reset_grants(stack)
    again = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store)
    assert again == token
    assert client_module.DeviceFlow(key, store=store).token == token
    assert grants(stack) == []


@pytest.mark.timeout(60)
def test_device_flow_step_by_step_approved_by_the_person(client_module, stack, store, person):
    flow = client_module.DeviceFlow(stack.issuer, client_id=PUBLIC_CLIENT_ID,
                                    scopes=["openid", "profile"], store=store, timeout=30)

    async def login():
        code = await flow.get_device_code()
        assert code["interval"] == 1  # the stack's provider announces 1 s
        approval = asyncio.get_running_loop().run_in_executor(
            None, lambda: person.approve_device(code["uri"]))
        token = await flow.poll(code["device_code"], code["interval"])
        await approval
        return token

    token = asyncio.run(login())
    assert set(token["scope"].split()) >= {"openid", "profile"}
    assert "offline_access" not in token["scope"].split()  # not asked for
    assert store.hosts() == [f"{stack.issuer}#client_id={PUBLIC_CLIENT_ID}&scope=openid+profile"]
    assert stack.protected(token)[0] == 200


# -- code flow -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_code_flow_through_the_browser(client_module, stack, store, browser, redirect_port):
    reset_grants(stack)
    flow = client_module.CodeFlow(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                  redirect_ports=[redirect_port], timeout=30)
    token = asyncio.run(flow.authenticate())
    assert stack.protected(token)[0] == 200
    assert token["refresh_token"]

    events = browser.wait_done()
    assert not browser.errors(), events
    callback = browser.events("callback")[0]
    assert callback["port"] == redirect_port
    assert callback["status"] == 200
    assert callback["params"] == ["code", "iss", "state"]  # RFC 9207: iss, and it was checked
    exchanges = [g for g in grants(stack) if g["grant"] == "authorization_code"]
    assert [g["code"] for g in exchanges] == [code_hash(callback["code"])]
    assert flow.token == token
    # The loopback redirect is the IP literal (RFC 8252, 7.3), and the provider URL the
    # browser was sent to carried the challenge, never the verifier.
    # The browser starts at the receiver's one-time entry page (an unguessable path).
    opened = browser.events("open")[0]["url"]
    assert opened.startswith(f"http://127.0.0.1:{redirect_port}/")
    assert len(opened) > len(f"http://127.0.0.1:{redirect_port}/") + 40


@pytest.mark.timeout(90)
def test_provider_without_device_flow_falls_back_to_the_code_flow(
    client_module, make_stack, store, browser
):
    stack = make_stack(device=False)
    status, meta = call("GET", f"{stack.issuer}/.well-known/openid-configuration")
    assert status == 200 and "device_authorization_endpoint" not in meta
    reset_grants(stack)
    token = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                       timeout=30)
    assert stack.protected(token)[0] == 200
    browser.wait_done()
    assert not browser.errors()
    assert browser.events("callback")  # the browser went through the code flow
    assert [g["grant"] for g in grants(stack)] == ["authorization_code"]


@pytest.mark.timeout(60)
def test_callback_with_wrong_state_is_refused_and_its_code_never_exchanged(
    client_module, stack, store, browser, redirect_port
):
    browser.set(tamper="state")
    reset_grants(stack)
    flow = client_module.CodeFlow(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                  redirect_ports=[redirect_port], timeout=5)
    with pytest.raises(client_module.AuthError) as info:
        asyncio.run(flow.authenticate())
    assert info.value.status_code == 408  # it kept waiting for its own callback
    events = browser.wait_done()
    callback = browser.events("callback")
    assert callback and callback[0]["tampered"], events
    assert callback[0]["status"] == 400
    assert grants(stack) == []
    assert store.hosts() == []


@pytest.mark.timeout(60)
def test_callback_from_another_issuer_is_refused_at_once(
    client_module, stack, store, browser, redirect_port
):
    browser.set(tamper="iss")
    reset_grants(stack)
    flow = client_module.CodeFlow(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                  redirect_ports=[redirect_port], timeout=30)
    start = time.monotonic()
    with pytest.raises(client_module.AuthError) as info:
        asyncio.run(flow.authenticate())
    assert time.monotonic() - start < 10
    assert "invalid_issuer" in info.value.message
    assert stack.issuer in info.value.message
    events = browser.wait_done()
    callback = browser.events("callback")
    assert callback and callback[0]["tampered"] and callback[0]["status"] == 400, events
    assert grants(stack) == []  # the code was never exchanged
    assert store.hosts() == []


@pytest.mark.timeout(60)
def test_id_token_with_another_nonce_is_refused(
    client_module, stack, store, browser, redirect_port
):
    browser.set(tamper="nonce")
    reset_grants(stack)
    flow = client_module.CodeFlow(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                  redirect_ports=[redirect_port], timeout=30)
    with pytest.raises(client_module.AuthError) as info:
        asyncio.run(flow.authenticate())
    assert "nonce" in info.value.message
    assert info.value.error == "invalid_id_token"
    browser.wait_done()
    assert browser.events("callback")[0]["status"] == 200  # the callback itself was fine
    # The code was exchanged (the ID token comes from there) and the answer thrown away.
    assert [g["grant"] for g in grants(stack)] == ["authorization_code"]
    assert store.hosts() == []


# -- refresh, revocation, logout -------------------------------------------------------


@pytest.mark.timeout(90)
def test_refresh_after_real_expiry_keeps_the_scopes(
    client_module, make_stack, store, browser, expire
):
    stack = make_stack(access_ttl=SHORT)
    scopes = ["openid", "profile", "email", "offline_access"]
    first = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID, scopes=scopes,
                                       store=store, timeout=30)
    assert first["expires"] - time.time() <= SHORT + 1
    expire(first)
    reset_grants(stack)
    second = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID,
                                        scopes=scopes, store=store, timeout=30)
    assert [g["grant"] for g in grants(stack)] == ["refresh_token"]  # one refresh, no login
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]  # rotated and stored
    assert set(second["scope"].split()) == set(first["scope"].split())
    assert {"openid", "profile", "email"} <= set(second["scope"].split())
    assert stack.protected(second)[0] == 200
    key = client_module._store_key(stack.issuer, PUBLIC_CLIENT_ID, scopes)
    assert store.get(key)["refresh_token"] == second["refresh_token"]
    assert browser.launches() == 1


@pytest.mark.timeout(90)
def test_logout_revokes_at_the_provider_and_forgets_locally(
    client_module, stack, store, browser
):
    token = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                       timeout=30)
    flow = client_module.DeviceFlow(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store)
    url = asyncio.run(flow.logout())
    assert store.hosts() == []
    # The provider now refuses the revoked refresh token.
    status, body = refresh_at_provider(stack, token["refresh_token"])
    assert status == 400 and body["error"] == "invalid_grant", body
    # Browser logout: the end-session endpoint with the client and the ID token hint.
    parts = urllib.parse.urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{stack.issuer}/session/end"
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert query["client_id"] == PUBLIC_CLIENT_ID
    hint = claims_of(query["id_token_hint"])
    assert (hint["iss"], hint["aud"], hint["sub"]) == (stack.issuer, PUBLIC_CLIENT_ID, "alice")


@pytest.mark.timeout(90)
def test_revoke_reports_what_the_server_revoked(client_module, stack, store, browser):
    token = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                       timeout=30)
    flow = client_module.DeviceFlow(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store)
    assert asyncio.run(flow._sign_out(token)) is True
    assert refresh_at_provider(stack, token["refresh_token"])[0] == 400
    # py-oidc-auth mode revokes nothing.
    assert asyncio.run(client_module.DeviceFlow(stack.host, store=store)._sign_out(token)) is False


# -- confidential client, several clients, CLI ------------------------------------------


@pytest.mark.timeout(90)
def test_confidential_client_with_secret_device_refresh_and_revoke(
    client_module, stack, store, browser
):
    reset_grants(stack)
    token = client_module.authenticate(stack.issuer, client_id=CLIENT_ID,
                                       client_secret=CLIENT_SECRET, store=store, timeout=30)
    status, claims = stack.protected(token)
    assert status == 200, claims
    assert claims["client_id"] == CLIENT_ID
    flow = client_module.DeviceFlow(stack.issuer, client_id=CLIENT_ID,
                                    client_secret=CLIENT_SECRET, store=store, timeout=30)
    refreshed = asyncio.run(flow.refresh(token["refresh_token"]))
    assert stack.protected(refreshed)[0] == 200
    assert {g["client"] for g in grants(stack)} == {CLIENT_ID}  # via HTTP Basic
    asyncio.run(flow.logout())  # revokes the refreshed token, stored by the refresh
    assert refresh_at_provider(stack, refreshed["refresh_token"], confidential=True)[0] == 400

    # Without the secret the provider refuses the client.
    public_try = client_module.DeviceFlow(stack.issuer, client_id=CLIENT_ID, store=store,
                                          timeout=30)
    with pytest.raises(client_module.AuthError) as info:
        asyncio.run(public_try.get_device_code())
    assert info.value.error == "invalid_client"
    assert CLIENT_SECRET not in str(info.value)


@pytest.mark.timeout(120)
def test_two_clients_of_one_provider_keep_separate_tokens(client_module, stack, store, browser):
    public = client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID, store=store,
                                        timeout=30)
    confidential = client_module.authenticate(stack.issuer, client_id=CLIENT_ID,
                                              client_secret=CLIENT_SECRET, store=store,
                                              timeout=30)
    assert public["access_token"] != confidential["access_token"]
    assert len(store.hosts()) == 2
    assert client_module.authenticate(stack.issuer, client_id=PUBLIC_CLIENT_ID,
                                      store=store) == public
    assert client_module.authenticate(stack.issuer, client_id=CLIENT_ID, store=store,
                                      client_secret=CLIENT_SECRET) == confidential
    assert browser.launches() == 2


@pytest.mark.timeout(120)
def test_cli_client_id_scope_list_and_remove(stack, browser, run_cli):
    done = run_cli(stack.issuer, "--client-id", PUBLIC_CLIENT_ID, "--scope", "openid profile",
                   "--json")
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)
    assert stack.protected(token)[0] == 200
    assert token["access_token"] not in done.stderr

    listed = run_cli("--list")
    assert listed.returncode == 0, listed.stderr
    key = f"{stack.issuer}#client_id={PUBLIC_CLIENT_ID}&scope=openid+profile"
    assert listed.stdout.startswith(shlex.quote(key) + "\taccess valid for ")
    assert shlex.split(listed.stdout.split("\t")[0]) == [key]  # pastes into a shell

    cached = run_cli(key, "--json")  # the listed key names the client and scopes
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout) == token

    secret = run_cli(stack.issuer, "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET)
    assert secret.returncode == 0, secret.stderr
    assert "Logged in to " in secret.stdout

    removed = run_cli("--remove", stack.issuer, "--client-id", PUBLIC_CLIENT_ID,
                      "--scope", "profile", "--scope", "openid")
    assert removed.returncode == 0, removed.stderr
    listed = run_cli("--list")
    assert key not in listed.stdout
    assert f"client_id={CLIENT_ID}&" in listed.stdout
