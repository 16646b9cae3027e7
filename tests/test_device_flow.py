"""DeviceFlow against a real local server: device code, polling rules, refresh, token rules."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import time
from typing import Any

import pytest

from conftest import DEVICE, REPO, TOKEN, device_answer, make_jwt, token_answer
from tests import oac

# Asyncio may wake a hair before the requested time; request timestamps are
# taken on arrival, after the client sent them, so this is only clock noise.
SLACK = 0.02


def oauth_error(error: str, wrapped: bool = True) -> dict[str, Any]:
    """An OAuth error as py-oidc-auth wraps it, or in the plain RFC 6749 form."""
    plain = {"error": error, "error_description": f"{error} from the test"}
    if wrapped:
        return {"detail": f"Upstream OIDC error: {json.dumps(plain)}"}
    return plain


FORMS = pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "top-level"])


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def run_script(code: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter that imports the module from the repo."""
    prelude = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport py_oidc_auth_client as oac\n"
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO)


def device_flow(fake_server: Any, store: oac.TokenStore, **kwargs: Any) -> oac.DeviceFlow:
    return oac.DeviceFlow(fake_server.url, store=store, **kwargs)


# ---------------------------------------------------------------------------
# get_device_code
# ---------------------------------------------------------------------------


def test_device_code_uses_verification_uri_complete(fake_server, tmp_store):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=7))
    code = asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert code == {"uri": "https://idp.example/device?user_code=ABCD-EFGH",
                    "user_code": "ABCD-EFGH", "device_code": "dev-123", "interval": 7}
    assert [r.method for r in fake_server.hits(DEVICE)] == ["POST"]


@pytest.mark.parametrize("complete", [None, ""], ids=["absent", "empty"])
def test_device_code_falls_back_to_verification_uri(fake_server, tmp_store, complete):
    body = device_answer(verification_uri_complete=complete)
    assert ("verification_uri_complete" in body) == (complete is not None)
    fake_server.reply("POST", DEVICE, 200, body)
    code = asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert code["uri"] == "https://idp.example/device"


def test_device_code_without_interval_defaults_to_five(fake_server, tmp_store):
    body = device_answer()
    del body["interval"]
    fake_server.reply("POST", DEVICE, 200, body)
    code = asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert code["interval"] == 5


@pytest.mark.parametrize("missing", ["device_code", "user_code", "verification_uri"])
def test_device_code_missing_field_is_auth_error(fake_server, tmp_store, missing):
    body = device_answer(verification_uri_complete=None)
    del body[missing]
    fake_server.reply("POST", DEVICE, 200, body)
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert not isinstance(info.value, oac._NoDeviceFlow)
    assert missing in info.value.message


@pytest.mark.timeout(20)
@pytest.mark.parametrize("status", [404, 405, 501, 503])
def test_no_device_flow_statuses(fake_server, tmp_store, status):
    # py-oidc-auth sends no Retry-After; "0" keeps the 503 retries cheap here.
    fake_server.reply("POST", DEVICE, status, {"detail": "Not Found"}, {"Retry-After": "0"})
    with pytest.raises(oac._NoDeviceFlow) as info:
        asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert isinstance(info.value, oac.AuthError)
    assert info.value.status_code == status
    assert "device flow" in info.value.message


@pytest.mark.timeout(20)
def test_502_naming_the_missing_device_endpoint_means_no_device_flow(fake_server, tmp_store):
    # What py-oidc-auth 2606.0.0 answers when the provider has no device endpoint.
    body = {"detail": "OIDC endpoint 'device_authorization_endpoint' not found in discovery."}
    fake_server.reply("POST", DEVICE, 502, body, {"Retry-After": "0"})
    with pytest.raises(oac._NoDeviceFlow) as info:
        asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert info.value.status_code == 502


