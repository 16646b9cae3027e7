"""The HTTP layer: requests, answers, OAuth errors and retries, on real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
import types

import pytest

from conftest import read_request
from tests import oac

SECRETS = {
    "refresh-token": "rt-SECRET-4f9a0c7e21",
    "device-code": "dc-SECRET-88b1d3e5aa",
    "code_verifier": "cv-SECRET-0d6c2b9f47",
    "code": "code-SECRET-5e7a1f03bc",
}
FORM = {**SECRETS, "grant_type": "refresh-token"}


def run(coro):
    return asyncio.run(coro)


def names_status(message: str, status: int) -> bool:
    """The status appears as a number of its own (not inside the port of the URL)."""
    return re.search(rf"(?<![\d:.]){status}(?!\d)", message) is not None


def assert_no_secret(exc: BaseException, log_text: str = "") -> None:
    for value in SECRETS.values():
        assert value not in str(exc)
        assert value not in repr(exc)
        assert value not in json.dumps(getattr(exc, "detail", {}))
        assert value not in log_text


@pytest.fixture
def raw_server():
    """A raw TCP server: answers each connection with the next scripted bytes, then closes.

    The last scripted answer repeats. ``accepted`` counts the connections.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.1)
    stop = threading.Event()

    Raw = types.SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", answers=[],
                                accepted=0)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            Raw.accepted += 1
            answer = Raw.answers.pop(0) if len(Raw.answers) > 1 else Raw.answers[0]
            with conn:
                conn.settimeout(2)
                try:
                    read_request(conn)
                    conn.sendall(answer)
                    conn.shutdown(socket.SHUT_WR)  # FIN, not RST: the request was read whole
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield Raw
    stop.set()
    thread.join(2)
    sock.close()


TRUNCATED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100\r\n\r\n{\"access_token\": \"ab")
COMPLETE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 21\r\n\r\n{\"access_token\": \"a\"}")


# -- _Session.request ----------------------------------------------------------------


@pytest.mark.timeout(5)
def test_request_sends_the_form_and_returns_status_headers_body(fake_server):
    fake_server.reply("POST", "/t", 201, {"ok": True}, headers={"X-Extra": "1"})
    resp = run(oac._Session(2).request("POST", fake_server.url + "/t", form=FORM))
    assert resp.status == 201
    assert resp.headers["X-Extra"] == "1"
    assert resp.json() == {"ok": True}
    assert resp.url == fake_server.url + "/t"
    (hit,) = fake_server.hits("/t", "POST")
    assert hit.form == FORM
    assert hit.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert hit.headers["Accept"] == "application/json"
    assert hit.headers["User-Agent"] == f"oidc-auth-onefile/{oac.__version__}"


@pytest.mark.timeout(5)
def test_request_without_form_sends_no_body(fake_server):
    fake_server.reply("GET", "/g", 200, {"a": 1})
    resp = run(oac._Session(2).request("GET", fake_server.url + "/g"))
    assert resp.json() == {"a": 1}
    (hit,) = fake_server.hits("/g")
    assert hit.form == {}
    assert "Content-Type" not in hit.headers


@pytest.mark.timeout(5)
def test_request_returns_error_statuses_without_raising(fake_server):
    fake_server.reply("POST", "/t", 418, {"error": "teapot"})
    resp = run(oac._Session(2).request("POST", fake_server.url + "/t", form={}))
    assert resp.status == 418
    assert resp.json() == {"error": "teapot"}


@pytest.mark.timeout(5)
def test_redirect_not_followed_when_asked(fake_server):
    target = fake_server.url + "/elsewhere"
    fake_server.reply("GET", "/login", 307, "", headers={"Location": target})
    fake_server.reply("GET", "/elsewhere", 200, {"followed": True})
    resp = run(oac._Session(2).request("GET", fake_server.url + "/login", follow=False))
    assert resp.status == 307
    assert resp.headers["Location"] == target
    assert fake_server.hits("/elsewhere") == []


