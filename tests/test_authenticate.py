"""authenticate / authenticate_async: cache, refresh, device login, code flow, and the gates."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from itertools import count
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import (
    DEVICE,
    LOGIN,
    REPO,
    TOKEN,
    device_answer,
    free_port,
    make_jwt,
    oauth_error,
    redirect_to_provider,
    token_answer,
)
from tests import oac

PRELUDE = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport py_oidc_auth_client as oac\n"

def fresh_tokens() -> Callable[..., Any]:
    """A token route body that hands out a new token on every call."""
    numbers = count(1)

    def answer(req: Any) -> tuple[int, dict[str, str], Any]:
        return 200, {}, token_answer(refresh=f"refresh-{next(numbers) + 1}")

    return answer


def expired(make_token: Any) -> oac.Token:
    return make_token(lifetime=-10, refresh_lifetime=86400, refresh="refresh-1")


def assert_token(token: Any) -> None:
    assert isinstance(token, dict)
    assert token["access_token"]
    assert token["headers"] == {"Authorization": f"Bearer {token['access_token']}"}


# ---------------------------------------------------------------------------
# Cache and refresh
# ---------------------------------------------------------------------------


def test_cached_token_is_returned_without_a_request(fake_server, tmp_store, make_token):
    token = make_token()
    tmp_store.put(fake_server.url, token)
    assert oac.authenticate(fake_server.url, store=tmp_store) == token
    assert asyncio.run(oac.authenticate_async(fake_server.url, store=tmp_store)) == token
    assert fake_server.requests == []


def test_cached_token_in_the_default_store(fake_server, make_token):
    token = make_token()
    oac.TokenStore(app_name="py-oidc-auth").put(fake_server.url + "/", token)
    assert oac.authenticate(fake_server.url) == token
    assert fake_server.requests == []


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_expired_access_token_is_refreshed(fake_server, tmp_store, make_token, use_async):
    tmp_store.put(fake_server.url, expired(make_token))
    answer = token_answer(refresh="refresh-2")
    fake_server.reply("POST", TOKEN, 200, answer)
    if use_async:
        token = asyncio.run(oac.authenticate_async(fake_server.url, store=tmp_store))
    else:
        token = oac.authenticate(fake_server.url, store=tmp_store)
    (post,) = fake_server.requests
    assert (post.method, post.path) == ("POST", TOKEN)
    assert post.form["refresh-token"] == "refresh-1"
    assert token["access_token"] == answer["access_token"]
    assert tmp_store.get(fake_server.url) == token


def test_refresh_needs_nobody_at_the_keyboard(fake_server, tmp_store, make_token, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tmp_store.put(fake_server.url, expired(make_token))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    assert_token(oac.authenticate(fake_server.url, store=tmp_store))
    assert len(fake_server.requests) == 1


# ---------------------------------------------------------------------------
# Interactive logins
# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_device_login_when_nothing_is_cached(fake_server, tmp_store, browser, capsys, use_async):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    if use_async:
        token = asyncio.run(oac.authenticate_async(fake_server.url, store=tmp_store, timeout=15))
    else:
        token = oac.authenticate(fake_server.url, store=tmp_store, timeout=15)
    assert token["access_token"] == answer["access_token"]
    assert tmp_store.get(fake_server.url) == token
    assert [p.form["device-code"] for p in fake_server.hits(TOKEN)] == ["dev-123", "dev-123"]
    out, err = capsys.readouterr()
    assert out == ""
    assert "ABCD-EFGH" in err
    assert browser.opened() == ["https://idp.example/device?user_code=ABCD-EFGH"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("status", "detail"), [
    (404, "Not Found"),
    (405, "Method Not Allowed"),
    (501, "Not Implemented"),
    (503, "Service Unavailable"),
    (502, "OIDC endpoint 'device_authorization_endpoint' not found in discovery."),
])
def test_falls_back_to_the_code_flow_without_a_device_flow(
    fake_server, tmp_store, browser, status, detail
):
    # Retry-After: 0 keeps the retries of 502/503 cheap.
    fake_server.reply("POST", DEVICE, status, {"detail": detail}, {"Retry-After": "0"})
    fake_server.reply("GET", LOGIN, 307, redirect_to_provider(fake_server))
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    port = free_port()
    token = oac.authenticate(fake_server.url, store=tmp_store, redirect_ports=[port], timeout=15)

    assert token["access_token"] == answer["access_token"]
    assert tmp_store.get(fake_server.url) == token
    assert fake_server.hits(DEVICE)
    redirect_uri = f"http://localhost:{port}/callback"
    assert fake_server.hits(LOGIN)[0].query["redirect_uri"] == redirect_uri
    (post,) = fake_server.hits(TOKEN)
    assert post.form == {"code": "abc", "redirect_uri": redirect_uri,
                         "code_verifier": "verifier123", "grant_type": "authorization_code"}
    assert len(browser.opened()) == 1


@pytest.mark.timeout(20)
def test_a_device_flow_error_does_not_fall_back(fake_server, tmp_store, browser):
    fake_server.reply("POST", DEVICE, 400, oauth_error("invalid_client"))
    fake_server.reply("GET", LOGIN, 307, redirect_to_provider(fake_server))
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store)
    assert info.value.error == "invalid_client"
    assert fake_server.hits(LOGIN) == []


@pytest.mark.timeout(20)
def test_custom_routes_are_used(fake_server, tmp_store, browser):
    fake_server.reply("POST", "/api/dev", 200, device_answer(interval=1))
    fake_server.reply("POST", "/api/tok", 200, token_answer())
    token = oac.authenticate(fake_server.url, store=tmp_store, device_route="/api/dev",
                             token_route="/api/tok", login_route="/api/login")
    assert_token(token)
    assert [r.path for r in fake_server.requests] == ["/api/dev", "/api/tok"]


@pytest.mark.timeout(20)
def test_force_skips_the_cache(fake_server, tmp_store, make_token, browser):
    cached = make_token()
    tmp_store.put(fake_server.url, cached)
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    answer = token_answer(access_token=make_jwt(3600, jti="new"))
    fake_server.reply("POST", TOKEN, 200, answer)
    token = oac.authenticate(fake_server.url, store=tmp_store, force=True)
    assert token["access_token"] == answer["access_token"] != cached["access_token"]
    assert len(fake_server.hits(DEVICE)) == 1
    assert tmp_store.get(fake_server.url) == token


# ---------------------------------------------------------------------------
# Where nobody can log in
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("variable", "system"), [
    ("SLURM_JOB_ID", "Slurm"), ("PBS_JOBID", "PBS"), ("LSB_JOBID", "LSF"),
    ("OAR_JOB_ID", "OAR"), ("SGE_TASK_ID", "Grid Engine"),
])
def test_batch_job_without_a_token_gets_a_prompt_error(
    fake_server, tmp_store, browser, monkeypatch, variable, system
):
    monkeypatch.setenv(variable, "4242")
    fake_server.reply("POST", DEVICE, 200, device_answer())
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store)
    assert time.monotonic() - start < 2
    message = info.value.message
    assert system in message
    assert "OIDC_TOKEN_FILE" in message
    assert fake_server.url in message
    assert info.value.error == "login_required"
    assert info.value.status_code == 401
    assert fake_server.requests == []
    assert browser.opened(timeout=0) == []


NO_TERMINAL = """
try:
    oac.authenticate(sys.argv[1])