@pytest.mark.timeout(20)
def test_502_from_a_provider_outage_is_not_no_device_flow(fake_server, tmp_store):
    # py-oidc-auth's answer when the provider cannot be reached: the device flow
    # exists, it just failed; falling back to the code flow hides the real error.
    body = {"detail": "Failed to contact OIDC endpoint: [Errno 111] Connection refused"}
    fake_server.reply("POST", DEVICE, 502, body, {"Retry-After": "0"})
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert not isinstance(info.value, oac._NoDeviceFlow)


@pytest.mark.parametrize("wrapped", [True, False])
def test_device_route_oauth_error_is_not_no_device_flow(fake_server, tmp_store, wrapped):
    fake_server.reply("POST", DEVICE, 400, oauth_error("invalid_client", wrapped))
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_flow(fake_server, tmp_store).get_device_code())
    assert not isinstance(info.value, oac._NoDeviceFlow)
    assert info.value.error == "invalid_client"
    assert info.value.status_code == 400


# ---------------------------------------------------------------------------
# poll
# ---------------------------------------------------------------------------


async def _login(flow: oac.DeviceFlow) -> oac.Token:
    code = await flow.get_device_code()
    return await flow.poll(code["device_code"], code["interval"])


@pytest.mark.timeout(20)
@FORMS
def test_poll_honours_interval_and_keeps_polling_while_pending(fake_server, tmp_store, wrapped):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending", wrapped), times=2)
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    token = asyncio.run(_login(device_flow(fake_server, tmp_store, timeout=15)))

    polls = fake_server.hits(TOKEN)
    assert len(polls) == 3
    assert all(p.form == {"device-code": "dev-123", "grant_type": "device-code"} for p in polls)
    times = [fake_server.hits(DEVICE)[0].time] + [p.time for p in polls]
    assert min(gaps(times)) >= 1 - SLACK, gaps(times)
    assert token["access_token"] == answer["access_token"]
    assert token["headers"] == {"Authorization": f"Bearer {answer['access_token']}"}
    assert tmp_store.get(fake_server.url) == token


@pytest.mark.timeout(20)
def test_poll_never_polls_faster_than_a_longer_interval(fake_server, tmp_store):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=2))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    asyncio.run(_login(device_flow(fake_server, tmp_store, timeout=15)))
    times = [fake_server.hits(DEVICE)[0].time] + [p.time for p in fake_server.hits(TOKEN)]
    assert len(times) == 3
    assert min(gaps(times)) >= 2 - SLACK, gaps(times)


@pytest.mark.timeout(25)
def test_slow_down_adds_five_seconds(fake_server, tmp_store):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("slow_down"))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    asyncio.run(_login(device_flow(fake_server, tmp_store, timeout=20)))
    times = [fake_server.hits(DEVICE)[0].time] + [p.time for p in fake_server.hits(TOKEN)]
    assert len(times) == 3
    first, second = gaps(times)
    assert first >= 1 - SLACK
    assert second >= 6 - SLACK, second
    assert second < 8


@pytest.mark.timeout(15)
@FORMS
@pytest.mark.parametrize("error", ["access_denied", "expired_token"])
def test_denied_or_expired_stops_at_once(fake_server, tmp_store, wrapped, error):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error(error, wrapped))
    fake_server.reply("POST", TOKEN, 200, token_answer())  # must never be reached
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(_login(device_flow(fake_server, tmp_store, timeout=10)))
    assert time.monotonic() - start < 2.5
    assert len(fake_server.hits(TOKEN)) == 1
    assert info.value.error == error
    assert info.value.status_code == 400
    assert "127.0.0.1" in info.value.message
    assert tmp_store.get(fake_server.url) is None


@pytest.mark.timeout(15)
@pytest.mark.parametrize(("expires_in", "timeout"), [(2, 30), (600, 2)],
                         ids=["expires_in", "timeout"])