@pytest.mark.timeout(5)
def test_session_request_follow_false_returns_the_3xx(fake_server):
    target = "https://idp.example.org/authorize?state=abc"
    fake_server.reply("GET", "/login", 302, "", headers={"Location": target})
    resp = run(oac._Session(2).request("GET", fake_server.url + "/login", follow=False))
    assert resp.status == 302
    assert resp.headers["Location"] == target


@pytest.mark.timeout(5)
def test_redirect_followed_by_default(fake_server):
    fake_server.reply("GET", "/login", 302, "",
                      headers={"Location": fake_server.url + "/elsewhere"})
    fake_server.reply("GET", "/elsewhere", 200, {"followed": True})
    resp = run(oac._Session(2).request("GET", fake_server.url + "/login"))
    assert resp.status == 200
    assert resp.json() == {"followed": True}
    assert len(fake_server.hits("/elsewhere")) == 1


@pytest.mark.timeout(5)
def test_answer_of_exactly_the_cap_is_accepted(fake_server):
    filler = "x" * (oac._MAX_BODY - len('{"a": ""}'))
    body = '{"a": "' + filler + '"}'
    assert len(body) == oac._MAX_BODY
    fake_server.reply("POST", "/t", 200, body)
    payload = run(oac._Session(5).post_form(fake_server.url + "/t", {}))
    assert len(payload["a"]) == len(filler)


@pytest.mark.timeout(5)
@pytest.mark.parametrize("status", [200, 500])
def test_answer_over_the_cap_raises(fake_server, status):
    fake_server.reply("POST", "/t", status, b"{" + b" " * (2 * oac._MAX_BODY) + b"}")
    url = fake_server.url + "/t"
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(5).request("POST", url, form={}))
    assert not info.value._retry
    assert url in info.value.message
    assert "MiB" in info.value.message


@pytest.mark.timeout(5)
def test_answer_over_the_cap_names_the_status(fake_server):
    fake_server.reply("POST", "/t", 200, b"x" * (oac._MAX_BODY + 10))
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(5).post_form(fake_server.url + "/t", {}))
    assert names_status(info.value.message, 200)


@pytest.mark.timeout(5)
def test_truncated_transfer_is_an_error_naming_the_url(raw_server):
    raw_server.answers = [TRUNCATED]
    url = raw_server.url + "/t"
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).request("POST", url, form=FORM))
    assert url in info.value.message
    assert_no_secret(info.value)


@pytest.mark.timeout(10)
def test_truncated_transfer_is_retried_like_a_dropped_connection(raw_server):
    raw_server.answers = [TRUNCATED, COMPLETE]
    payload = run(oac._Session(2).post_form(raw_server.url + "/t", FORM))
    assert payload == {"access_token": "a"}


@pytest.mark.timeout(5)
def test_garbage_status_line_is_an_error_naming_the_url(raw_server):
    raw_server.answers = [b"this is not http\r\n\r\n"]
    url = raw_server.url + "/t"
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).request("POST", url, form={}))
    assert url in info.value.message


# -- transport failures ----------------------------------------------------------------


@pytest.mark.timeout(5)
def test_refused_connection(closed_port):
    url = f"http://127.0.0.1:{closed_port}/auth/v2/token"
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).request("POST", url, form=FORM))
    assert info.value._retry
    assert type(info.value) is oac.AuthError
    assert info.value.status_code == 503
    assert url in info.value.message
    assert "refused" in info.value.message
    assert_no_secret(info.value)


@pytest.mark.timeout(5)
def test_dns_failure_is_not_retried():
    url = "https://no-such-host.invalid/auth/v2/token"
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(url, FORM))
    assert time.monotonic() - start < 2
    assert not info.value._retry
    assert "gave up" not in info.value.message
    assert url in info.value.message
    assert "resolve" in info.value.message
    assert_no_secret(info.value)


