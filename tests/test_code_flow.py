"""CodeFlow: the fake server plays py-oidc-auth and the provider, a thread plays the user.

The "user" reads the login URL from the terminal (the flow's stderr), as a person
would, and only then opens the callback: the flow has set its expected state by
the time it prints that URL, so no test races the flow.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from itertools import count
from typing import Any, Callable
from urllib.parse import urlencode

import pytest

from conftest import (
    LOGIN,
    TOKEN,
    User,
    Visit,
    free_port,
    login,
    port_is_free,
    token_answer,
)
from tests import oac


def callback(code: str = "abc", **params: str) -> Visit:
    return lambda base, state: f"{base}?{urlencode({'code': code, 'state': state, **params})}"


def tampered(code: str = "evil") -> Visit:
    return lambda base, state: f"{base}?{urlencode({'code': code, 'state': state + 'x'})}"


def wrong_path() -> Visit:
    return lambda base, state: (base.replace("/callback", "/favicon.ico")
                                + "?" + urlencode({"code": "abc", "state": state}))


def provider_error(error: str = "access_denied") -> Visit:
    params = {"error": error, "error_description": "user said no"}
    return lambda base, state: f"{base}?{urlencode({**params, 'state': state})}"


_STATES = count()


def redirect_to_provider(fake: Any, verifier: str = "verifier123") -> Callable[..., Any]:
    """The login route: 307 to the provider, state = random|redirect_uri|verifier."""

    def answer(req: Any) -> tuple[int, dict[str, str], bytes]:
        redirect_uri = req.query["redirect_uri"]
        state = f"rnd{next(_STATES)}|{redirect_uri}|{verifier}"
        location = f"{fake.url}/authorize?" + urlencode({
            "client_id": "cli", "response_type": "code", "redirect_uri": redirect_uri,
            "state": state, "code_challenge": "challenge", "code_challenge_method": "S256"})
        return 307, {"Location": location}, b""

    return answer


def busy_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.fixture
def server(fake_server):
    """The fake server answering the login route with a redirect to the 'provider'."""
    fake_server.reply("GET", LOGIN, 307, redirect_to_provider(fake_server))
    return fake_server


def code_flow(fake: Any, store: oac.TokenStore, port: int = 0, **kwargs: Any) -> oac.CodeFlow:
    kwargs.setdefault("timeout", 10)
    kwargs.setdefault("redirect_ports", [port])
    return oac.CodeFlow(fake.url, store=store, **kwargs)


# ---------------------------------------------------------------------------
# Success
# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_login_exchanges_the_code_with_the_verifier_and_saves_the_token(
    server, tmp_store, terminal
):
    answer = token_answer()
    server.reply("POST", TOKEN, 200, answer)
    port = free_port()
    user = User(terminal, (callback("abc"),))
    token = login(code_flow(server, tmp_store, port), user)

    (hit,) = server.hits(LOGIN)
    redirect_uri = f"http://localhost:{port}/callback"
    assert hit.query == {"redirect_uri": redirect_uri, "offline_access": "true",
                         "prompt": "consent"}
    (post,) = server.hits(TOKEN)
    assert post.method == "POST"
    assert post.form == {"code": "abc", "redirect_uri": redirect_uri,
                         "code_verifier": "verifier123", "grant_type": "authorization_code"}
    assert token["access_token"] == answer["access_token"]
    assert tmp_store.get(server.url) == token
    assert server.hits("/authorize") == []  # the client never follows the redirect itself


@pytest.mark.timeout(20)
def test_success_page_is_html(server, tmp_store, terminal):
    server.reply("POST", TOKEN, 200, token_answer())
    user = User(terminal, (callback(),))
    login(code_flow(server, tmp_store), user)
    (page,) = user.pages
    assert page.status == 200
    assert page.content_type.startswith("text/html")
    assert page.body.lower().startswith("<!doctype html>")
    assert "Login successful" in page.body


@pytest.mark.timeout(20)
@pytest.mark.parametrize("answer", ["code", "error"])
def test_the_browser_gets_its_page_before_the_login_ends(server, tmp_store, terminal,
                                                         monkeypatch, answer):
    # A loaded machine: the receiver is slow to write the page. The login must not end
    # (and close the receiver with the browser's connection) before the page is out.
    sendall = socket.socket.sendall

    def slow_sendall(self: socket.socket, data: bytes, *args: int) -> None:
        if threading.current_thread().name == "oidc-callback" and b"302 " not in data[:20]:
            time.sleep(0.5)
        sendall(self, data, *args)

    monkeypatch.setattr(socket.socket, "sendall", slow_sendall)
    server.reply("POST", TOKEN, 200, token_answer())
    step = callback() if answer == "code" else callback(error="access_denied")
    user = User(terminal, (step,))
    if answer == "code":
        assert login(code_flow(server, tmp_store), user)["access_token"]
    else:
        with pytest.raises(oac.AuthError) as refused:
            login(code_flow(server, tmp_store), user)
        assert refused.value.error == "access_denied"
    (page,) = user.pages
    assert page.status == (200 if answer == "code" else 400)
    assert ("Login successful" if answer == "code" else "access_denied") in page.body


@pytest.mark.timeout(20)
def test_wrong_path_gets_404_and_the_flow_keeps_waiting(server, tmp_store, terminal):
    server.reply("POST", TOKEN, 200, token_answer())
    user = User(terminal, (wrong_path(), callback("abc")))
    token = login(code_flow(server, tmp_store), user)
    assert [p.status for p in user.pages] == [404, 200]
    assert user.pages[0].content_type.startswith("text/html")
    assert [p.form["code"] for p in server.hits(TOKEN)] == ["abc"]
    assert token["access_token"]


@pytest.mark.timeout(20)
def test_wrong_state_is_refused_and_the_right_one_still_works(server, tmp_store, terminal):
    server.reply("POST", TOKEN, 200, token_answer())
    user = User(terminal, (tampered("evil"), callback("abc")))
    login(code_flow(server, tmp_store), user)
    assert [p.status for p in user.pages] == [400, 200]
    assert [p.form["code"] for p in server.hits(TOKEN)] == ["abc"]


@pytest.mark.timeout(20)
def test_cached_token_is_returned_without_a_login(server, tmp_store, make_token):
    token = make_token()
    tmp_store.put(server.url, token)
    assert asyncio.run(code_flow(server, tmp_store).authenticate()) == token
    assert server.requests == []


@pytest.mark.timeout(20)
def test_force_logs_in_despite_a_cached_token(server, tmp_store, terminal, make_token):
    tmp_store.put(server.url, make_token())
    answer = token_answer()
    server.reply("POST", TOKEN, 200, answer)
    token = login(code_flow(server, tmp_store), User(terminal, (callback(),)), force=True)
    assert token["access_token"] == answer["access_token"]
    assert len(server.hits(LOGIN)) == 1


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_tampered_state_is_refused_and_the_code_never_exchanged(server, tmp_store, terminal):
    server.reply("POST", TOKEN, 200, token_answer())
    port = free_port()
    user = User(terminal, (tampered("evil"),))
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        login(code_flow(server, tmp_store, port, timeout=2), user)
    assert 1.5 <= time.monotonic() - start < 5
    (page,) = user.pages
    assert page.status == 400
    assert page.content_type.startswith("text/html")
    assert "state" in page.body
    assert server.hits(TOKEN) == []
    assert info.value.error == "timeout"
    assert info.value.status_code == 408
    assert tmp_store.get(server.url) is None
    assert port_is_free(port)


@pytest.mark.timeout(20)
def test_provider_error_ends_the_login_at_once(server, tmp_store, terminal):
    user = User(terminal, (provider_error("access_denied"),))
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        login(code_flow(server, tmp_store, timeout=30), user)
    assert time.monotonic() - start < 3
    assert info.value.error == "access_denied"
    assert "user said no" in info.value.message
    assert server.hits(TOKEN) == []
    (page,) = user.pages
    assert page.status == 400
    assert page.content_type.startswith("text/html")


@pytest.mark.timeout(20)
def test_provider_error_with_a_foreign_state_is_ignored(server, tmp_store, terminal):
    server.reply("POST", TOKEN, 200, token_answer())

    def foreign_error(base: str, state: str) -> str:
        return f"{base}?{urlencode({'error': 'access_denied', 'state': 'someone-else'})}"

    user = User(terminal, (foreign_error, callback("abc")))
    token = login(code_flow(server, tmp_store), user)
    assert [p.status for p in user.pages] == [400, 200]
    assert token["access_token"]


@pytest.mark.timeout(20)
def test_code_exchange_failure_names_the_error_but_no_secret(fake_server, tmp_store, terminal):
    fake_server.reply("GET", LOGIN, 307, redirect_to_provider(fake_server, "VERIFIER-SECRET"))
    fake_server.reply("POST", TOKEN, 400, {
        "detail": 'Upstream OIDC error: {"error":"invalid_grant","error_description":"bad code"}'})
    user = User(terminal, (callback("CODE-SECRET"),))
    with pytest.raises(oac.AuthError) as info:
        login(code_flow(fake_server, tmp_store), user)
    assert info.value.error == "invalid_grant"
    assert fake_server.hits(TOKEN)[0].form["code_verifier"] == "VERIFIER-SECRET"
    for text in (str(info.value), repr(info.value), info.value.message, repr(info.value.detail)):
        assert "CODE-SECRET" not in text
        assert "VERIFIER-SECRET" not in text


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("status", "body"), [
    (200, "<html><body>Welcome</body></html>"),
    (404, {"detail": "Not Found"}),
])
def test_login_route_that_does_not_redirect_is_an_error(
    fake_server, tmp_store, terminal, status, body
):
    fake_server.reply("GET", LOGIN, status, body)
    port = free_port()
    with terminal, pytest.raises(oac.AuthError) as info:
        asyncio.run(code_flow(fake_server, tmp_store, port).authenticate())
    assert f"answered {status}" in info.value.message
    assert "login route" in info.value.message
    assert fake_server.hits(TOKEN) == []
    assert "open this URL" not in terminal.getvalue()
    assert port_is_free(port)


@pytest.mark.timeout(20)
def test_redirect_without_state_is_an_error(fake_server, tmp_store, terminal):
    fake_server.reply("GET", LOGIN, 307, b"", {"Location": f"{fake_server.url}/authorize?x=1"})
    with terminal, pytest.raises(oac.AuthError) as info:
        asyncio.run(code_flow(fake_server, tmp_store).authenticate())
    assert "state" in info.value.message


# ---------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_busy_port_is_skipped(server, tmp_store, terminal):
    server.reply("POST", TOKEN, 200, token_answer())
    with busy_socket() as busy:
        taken = busy.getsockname()[1]
        port = free_port()
        user = User(terminal, (callback(),))
        login(code_flow(server, tmp_store, redirect_ports=[taken, port]), user)
    assert server.hits(LOGIN)[0].query["redirect_uri"] == f"http://localhost:{port}/callback"
    assert server.hits(TOKEN)[0].form["redirect_uri"] == f"http://localhost:{port}/callback"


def test_all_ports_busy_is_an_error(server, tmp_store):
    with busy_socket() as one, busy_socket() as two:
        ports = [one.getsockname()[1], two.getsockname()[1]]
        with pytest.raises(oac.AuthError) as info:
            asyncio.run(code_flow(server, tmp_store, redirect_ports=ports).authenticate())
    assert "No free port" in info.value.message
    assert all(str(p) in info.value.message for p in ports)
    assert server.requests == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("outcome", ["success", "provider-error", "timeout", "exchange-error"])
def test_the_port_is_freed_on_every_exit(server, tmp_store, terminal, outcome):
    visits = {"success": (callback(),), "provider-error": (provider_error(),),
              "timeout": (), "exchange-error": (callback(),)}[outcome]
    if outcome == "exchange-error":
        server.reply("POST", TOKEN, 400, {"error": "invalid_grant"})
    else:
        server.reply("POST", TOKEN, 200, token_answer())
    port = free_port()
    user = User(terminal, visits)
    flow = code_flow(server, tmp_store, port, timeout=1 if outcome == "timeout" else 10)
    if outcome == "success":
        login(flow, user)
    else:
        with pytest.raises(oac.AuthError):
            login(flow, user)
    assert port_is_free(port)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.timeout(20)
def test_the_callback_server_listens_on_loopback_only(server, tmp_store, terminal):
    # While the flow waits, the port is taken on 127.0.0.1 but not on 0.0.0.0-wide
    # addresses: another loopback address (127.0.0.2) cannot reach it.
    server.reply("POST", TOKEN, 200, token_answer())
    port = free_port()
    seen: dict[str, Any] = {}

    def probe(base: str, state: str) -> str:
        seen["listening"] = not port_is_free(port)
        try:
            socket.create_connection(("127.0.0.2", port), timeout=1).close()
            seen["other"] = True
        except OSError:
            seen["other"] = False
        return callback()(base, state)

    login(code_flow(server, tmp_store, port), User(terminal, (probe,)))
    assert seen == {"listening": True, "other": False}


# ---------------------------------------------------------------------------
# Terminal output and the event loop
# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("remote", [True, False], ids=["ssh", "local"])
def test_ssh_hint_on_remote_sessions(server, tmp_store, terminal, monkeypatch, remote):
    if remote:
        monkeypatch.setenv("SSH_CONNECTION", "10.0.0.1 50000 10.0.0.2 22")
    server.reply("POST", TOKEN, 200, token_answer())
    port = free_port()
    user = User(terminal, (callback(),))
    login(code_flow(server, tmp_store, port), user)
    hint = f"ssh -L {port}:localhost:{port}"
    assert (hint in terminal.getvalue()) is remote
    # The terminal shows the local start address, never the provider URL, whose
    # state carries py-oidc-auth's PKCE verifier.
    assert f"http://127.0.0.1:{port}/" in terminal.getvalue()
    assert "verifier123" in user.location
    assert "verifier123" not in terminal.getvalue()


@pytest.mark.timeout(20)
def test_nothing_is_written_to_stdout(server, tmp_store, terminal, capsys):
    server.reply("POST", TOKEN, 200, token_answer())
    login(code_flow(server, tmp_store), User(terminal, (callback(),)))
    assert capsys.readouterr().out == ""


@pytest.mark.timeout(20)
def test_the_event_loop_runs_while_the_flow_waits(server, tmp_store, terminal):
    server.reply("POST", TOKEN, 200, token_answer())
    flow = code_flow(server, tmp_store)
    user = User(terminal, (callback(),), delay=1.0)

    async def main() -> tuple[oac.Token, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.05)

        task = asyncio.create_task(ticker())
        try:
            return await flow.authenticate(), ticks
        finally:
            done.set()
            await task

    user.start()
    try:
        with terminal:
            token, ticks = asyncio.run(main())
    finally:
        user.finish()
    assert token["access_token"]
    assert ticks >= 10, ticks
