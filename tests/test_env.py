"""Environment detection: batch schedulers, terminals, notebooks, browsers, remote sessions."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
import types

import pytest

from conftest import token_answer
from tests import oac

SSH_VARIABLES = ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11/Wayland rules")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo terminal")


# pytest re-installs its own sys.stderr at the start of each test phase, so streams
# are swapped in the test body, not in a fixture.


def use_streams(monkeypatch, stdin, stderr) -> None:
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stderr", stderr)


def set_no_tty(monkeypatch) -> io.StringIO:
    """Neither stdin nor stderr is a terminal (as under cron, nohup or a pipeline)."""
    stderr = io.StringIO()
    use_streams(monkeypatch, io.StringIO(), stderr)
    return stderr


@pytest.fixture
def no_tty(monkeypatch):
    """Call it in the test body: ``no_tty()``."""
    return lambda: set_no_tty(monkeypatch)


@pytest.fixture
def terminal():
    """A real pseudo terminal: ``(for reading, for writing)`` file objects."""
    master, slave = os.openpty()
    reader = os.fdopen(os.dup(slave), "r")
    writer = os.fdopen(slave, "w")
    assert reader.isatty() and writer.isatty()
    yield reader, writer
    reader.close()
    writer.close()
    os.close(master)


@pytest.fixture
def tty_stdin(monkeypatch, terminal):
    """Call it in the test body: stdin becomes a terminal, stderr does not."""
    return lambda: use_streams(monkeypatch, terminal[0], io.StringIO())


@pytest.fixture
def tty_stderr(monkeypatch, terminal):
    """Call it in the test body: stderr becomes a terminal, stdin does not."""
    return lambda: use_streams(monkeypatch, io.StringIO(), terminal[1])


# -- _batch_scheduler ----------------------------------------------------------------------


def test_no_batch_scheduler_by_default():
    assert oac._batch_scheduler() is None


@pytest.mark.parametrize("variable, system", sorted(oac._BATCH_VARIABLES.items()))
def test_batch_scheduler_detected(monkeypatch, variable, system):
    monkeypatch.setenv(variable, "12345")
    assert oac._batch_scheduler() == system


@pytest.mark.parametrize("variable", sorted(oac._BATCH_VARIABLES))
def test_empty_batch_variable_is_ignored(monkeypatch, variable):
    monkeypatch.setenv(variable, "")
    assert oac._batch_scheduler() is None


def test_the_common_schedulers_are_known():
    assert {"SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "OAR_JOB_ID"} <= set(oac._BATCH_VARIABLES)
    assert oac._BATCH_VARIABLES["SLURM_JOB_ID"] == "Slurm"


# -- _has_tty / _in_jupyter --------------------------------------------------------------


@posix_only
def test_tty_on_stdin(tty_stdin):
    tty_stdin()
    assert oac._has_tty()


@posix_only
def test_tty_on_stderr(tty_stderr):
    tty_stderr()
    assert oac._has_tty()


def test_no_tty(no_tty):
    no_tty()
    assert not oac._has_tty()


def test_missing_streams_are_not_terminals(monkeypatch):
    # pythonw and some services run with sys.stdin / sys.stderr set to None.
    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.setattr(sys, "stderr", object())
    assert not oac._has_tty()
    assert oac._no_login_reason() is not None


def test_jupyter_detected_by_ipykernel(monkeypatch):
    assert not oac._in_jupyter()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert oac._in_jupyter()


# -- _no_login_reason ------------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("variable, system", sorted(oac._BATCH_VARIABLES.items()))
def test_batch_job_wins_over_a_tty(monkeypatch, tty_stdin, variable, system):
    tty_stdin()
    monkeypatch.setenv(variable, "42")
    reason = oac._no_login_reason()
    assert reason is not None
    assert system in reason


def test_batch_job_wins_over_browser_and_jupyter(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("BROWSER", "firefox")
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    reason = oac._no_login_reason()
    assert reason is not None
    assert "Slurm" in reason


def test_no_tty_no_browser_no_jupyter_gives_a_reason(no_tty):
    no_tty()
    reason = oac._no_login_reason()
    assert reason is not None
    assert "BROWSER" in reason
    assert "terminal" in reason


def test_browser_set_allows_a_login(no_tty, monkeypatch):
    no_tty()
    monkeypatch.setenv("BROWSER", "/usr/bin/true %s")
    assert oac._no_login_reason() is None


def test_jupyter_allows_a_login(no_tty, monkeypatch):
    no_tty()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert oac._no_login_reason() is None


@posix_only
def test_terminal_allows_a_login(tty_stdin):
    tty_stdin()
    assert oac._no_login_reason() is None


@posix_only
def test_terminal_on_stderr_allows_a_login(tty_stderr):
    tty_stderr()
    assert oac._no_login_reason() is None


# -- _is_remote / _can_open_browser -----------------------------------------------------------


def test_not_remote_by_default():
    assert not oac._is_remote()


@pytest.mark.parametrize("variable", SSH_VARIABLES)
def test_ssh_session_is_remote(monkeypatch, variable):
    monkeypatch.setenv(variable, "10.0.0.1 50000 10.0.0.2 22")
    assert oac._is_remote()


@pytest.mark.parametrize("variable", SSH_VARIABLES)
def test_empty_ssh_variable_is_not_remote(monkeypatch, variable):
    monkeypatch.setenv(variable, "")
    assert not oac._is_remote()


@pytest.mark.parametrize("variable", SSH_VARIABLES)
def test_browser_variable_wins_over_ssh(monkeypatch, variable):
    monkeypatch.setenv(variable, "10.0.0.1 50000 10.0.0.2 22")
    monkeypatch.setenv("BROWSER", "w3m")
    assert oac._can_open_browser()


@pytest.mark.parametrize("variable", SSH_VARIABLES)
def test_ssh_session_without_browser_cannot_open_one(monkeypatch, variable):
    monkeypatch.setenv(variable, "10.0.0.1 50000 10.0.0.2 22")
    monkeypatch.setenv("DISPLAY", ":0")  # X forwarding: the browser would still run remotely
    assert not oac._can_open_browser()


@linux_only
def test_linux_without_display_cannot_open_a_browser():
    assert not oac._can_open_browser()


@linux_only
@pytest.mark.parametrize("variable, value", [("DISPLAY", ":0"), ("WAYLAND_DISPLAY", "wayland-0")])
def test_linux_with_a_display_can_open_a_browser(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert oac._can_open_browser()


@linux_only
def test_linux_with_empty_display_cannot_open_a_browser(monkeypatch):
    monkeypatch.setenv("DISPLAY", "")
    assert not oac._can_open_browser()


# -- authenticate where nobody can log in -----------------------------------------------------


def assert_says_what_to_do(exc: oac.AuthError, host: str) -> None:
    message = exc.message
    assert "OIDC_TOKEN_FILE" in message
    assert "workstation" in message
    assert host in message
    assert exc.status_code == 401
    assert exc.error == "login_required"


@posix_only
@pytest.mark.timeout(5)
def test_batch_job_without_token_fails_at_once(monkeypatch, fake_server, tty_stdin):
    tty_stdin()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    fake_server.reply("POST", "/auth/v2/device", 200, {"device_code": "d", "user_code": "U",
                                                       "verification_uri": "http://x"})
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url)
    assert time.monotonic() - start < 2
    assert fake_server.requests == []
    assert_says_what_to_do(info.value, fake_server.url)
    assert "Slurm" in info.value.message


@pytest.mark.timeout(5)
def test_batch_job_without_token_fails_at_once_async(monkeypatch, fake_server):
    monkeypatch.setenv("PBS_JOBID", "77.server")
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(oac.authenticate_async(fake_server.url))
    assert time.monotonic() - start < 2
    assert fake_server.requests == []
    assert_says_what_to_do(info.value, fake_server.url)
    assert "PBS" in info.value.message


@pytest.mark.timeout(5)
def test_batch_job_with_force_fails_at_once(monkeypatch, fake_server, tmp_store, make_token):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tmp_store.put(fake_server.url, make_token())
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store, force=True)
    assert fake_server.requests == []
    assert_says_what_to_do(info.value, fake_server.url)


@pytest.mark.timeout(5)
def test_no_tty_without_token_fails_at_once(no_tty, fake_server):
    no_tty()
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url)
    assert time.monotonic() - start < 2
    assert fake_server.requests == []
    assert_says_what_to_do(info.value, fake_server.url)
    assert "terminal" in info.value.message
    assert sys.stderr.getvalue() == ""  # type: ignore[attr-defined]  # nothing half-started


@pytest.mark.timeout(5)
def test_batch_job_uses_a_cached_token(monkeypatch, fake_server, tmp_store, make_token):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    token = make_token()
    tmp_store.put(fake_server.url, token)
    assert oac.authenticate(fake_server.url, store=tmp_store) == token
    assert fake_server.requests == []


@pytest.mark.timeout(10)
def test_batch_job_may_refresh(monkeypatch, no_tty, fake_server, tmp_store, make_token):
    no_tty()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tmp_store.put(fake_server.url, make_token(lifetime=-100))
    answer = token_answer()
    fake_server.reply("POST", "/auth/v2/token", 200, answer)
    token = oac.authenticate(fake_server.url, store=tmp_store)
    assert token["access_token"] == answer["access_token"]
    assert len(fake_server.hits("/auth/v2/token")) == 1
    assert fake_server.hits("/auth/v2/device") == []


@pytest.mark.timeout(10)
def test_batch_job_with_refused_refresh_says_what_to_do(monkeypatch, fake_server, tmp_store,
                                                        make_token):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tmp_store.put(fake_server.url, make_token(lifetime=-100))
    fake_server.reply("POST", "/auth/v2/token", 400, {"error": "invalid_grant"})
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store)
    assert_says_what_to_do(info.value, fake_server.url)
    assert fake_server.hits("/auth/v2/device") == []


# -- where a login is allowed, it starts ------------------------------------------------------


def login_starts(fake_server) -> bool:
    """Run authenticate against a device route that fails fast; did the login start?"""
    fake_server.reply("POST", "/auth/v2/device", 500, {"detail": "stop here"})
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, timeout=2)
    assert "stop here" in info.value.message
    return len(fake_server.hits("/auth/v2/device")) == 1


@pytest.mark.timeout(5)
def test_browser_variable_starts_a_login_without_tty(no_tty, monkeypatch, fake_server):
    no_tty()
    monkeypatch.setenv("BROWSER", "/bin/true %s")
    assert login_starts(fake_server)


@pytest.mark.timeout(5)
def test_jupyter_starts_a_login_without_tty(no_tty, monkeypatch, fake_server):
    no_tty()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert login_starts(fake_server)


@posix_only
@pytest.mark.timeout(5)
def test_terminal_starts_a_login(tty_stdin, fake_server):
    tty_stdin()
    assert login_starts(fake_server)


@pytest.mark.timeout(5)
def test_explicit_flow_methods_are_not_gated(monkeypatch, no_tty, fake_server):
    no_tty()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    fake_server.reply("POST", "/auth/v2/device", 200, {
        "device_code": "dev-1", "user_code": "ABCD-EFGH", "interval": 2, "expires_in": 600,
        "verification_uri": fake_server.url + "/device"})
    code = asyncio.run(oac.DeviceFlow(fake_server.url).get_device_code())
    assert code == {"uri": fake_server.url + "/device", "user_code": "ABCD-EFGH",
                    "device_code": "dev-1", "interval": 2}


# -- OIDC_TOKEN_FILE in the login gate ---------------------------------------------------------


def test_a_token_file_refuses_a_login_even_with_a_browser(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER", "firefox")
    assert oac._no_login_reason() is None
    assert oac._no_login_reason("OIDC_TOKEN_FILE") is None  # the variable is not set
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(tmp_path / "job.json"))
    reason = oac._no_login_reason("OIDC_TOKEN_FILE")
    assert reason == f"the token file {tmp_path / 'job.json'} (OIDC_TOKEN_FILE) does not exist"


@pytest.mark.parametrize(("content", "state"), [
    ("not json", "holds no token"),
    ('{"access_token": "a", "expires": 1}', "holds an expired access token and no refresh token"),
    ('{"access_token": "a", "expires": 1, "refresh_token": "r", "refresh_expires": 2}',
     "holds expired tokens: its refresh token expired at "
     + time.strftime("%Y-%m-%d %H:%M", time.localtime(2))),
    ('{"access_token": "a", "expires": 1, "refresh_token": "r", "refresh_expires": 9999999999}',
     "holds a refresh token that the server refused"),
])
def test_token_file_state_says_what_is_wrong(tmp_path, content, state):
    path = tmp_path / "job.json"
    path.write_text(content)
    assert oac._token_file_state(str(path)).startswith(state)


# -- NO_COLOR / TERM=dumb, containers ---------------------------------------------------------


@pytest.mark.parametrize(("env", "plain"), [
    ({}, False), ({"NO_COLOR": "1"}, True), ({"NO_COLOR": ""}, False),
    ({"TERM": "dumb"}, True), ({"TERM": "xterm-256color"}, False),
])
def test_plain_terminal(monkeypatch, env, plain):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert oac._plain_terminal() is plain


@pytest.mark.parametrize(("variable", "value", "kind"), [
    ("APPTAINER_CONTAINER", "/images/x.sif", "Apptainer"),
    ("SINGULARITY_CONTAINER", "/images/x.sif", "Singularity"),
    ("KUBERNETES_SERVICE_HOST", "10.0.0.1", "Kubernetes"),
    ("container", "podman", "podman"),
])
def test_container_hints(monkeypatch, variable, value, kind):
    for name in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "KUBERNETES_SERVICE_HOST",
                 "container"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    found = oac._in_container()
    assert found is not None
    assert found.startswith(kind)