@pytest.mark.timeout(5)
def test_hanging_server_times_out(fake_server):
    fake_server.reply("POST", "/t", 200, "__hang__")
    url = fake_server.url + "/t"
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(0.5).request("POST", url, form=FORM))
    assert 0.4 < time.monotonic() - start < 2
    assert info.value._retry
    assert info.value.status_code == 504
    assert url in info.value.message
    assert "timed out" in info.value.message
    assert_no_secret(info.value)


@pytest.mark.timeout(5)
def test_dropped_connection_is_a_transient_error(fake_server):
    fake_server.reply("POST", "/t", 200, "__drop__")
    url = fake_server.url + "/t"
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).request("POST", url, form=FORM))
    assert info.value._retry
    assert info.value.status_code == 502
    assert url in info.value.message
    assert "connection lost" in info.value.message
    assert_no_secret(info.value)


@pytest.mark.timeout(10)
def test_dropped_connection_is_retried_by_the_session(fake_server):
    fake_server.reply("POST", "/t", 200, "__drop__")
    fake_server.reply("POST", "/t", 200, {"access_token": "x"})
    payload = run(oac._Session(2).post_form(fake_server.url + "/t", FORM))
    assert payload == {"access_token": "x"}
    assert len(fake_server.hits("/t")) == 2


@pytest.mark.timeout(10)
def test_hang_with_deadline_gives_up_in_time(fake_server):
    fake_server.reply("POST", "/t", 200, "__hang__")
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(0.5).post_form(fake_server.url + "/t", FORM,
                                        deadline=time.monotonic() + 1.5))
    assert time.monotonic() - start < 3
    assert "gave up after" in info.value.message
    assert_no_secret(info.value)


# -- answers that are not JSON objects -----------------------------------------------


@pytest.mark.timeout(5)
def test_post_form_returns_the_json_object(fake_server):
    fake_server.reply("POST", "/t", 200, {"access_token": "a", "expires": 1})
    assert run(oac._Session(2).post_form(fake_server.url + "/t", FORM)) == {
        "access_token": "a", "expires": 1}
    assert fake_server.hits("/t")[0].form == FORM


@pytest.mark.timeout(5)
@pytest.mark.parametrize("body, kind", [
    ("<!doctype html><html><body>Sign in</body></html>", "HTML"),
    ("  \n<html>proxy page</html>", "HTML"),
    ('{"access_token": "abc', "not a JSON object"),
    ("plain words", "not a JSON object"),
    ([{"access_token": "a"}], "not a JSON object"),
    ('"a string"', "not a JSON object"),
    ("", "not a JSON object"),
])
def test_post_form_rejects_answers_that_are_not_json_objects(fake_server, tmp_store, body,
                                                             kind):
    exc = device_route_error(fake_server, tmp_store, 200, body)
    assert exc.status_code == 502
    assert kind in exc.message


@pytest.mark.timeout(5)
def test_html_error_page_names_url_and_status(fake_server, tmp_store):
    exc = device_route_error(fake_server, tmp_store, 404, "<html><h1>404 Not Found</h1></html>")
    assert exc.status_code == 404


def device_route_error(fake_server, tmp_store, status: int, body) -> oac.AuthError:
    """The AuthError of ``DeviceFlow.get_device_code`` when the device route answers so."""
    fake_server.reply("POST", "/auth/v2/device", status, body)
    with pytest.raises(oac.AuthError) as info:
        run(oac.DeviceFlow(fake_server.url, store=tmp_store).get_device_code())
    exc = info.value
    assert fake_server.url + "/auth/v2/device" in exc.message
    assert names_status(exc.message, status)
    return exc


# -- OAuth errors, as a flow sees them ------------------------------------------------