def test_poll_deadline_is_the_earlier_of_expires_in_and_timeout(
    fake_server, tmp_store, expires_in, timeout
):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1, expires_in=expires_in))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(_login(device_flow(fake_server, tmp_store, timeout=timeout)))
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 3.5, elapsed
    assert 1 <= len(fake_server.hits(TOKEN)) <= 2
    # The code's own end says "expired"; our timeout's end says "Gave up waiting".
    assert info.value.error == ("expired_token" if expires_in < timeout else "timeout")
    assert info.value.status_code == 408
    assert ("expired" if expires_in < timeout else "Gave up waiting") in info.value.message


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fault", ["503", "__drop__"])
def test_transient_fault_during_polling_is_retried(fake_server, tmp_store, fault):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    if fault == "503":
        fake_server.reply("POST", TOKEN, 503, {"detail": "Service Unavailable"})
    else:
        fake_server.reply("POST", TOKEN, 200, "__drop__")
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    token = asyncio.run(_login(device_flow(fake_server, tmp_store, timeout=15)))
    assert token["access_token"] == answer["access_token"]
    assert len(fake_server.hits(TOKEN)) == 3
    assert tmp_store.get(fake_server.url)["access_token"] == answer["access_token"]


@pytest.mark.timeout(20)
def test_prompt_goes_to_stderr_and_stdout_stays_clean(fake_server, tmp_store, capsys):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    flow = device_flow(fake_server, tmp_store, timeout=15)
    asyncio.run(flow.authenticate(auto_open=False))
    out, err = capsys.readouterr()
    assert out == ""
    assert "https://idp.example/device?user_code=ABCD-EFGH" in err
    assert "ABCD-EFGH" in err
    assert "dev-123" not in err  # the device code is a secret


COUNTDOWN_SCRIPT = """
import asyncio
flow = oac.DeviceFlow(sys.argv[1], store=oac.TokenStore(sys.argv[2]), timeout=15)
asyncio.run(flow.authenticate(auto_open=False))
"""


@pytest.mark.timeout(30)
def test_countdown_is_shown_on_a_terminal_stderr_only(fake_server, tmp_path):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=2))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    prelude = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport py_oidc_auth_client as oac\n"
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", prelude + COUNTDOWN_SCRIPT, fake_server.url,
             str(tmp_path / "tokens.json")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=REPO)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        stdout, _ = proc.communicate(timeout=20)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    terminal = b"".join(chunks).decode()
    assert proc.returncode == 0, terminal
    assert stdout == b""
    assert "ABCD-EFGH" in terminal
    assert "Waiting for approval..." in terminal
    assert " left" in terminal


# ---------------------------------------------------------------------------
# authenticate: cache and refresh
# ---------------------------------------------------------------------------


def test_authenticate_returns_cached_token_without_a_request(fake_server, tmp_store, make_token):
    token = make_token()
    tmp_store.put(fake_server.url, token)
    got = asyncio.run(device_flow(fake_server, tmp_store).authenticate())
    assert got == token
    assert fake_server.requests == []


def expired(make_token: Any) -> oac.Token:
    """A token whose access part expired 10 s ago and whose refresh token is good."""
    return make_token(lifetime=-10, refresh_lifetime=86400, refresh="refresh-1")


def test_expired_access_is_refreshed_with_one_post(fake_server, tmp_store, make_token):
    tmp_store.put(fake_server.url, expired(make_token))
    answer = token_answer(refresh="refresh-2")
    fake_server.reply("POST", TOKEN, 200, answer)
    token = asyncio.run(device_flow(fake_server, tmp_store).authenticate())
    assert [(r.method, r.path) for r in fake_server.requests] == [("POST", TOKEN)]
    form = fake_server.requests[0].form
    assert form["refresh-token"] == "refresh-1"
    assert "device-code" not in form
    assert token["access_token"] == answer["access_token"]
    assert tmp_store.get(fake_server.url) == token


@pytest.mark.parametrize("absent", ["missing", "null"])
def test_refresh_answer_without_refresh_token_keeps_the_old_one(
    fake_server, tmp_store, make_token, absent
):
    old = expired(make_token)
    tmp_store.put(fake_server.url, old)
    answer = token_answer(refresh=None, refresh_lifetime=180)  # py-oidc-auth's invented 180 s
    if absent == "missing":
        del answer["refresh_token"]
    fake_server.reply("POST", TOKEN, 200, answer)
    token = asyncio.run(device_flow(fake_server, tmp_store).authenticate())
    assert token["access_token"] == answer["access_token"]
    assert token["refresh_token"] == "refresh-1"
    assert token["refresh_expires"] == old["refresh_expires"]
    assert tmp_store.get(fake_server.url) == token