except oac.AuthError as exc:
    print(exc.message)
"""


@pytest.mark.timeout(20)
def test_no_terminal_and_no_browser_gets_a_prompt_error(fake_server):
    fake_server.reply("POST", DEVICE, 200, device_answer())
    proc = subprocess.run([sys.executable, "-c", PRELUDE + NO_TERMINAL, fake_server.url],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15,
                          cwd=REPO)
    assert "no terminal" in proc.stdout, proc.stderr
    assert "OIDC_TOKEN_FILE" in proc.stdout
    assert fake_server.requests == []


# ---------------------------------------------------------------------------
# OIDC_TOKEN_FILE
# ---------------------------------------------------------------------------


def write_token_file(path: Path, token: oac.Token, server: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"server": server, **token}, fh)


def test_token_file_is_used_without_a_prompt(
    fake_server, tmp_path, make_token, monkeypatch, capsys
):
    path = tmp_path / "token.json"
    token = make_token()
    write_token_file(path, token, fake_server.url)
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(path))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # how it is meant to be used
    assert oac.authenticate(fake_server.url) == token
    assert asyncio.run(oac.authenticate_async(fake_server.url)) == token
    assert fake_server.requests == []
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / "home" / ".cache" / "py-oidc-auth").exists()


def test_token_file_is_refreshed_in_place(fake_server, tmp_path, make_token, monkeypatch):
    path = tmp_path / "token.json"
    write_token_file(path, expired(make_token), fake_server.url)
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(path))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    answer = token_answer(refresh=None)
    fake_server.reply("POST", TOKEN, 200, answer)
    token = oac.authenticate(fake_server.url)
    assert token["access_token"] == answer["access_token"]
    assert fake_server.requests[0].form["refresh-token"] == "refresh-1"
    on_disk = json.loads(path.read_text())
    assert on_disk["access_token"] == answer["access_token"]  # one Token, not per host
    assert on_disk["refresh_token"] == "refresh-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The next call uses the file as refreshed: no second request.
    oac._STORES.clear()
    assert oac.authenticate(fake_server.url)["access_token"] == answer["access_token"]
    assert len(fake_server.requests) == 1


# ---------------------------------------------------------------------------
# Arguments, event loops, return values
# ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_later_calls_with_another_store_and_timeout_are_honoured(
    fake_server, tmp_path, browser
):
    first, second = oac.TokenStore(tmp_path / "a.json"), oac.TokenStore(tmp_path / "b.json")
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    oac.authenticate(fake_server.url, store=first, timeout=20)
    assert first.get(fake_server.url) is not None

    fake_server.routes[("POST", TOKEN)].clear()
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=second, timeout=2)
    assert 1.5 <= time.monotonic() - start < 4.5
    assert info.value.error == "timeout"
    assert second.get(fake_server.url) is None
    # ...and the first store still answers from its cache.
    before = len(fake_server.requests)
    assert_token(oac.authenticate(fake_server.url, store=first))
    assert len(fake_server.requests) == before


@pytest.mark.timeout(20)
def test_sync_authenticate_works_inside_a_running_event_loop(
    fake_server, tmp_store, make_token
):
    tmp_store.put(fake_server.url, expired(make_token))
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)

    async def notebook_cell() -> oac.Token:
        asyncio.get_running_loop()
        return oac.authenticate(fake_server.url, store=tmp_store)

    token = asyncio.run(notebook_cell())
    assert token["access_token"] == answer["access_token"]
    assert len(fake_server.requests) == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", ["cached", "refreshed", "device"])
def test_never_returns_none(fake_server, tmp_store, make_token, browser, case):
    if case == "cached":
        tmp_store.put(fake_server.url, make_token())
    elif case == "refreshed":
        tmp_store.put(fake_server.url, expired(make_token))
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    assert_token(oac.authenticate(fake_server.url, store=tmp_store))
    assert_token(asyncio.run(oac.authenticate_async(fake_server.url, store=tmp_store)))


@pytest.mark.timeout(30)
def test_concurrent_calls_with_different_stores_keep_their_own_store(
    fake_server, tmp_path, browser
):
    first, second = oac.TokenStore(tmp_path / "a.json"), oac.TokenStore(tmp_path / "b.json")
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 200, fresh_tokens())

    async def both() -> list[oac.Token]:
        return list(await asyncio.gather(
            oac.authenticate_async(fake_server.url, store=first, timeout=20),
            oac.authenticate_async(fake_server.url, store=second, timeout=20)))

    one, two = asyncio.run(both())
    assert first.get(fake_server.url) == one
    assert second.get(fake_server.url) == two


IMPORT_COST = """
import json
store = oac.TokenStore(sys.argv[2]) if sys.argv[2] != "-" else None
token = oac.authenticate(sys.argv[1], store=store)
heavy = ("asyncio", "urllib.request", "http.server", "webbrowser", "ssl")
print(json.dumps({"loaded": [m for m in heavy if m in sys.modules], "ok": bool(token)}))
"""


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["store", "default", "token-file"])
def test_a_cache_hit_loads_no_heavy_module(fake_server, tmp_store, make_token, tmp_path, where):
    env = dict(os.environ)
    store_arg = "-"
    if where == "store":
        tmp_store.put(fake_server.url, make_token())
        store_arg = tmp_store.path
    elif where == "default":
        oac.TokenStore(app_name="py-oidc-auth").put(fake_server.url, make_token())
    else:
        path = tmp_path / "token.json"
        write_token_file(path, make_token(), fake_server.url)
        env["OIDC_TOKEN_FILE"] = str(path)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + IMPORT_COST, fake_server.url, store_arg],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"loaded": [], "ok": True}
    assert fake_server.requests == []
