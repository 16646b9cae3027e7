"""Environment detection: batch schedulers, terminals, notebooks, browsers, remote sessions.

Each decision is seen where it acts: ``authenticate()`` starts a login or refuses
one and says why, a device login opens a browser or does not, ``--doctor`` shows it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import threading
import time
import types
import webbrowser

import pytest

from conftest import device_answer, oauth_error, token_answer
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


class TtyStream(io.StringIO):
    """A stream that says it is a terminal, and keeps what was written to it."""

    def isatty(self) -> bool:
        return True


def refusal(fake_server, **kwargs) -> str:
    """Run authenticate where it must refuse a login at once; the reason it gives."""
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, **kwargs)
    assert time.monotonic() - start < 2
    assert info.value.error == "login_required"
    assert fake_server.hits("/auth/v2/device") == []
    return info.value.message


def login_starts(fake_server) -> bool:
    """Run authenticate against a device route that fails fast; did the login start?"""
    fake_server.reply("POST", "/auth/v2/device", 500, {"detail": "stop here"})
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, timeout=2)
    assert "stop here" in info.value.message
    return len(fake_server.hits("/auth/v2/device")) == 1


def device_login(fake_server, monkeypatch) -> list[str]:
    """A device login denied at its one poll; the URLs it opened in a browser."""
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    fake_server.reply("POST", "/auth/v2/device", 200, device_answer())
    fake_server.reply("POST", "/auth/v2/token", 400, oauth_error("access_denied"))
    with pytest.raises(oac.AuthError, match="denied"):
        oac.authenticate(fake_server.url, timeout=0.5)  # the one poll is at the time limit
    for thread in threading.enumerate():
        if thread.name == "oidc-browser":
            thread.join(5)
    return opened


# -- batch jobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("variable, system", sorted(oac._BATCH_VARIABLES.items()))
def test_a_batch_job_refuses_a_login_whatever_else_is_there(monkeypatch, fake_server,
                                                            variable, system):
    # A terminal, a browser and a notebook: none of them is a person in a batch job.
    use_streams(monkeypatch, TtyStream(), TtyStream())
    monkeypatch.setenv("BROWSER", "firefox")
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setenv(variable, "12345")
    assert f"this is a {system} batch job" in refusal(fake_server)


@pytest.mark.parametrize("variable", sorted(oac._BATCH_VARIABLES))
def test_an_empty_batch_variable_is_ignored(monkeypatch, fake_server, variable):
    monkeypatch.setenv(variable, "")
    monkeypatch.setenv("BROWSER", "firefox")
    assert login_starts(fake_server)


def test_the_common_schedulers_are_known():
    assert {"SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "OAR_JOB_ID"} <= set(oac._BATCH_VARIABLES)
    assert oac._BATCH_VARIABLES["SLURM_JOB_ID"] == "Slurm"


# -- terminals and notebooks ------------------------------------------------------------------


def test_missing_streams_are_not_terminals(monkeypatch, fake_server):
    # pythonw and some services run with sys.stdin / sys.stderr set to None.
    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.setattr(sys, "stderr", object())
    assert "there is no terminal, notebook or configured browser" in refusal(fake_server)


def test_no_tty_no_browser_no_jupyter_gives_a_reason(no_tty, fake_server):
    no_tty()
    message = refusal(fake_server)
    assert "BROWSER" in message
    assert "terminal" in message


@pytest.mark.timeout(5)
def test_a_terminal_on_stderr_starts_a_login(monkeypatch, fake_server):
    use_streams(monkeypatch, io.StringIO(), TtyStream())
    assert login_starts(fake_server)


@pytest.mark.parametrize(("env", "plain"), [
    ({}, False), ({"NO_COLOR": "1"}, True), ({"NO_COLOR": ""}, False),
    ({"TERM": "dumb"}, True), ({"TERM": "xterm-256color"}, False),
])
def test_plain_terminals_get_no_escape_sequences(monkeypatch, fake_server, env, plain):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stderr = TtyStream()
    use_streams(monkeypatch, io.StringIO(), stderr)
    device_login(fake_server, monkeypatch)
    assert "Waiting for approval... 0:00 left" in stderr.getvalue()
    assert ("\x1b" not in stderr.getvalue()) is plain


# -- remote sessions and browsers ---------------------------------------------------------------


@pytest.mark.parametrize("variable", SSH_VARIABLES)
def test_browser_variable_wins_over_ssh(monkeypatch, fake_server, variable):
    monkeypatch.setenv(variable, "10.0.0.1 50000 10.0.0.2 22")
    monkeypatch.setenv("BROWSER", "w3m")
    assert device_login(fake_server, monkeypatch) == [device_answer()["verification_uri_complete"]]


@pytest.mark.parametrize("variable", SSH_VARIABLES)
def test_ssh_session_without_browser_opens_none(monkeypatch, fake_server, variable):
    use_streams(monkeypatch, TtyStream(), io.StringIO())
    monkeypatch.setenv(variable, "10.0.0.1 50000 10.0.0.2 22")
    monkeypatch.setenv("DISPLAY", ":0")  # X forwarding: the browser would still run remotely
    assert device_login(fake_server, monkeypatch) == []


@linux_only
@pytest.mark.parametrize(("env", "opens"), [
    ({}, False), ({"DISPLAY": ""}, False), ({"DISPLAY": ":0"}, True),
    ({"WAYLAND_DISPLAY": "wayland-0"}, True),
    ({"DISPLAY": ":0", "SSH_CONNECTION": ""}, True),  # an empty SSH variable is not remote
])
def test_linux_opens_a_browser_only_on_a_display(monkeypatch, fake_server, env, opens):
    use_streams(monkeypatch, TtyStream(), io.StringIO())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert bool(device_login(fake_server, monkeypatch)) is opens


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


@pytest.mark.parametrize(("content", "state"), [
    (None, "does not exist"),
    ({"access_token": "a", "expires": 1}, "holds an expired access token and no refresh token"),
    ({"access_token": "a", "expires": 1, "refresh_token": "r", "refresh_expires": 2},
     "holds expired tokens: its refresh token expired at "
     + time.strftime("%Y-%m-%d %H:%M", time.localtime(2))),
])
def test_a_used_up_token_file_refuses_a_login_and_says_why(monkeypatch, fake_server, tmp_path,
                                                          content, state):
    monkeypatch.setenv("BROWSER", "firefox")  # a login would be allowed without the file
    path = tmp_path / "job.json"
    if content is not None:
        path.write_text(json.dumps({"server": fake_server.url, **content}))
        path.chmod(0o600)
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(path))
    message = refusal(fake_server)
    assert f"the token file {path} (OIDC_TOKEN_FILE) {state}" in message
    assert f"--export {path}" in message


def test_a_refused_refresh_token_in_a_token_file_says_so(monkeypatch, fake_server, tmp_path,
                                                         make_token):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**make_token(lifetime=-10), "server": fake_server.url}))
    path.chmod(0o600)
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(path))
    fake_server.reply("POST", "/auth/v2/token", 400, {"error": "invalid_grant"})
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url)
    assert "holds a refresh token that the server refused" in info.value.message
    assert fake_server.hits("/auth/v2/device") == []


# -- containers, as --doctor shows them --------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "shown"), [
    ("APPTAINER_CONTAINER", "/images/x.sif", "Apptainer (APPTAINER_CONTAINER is set)"),
    ("SINGULARITY_CONTAINER", "/images/x.sif", "Singularity (SINGULARITY_CONTAINER is set)"),
    ("KUBERNETES_SERVICE_HOST", "10.0.0.1", "Kubernetes (KUBERNETES_SERVICE_HOST is set)"),
    ("container", "podman", "podman (container is set)"),
])
def test_doctor_names_the_container(monkeypatch, capsys, variable, value, shown):
    for name in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "KUBERNETES_SERVICE_HOST",
                 "container"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    assert oac.main(["--doctor"]) == 0
    assert shown in capsys.readouterr().out