@pytest.mark.timeout(5)
@pytest.mark.parametrize("body, error, description", [
    ({"error": "invalid_grant", "error_description": "Token is not active"},
     "invalid_grant", "Token is not active"),
    ({"error": "access_denied"}, "access_denied", ""),
    ({"detail": 'Upstream OIDC error: {"error":"authorization_pending",'
                '"error_description":"waiting for the user"}'},
     "authorization_pending", "waiting for the user"),
    ({"detail": 'Upstream OIDC error: {"error":"slow_down"}\n'}, "slow_down", ""),
    ({"detail": {"error": "expired_token", "error_description": "too late"}},
     "expired_token", "too late"),
    ({"detail": {"detail": {"error": "invalid_client"}}}, "invalid_client", ""),
    ({"error": "", "detail": {"error": "x"}}, "x", ""),
    ({"error": "e", "error_description": None}, "e", ""),
    ({"detail": "Upstream OIDC error: {not json"}, "", "Upstream OIDC error: {not json"),
    ({"detail": "Upstream OIDC error: []"}, "", "Upstream OIDC error: []"),
    ({"detail": 'Upstream OIDC error: {"error": "invalid_grant"}'}, "invalid_grant", ""),
    ({"detail": "plain   text\n here"}, "", "plain text here"),
    ({"detail": "Not authenticated"}, "", "Not authenticated"),
    ({"error": 42}, "", ""),
    ([], "", "no OAuth error in the answer"),
    ("null", "", "no OAuth error in the answer"),
])
def test_oauth_error_found_top_level_or_nested(fake_server, tmp_store, body, error,
                                               description):
    exc = device_route_error(fake_server, tmp_store, 400, body)
    assert exc.status_code == 400
    assert exc.error == error
    assert exc.detail == ({"error": error, "error_description": description} if error else {})
    assert error in exc.message
    assert description in exc.message


def test_oauth_error_shortens_long_text(fake_server, tmp_store):
    exc = device_route_error(fake_server, tmp_store, 400, {"detail": "y" * 5000})
    assert exc.error == ""
    assert "y" * 190 + "..." in exc.message
    assert "y" * 200 not in exc.message


# -- _Session.post_form: retries -----------------------------------------------------


def test_session_timeout_is_capped():
    assert oac._Session(None).timeout == oac._HTTP_TIMEOUT
    assert oac._Session(10_000).timeout == oac._HTTP_TIMEOUT
    assert oac._Session(2).timeout == 2


@pytest.mark.parametrize("attempt, low, high", [(1, 0.25, 0.5), (2, 0.5, 1), (3, 1, 2),
                                                (4, 2, 4), (10, 4, 8)])
def test_backoff_grows_and_is_capped(attempt, low, high):
    exc = oac._transient("x", 503)
    for _ in range(20):
        assert low <= oac._backoff(attempt, exc) <= high


@pytest.mark.timeout(10)
@pytest.mark.parametrize("status", [502, 503, 504])
def test_transient_status_retried_then_gives_up_saying_attempts(fake_server, status, caplog):
    caplog.set_level(logging.DEBUG, logger="py_oidc_auth_client")
    fake_server.reply("POST", "/t", status, "<html>Bad Gateway</html>",
                      headers={"Retry-After": "0"})
    url = fake_server.url + "/t"
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(url, FORM))
    attempts = oac._RETRIES + 1
    assert len(fake_server.hits("/t")) == attempts
    exc = info.value
    assert f"gave up after {attempts} attempts" in exc.message
    assert exc.status_code == status
    assert url in exc.message
    assert names_status(exc.message, status)
    assert_no_secret(exc, caplog.text)


@pytest.mark.timeout(10)
def test_transient_status_retried_with_backoff_until_success(fake_server):
    fake_server.reply("POST", "/t", 503, "")
    fake_server.reply("POST", "/t", 502, "")
    fake_server.reply("POST", "/t", 200, {"access_token": "a"})
    assert run(oac._Session(2).post_form(fake_server.url + "/t", FORM)) == {"access_token": "a"}
    first, second, third = (h.time for h in fake_server.hits("/t"))
    assert second - first >= 0.24  # attempt 1: 0.25-0.5 s
    assert third - second >= 0.49  # attempt 2: 0.5-1 s
    assert third - first < 2