def test_rotated_refresh_token_replaces_the_old_one(fake_server, tmp_store, make_token):
    tmp_store.put(fake_server.url, expired(make_token))
    answer = token_answer(refresh="refresh-2", refresh_lifetime=7200)
    fake_server.reply("POST", TOKEN, 200, answer)
    token = asyncio.run(device_flow(fake_server, tmp_store).authenticate())
    assert token["refresh_token"] == "refresh-2"
    assert token["refresh_expires"] == answer["refresh_expires"]
    assert tmp_store.get(fake_server.url)["refresh_token"] == "refresh-2"


@pytest.mark.timeout(20)
@FORMS
def test_invalid_grant_drops_the_entry_and_falls_to_a_device_login(
    fake_server, tmp_store, make_token, wrapped, capsys
):
    tmp_store.put(fake_server.url, expired(make_token))
    fake_server.reply("POST", TOKEN, 400, oauth_error("invalid_grant", wrapped))
    answer = token_answer(refresh="refresh-new")
    fake_server.reply("POST", TOKEN, 200, answer)
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    token = asyncio.run(device_flow(fake_server, tmp_store, timeout=15).authenticate(
        auto_open=False))
    assert [(r.path, sorted(r.form)) for r in fake_server.requests] == [
        (TOKEN, ["grant_type", "refresh-token"]),
        (DEVICE, []),
        (TOKEN, ["device-code", "grant_type"]),
    ]
    assert token["access_token"] == answer["access_token"]
    assert tmp_store.get(fake_server.url)["refresh_token"] == "refresh-new"
    assert "ABCD-EFGH" in capsys.readouterr().err


def test_invalid_grant_drops_the_entry_even_if_the_login_fails(
    fake_server, tmp_store, make_token
):
    tmp_store.put(fake_server.url, expired(make_token))
    fake_server.reply("POST", TOKEN, 400, oauth_error("invalid_grant"))
    fake_server.reply("POST", DEVICE, 400, oauth_error("invalid_client"))
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_flow(fake_server, tmp_store).authenticate(auto_open=False))
    assert info.value.error == "invalid_client"
    assert tmp_store.get(fake_server.url) is None


@pytest.mark.parametrize("wrapped", [True, False])
def test_other_refresh_errors_keep_the_entry_and_raise(
    fake_server, tmp_store, make_token, wrapped
):
    old = expired(make_token)
    tmp_store.put(fake_server.url, old)
    fake_server.reply("POST", TOKEN, 400, oauth_error("invalid_request", wrapped))
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(device_flow(fake_server, tmp_store).authenticate())
    assert info.value.error == "invalid_request"
    assert "refresh-1" not in str(info.value)
    assert fake_server.hits(DEVICE) == []
    assert tmp_store.get(fake_server.url) == old


def test_public_refresh_method_saves_the_token(fake_server, tmp_store, make_token):
    tmp_store.put(fake_server.url, expired(make_token))
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh=None))
    token = asyncio.run(device_flow(fake_server, tmp_store).refresh("refresh-1"))
    assert fake_server.requests[0].form["refresh-token"] == "refresh-1"
    assert token["refresh_token"] == "refresh-1"
    assert tmp_store.get(fake_server.url) == token


# ---------------------------------------------------------------------------
# Token normalisation and the expiry margin
# ---------------------------------------------------------------------------


def test_make_token_refuses_an_already_expired_access_token():
    with pytest.raises(oac.AuthError) as info:
        oac._make_token(token_answer(lifetime=-5))
    assert "expired" in info.value.message
    assert "clock" in info.value.message


def test_make_token_needs_an_access_token():
    raw = token_answer()
    del raw["access_token"]
    with pytest.raises(oac.AuthError):
        oac._make_token(raw)


