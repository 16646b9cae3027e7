"""Routes under a prefix, and a public (secret-less) OAuth client behind the app."""

from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.integration

PREFIX = "/api/v1"


def _paths(requests):
    return [(r["method"], r["path"]) for r in requests]


@pytest.mark.timeout(60)
def test_prefixed_routes_given_as_route_arguments(client_module, make_stack, store, browser):
    stack = make_stack(prefix=PREFIX)
    token = client_module.authenticate(stack.url, store=store, timeout=30, **stack.routes)
    assert stack.protected(token)[0] == 200
    assert _paths(stack.requests())[:2] == [
        ("POST", f"{PREFIX}/auth/v2/device"), ("POST", f"{PREFIX}/auth/v2/token"),
    ]
    assert store.get(stack.url)["access_token"] == token["access_token"]


@pytest.mark.timeout(60)
def test_prefixed_routes_under_a_host_with_a_path(client_module, make_stack, store, browser):
    stack = make_stack(prefix=PREFIX)
    assert stack.host.endswith(PREFIX)
    token = client_module.authenticate(stack.host, store=store, timeout=30)
    assert stack.protected(token)[0] == 200
    assert ("POST", f"{PREFIX}/auth/v2/device") in _paths(stack.requests())


@pytest.mark.timeout(60)
def test_prefixed_code_flow(client_module, make_stack, store, browser, redirect_port):
    stack = make_stack(prefix=PREFIX)
    flow = client_module.CodeFlow(stack.url, store=store, redirect_ports=[redirect_port],
                                  timeout=30, **stack.routes)
    token = asyncio.run(flow.authenticate())
    assert stack.protected(token)[0] == 200
    assert _paths(stack.requests())[:2] == [
        ("GET", f"{PREFIX}/auth/v2/login"), ("POST", f"{PREFIX}/auth/v2/token"),
    ]


@pytest.mark.timeout(90)
def test_public_client_device_flow_refresh_and_code_flow(
    client_module, make_stack, store, browser, redirect_port
):
    stack = make_stack(public=True)
    token = client_module.authenticate(stack.host, store=store, timeout=30)
    status, claims = stack.protected(token)
    assert status == 200, claims
    assert claims["client_id"] == "py-oidc-auth-public"

    # A public client's refresh token: oidc-provider rotates it on use.
    flow = client_module.DeviceFlow(stack.host, store=store, timeout=30)
    refreshed = asyncio.run(flow.refresh(token["refresh_token"]))
    assert refreshed["access_token"] != token["access_token"]
    assert refreshed["refresh_token"]
    assert stack.protected(refreshed)[0] == 200
    assert store.get(stack.host)["refresh_token"] == refreshed["refresh_token"]

    code = client_module.CodeFlow(stack.host, store=store, redirect_ports=[redirect_port],
                                  timeout=30)
    by_code = asyncio.run(code.authenticate(force=True))
    assert stack.protected(by_code)[0] == 200
    browser.wait_done(2)
    assert not browser.errors()


@pytest.mark.timeout(90)
def test_cli_with_prefixed_routes(make_stack, browser, run_cli):
    stack = make_stack(prefix=PREFIX)
    done = run_cli(stack.url, "--json", "-l", f"{PREFIX}/auth/v2/login",
                   "-t", f"{PREFIX}/auth/v2/token", "-d", f"{PREFIX}/auth/v2/device")
    assert done.returncode == 0, done.stderr
    assert stack.protected(json.loads(done.stdout))[0] == 200