@pytest.mark.timeout(10)
def test_retry_after_is_honoured(fake_server):
    fake_server.reply("POST", "/t", 503, "", headers={"Retry-After": "1"})
    fake_server.reply("POST", "/t", 200, {"access_token": "a"})
    assert run(oac._Session(2).post_form(fake_server.url + "/t", FORM)) == {"access_token": "a"}
    first, second = (h.time for h in fake_server.hits("/t"))
    assert 0.95 <= second - first < 1.6


def test_retry_after_is_capped_and_dates_ignored():
    resp = oac._Response("http://x/t", 503, {"Retry-After": "3600"}, b"")
    assert oac._http_error(resp, None)._retry_after == 60
    resp = oac._Response("http://x/t", 503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
                         b"")
    exc = oac._http_error(resp, None)
    assert exc._retry
    assert exc._retry_after is None


@pytest.mark.timeout(5)
def test_retry_after_beyond_the_deadline_gives_up_at_once(fake_server):
    fake_server.reply("POST", "/t", 503, "", headers={"Retry-After": "30"})
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(fake_server.url + "/t", FORM,
                                      deadline=time.monotonic() + 1))
    assert time.monotonic() - start < 1
    assert "gave up after 1 attempts" in info.value.message
    assert len(fake_server.hits("/t")) == 1


@pytest.mark.timeout(10)
def test_backoff_respects_the_deadline(fake_server):
    fake_server.reply("POST", "/t", 503, "")
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(fake_server.url + "/t", FORM,
                                      deadline=time.monotonic() + 1.2))
    assert time.monotonic() - start < 1.3
    hits = fake_server.hits("/t")
    assert 2 <= len(hits) <= 3
    assert hits[1].time - hits[0].time >= 0.24
    assert f"gave up after {len(hits)} attempts" in info.value.message


@pytest.mark.timeout(10)
def test_refused_connection_retried_then_gives_up(closed_port):
    url = f"http://127.0.0.1:{closed_port}/t"
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(url, FORM, deadline=time.monotonic() + 1))
    assert "refused" in info.value.message
    assert "gave up after" in info.value.message
    assert url in info.value.message
    assert_no_secret(info.value)


@pytest.mark.timeout(5)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 500])
def test_other_errors_are_not_retried(fake_server, status):
    fake_server.reply("POST", "/t", status, {"detail": "nope"})
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(fake_server.url + "/t", FORM))
    assert len(fake_server.hits("/t")) == 1
    assert info.value.status_code == status
    assert "gave up" not in info.value.message


@pytest.mark.timeout(5)
def test_transient_status_with_an_oauth_error_is_not_retried(fake_server):
    # py-oidc-auth answers 502/503 with a detail when the provider itself failed.
    upstream = 'Upstream OIDC error: {"error":"invalid_grant"}'
    fake_server.reply("POST", "/t", 502, {"detail": upstream})
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(fake_server.url + "/t", FORM))
    assert len(fake_server.hits("/t")) == 1
    assert info.value.error == "invalid_grant"


# -- secrets ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("status, body", [
    (200, "<html>login</html>"),
    (200, [1, 2]),
    (400, {"error": "invalid_grant", "error_description": "bad"}),
    (400, {"detail": 'Upstream OIDC error: {"error":"invalid_grant"}'}),
    (500, "Internal Server Error"),
    (503, ""),
    (200, "__drop__"),
])
def test_no_form_value_in_any_error_message(fake_server, caplog, status, body):
    caplog.set_level(logging.DEBUG, logger="py_oidc_auth_client")
    fake_server.reply("POST", "/t", status, body, headers={"Retry-After": "0"})
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(fake_server.url + "/t", FORM,
                                      deadline=time.monotonic() + 1))
    assert_no_secret(info.value, caplog.text)


@pytest.mark.timeout(5)
def test_server_echo_of_a_secret_is_not_repeated(fake_server):
    echo = {"detail": [{"type": "value_error", "loc": ["body", "refresh-token"],
                        "msg": "malformed token", "input": SECRETS["refresh-token"]}]}
    fake_server.reply("POST", "/t", 422, echo)
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(fake_server.url + "/t", FORM))
    assert SECRETS["refresh-token"] not in info.value.message