def test_invented_refresh_expiry_is_replaced_by_the_jwt_exp():
    now = int(time.time())
    refresh = make_jwt(7200, now)
    token = oac._make_token(token_answer(refresh=refresh, refresh_lifetime=180))
    assert token["refresh_token"] == refresh
    assert token["refresh_expires"] == now + 7200


def test_invented_refresh_expiry_of_an_opaque_token_is_replaced():
    now = int(time.time())
    token = oac._make_token(token_answer(refresh="opaque-refresh", refresh_lifetime=180))
    assert token["refresh_expires"] >= now + 7 * 86400


def test_a_real_refresh_expiry_is_kept():
    answer = token_answer(refresh="opaque-refresh", refresh_lifetime=7200)
    assert oac._make_token(answer)["refresh_expires"] == answer["refresh_expires"]


def test_relative_expiry_fields_are_understood():
    now = int(time.time())
    raw = {"access_token": "opaque", "token_type": "bearer", "expires_in": 600,
           "refresh_token": "r", "refresh_expires_in": 3600}
    token = oac._make_token(raw)
    assert now + 599 <= token["expires"] <= now + 602
    assert now + 3599 <= token["refresh_expires"] <= now + 3602
    assert token["token_type"] == "Bearer"
    assert token["headers"] == {"Authorization": "Bearer opaque"}


@pytest.mark.parametrize(("lifetime", "valid_after", "expired_after"),
                         [(30, 10, 16), (3600, 3530, 3545), (120, 55, 62)])
def test_margin_is_the_smaller_of_sixty_seconds_and_half_the_lifetime(
    lifetime, valid_after, expired_after
):
    token = oac._make_token(token_answer(lifetime=lifetime))
    now = time.time()
    assert oac._access_valid(token, now)
    assert oac._access_valid(token, now + valid_after)
    assert not oac._access_valid(token, now + expired_after)


def test_a_thirty_second_jwt_is_valid_in_another_process(tmp_store, fake_server):
    tmp_store.put(fake_server.url, oac._make_token(token_answer(lifetime=30)))
    proc = run_script("print(oac._access_valid(oac.TokenStore(sys.argv[1]).get(sys.argv[2])))",
                      tmp_store.path, fake_server.url)
    assert proc.stdout.strip() == "True", proc.stderr


def test_a_thirty_second_opaque_token_is_valid_in_another_process(tmp_store, fake_server):
    raw = {"access_token": "opaque-access", "token_type": "Bearer", "expires_in": 30,
           "refresh_token": "r", "refresh_expires_in": 3600}
    tmp_store.put(fake_server.url, oac._make_token(raw))
    proc = run_script("print(oac._access_valid(oac.TokenStore(sys.argv[1]).get(sys.argv[2])))",
                      tmp_store.path, fake_server.url)
    assert proc.stdout.strip() == "True", proc.stderr


# ---------------------------------------------------------------------------
# One refresh per expiry across processes
# ---------------------------------------------------------------------------

RACER = """
import json
store = oac.TokenStore(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # wait until every racer is ready
token = oac.authenticate(sys.argv[1], store=store)
print(json.dumps(token["access_token"]), flush=True)
"""


@pytest.mark.timeout(60)
def test_one_refresh_per_expiry_across_processes(fake_server, tmp_store, make_token):
    tmp_store.put(fake_server.url, expired(make_token))
    answer = token_answer(refresh="refresh-2")

    def slow_refresh(req: Any) -> tuple[int, dict[str, str], Any]:
        time.sleep(0.5)
        return 200, {}, answer

    fake_server.reply("POST", TOKEN, 200, slow_refresh)
    prelude = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport py_oidc_auth_client as oac\n"
    procs = [subprocess.Popen([sys.executable, "-c", prelude + RACER, fake_server.url,
                               tmp_store.path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(8)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=40) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    tokens = {json.loads(out) for out, _ in results}
    assert tokens == {answer["access_token"]}
    assert len(fake_server.hits(TOKEN)) == 1
    assert oac.TokenStore(tmp_store.path).get(fake_server.url)["refresh_token"] == "refresh-2"
