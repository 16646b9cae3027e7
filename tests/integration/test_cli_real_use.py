"""The command line against the real stack, as people use it: every action that takes a
host with ``--client-id``/``--scope`` on the provider directly, prompts that name the
server, and how long a login may take by default and with ``--timeout``.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time

import pytest

from conftest import REPO
from tests.integration.conftest import PUBLIC_CLIENT_ID, refresh_at_provider

pytestmark = pytest.mark.integration

WHO = ("--client-id", PUBLIC_CLIENT_ID)


def on_terminal(*args: str, limit: float = 60) -> tuple[int, str, str]:
    """Run the CLI with stdin and stderr on a pseudo terminal; (code, stdout, screen)."""
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "py_oidc_auth_client", *args], cwd=REPO,
                            env=env, stdin=slave, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    screen, deadline = b"", time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the terminal closed: the process is gone
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout.decode(), screen.decode("utf-8", "replace")


# -- 7 and 9: every host action with --client-id; prompts name the server ----------------


@pytest.mark.timeout(180)
def test_every_host_action_works_with_client_id(stack, browser, run_cli, tmp_path):
    issuer = stack.issuer
    key = f"{issuer}#client_id={PUBLIC_CLIENT_ID}&scope=offline_access+openid"
    login = run_cli(issuer, *WHO, "--timeout", "30")
    assert login.returncode == 0, login.stderr
    assert f"To log in to {issuer} (client {PUBLIC_CLIENT_ID}), open" in login.stderr
    assert "#client_id" not in login.stderr
    assert login.stdout.startswith(f"Logged in to {issuer} (client {PUBLIC_CLIENT_ID}): ")
    browser.wait_done()

    access = run_cli(issuer, *WHO, "--access-token")
    assert access.returncode == 0, access.stderr
    bearer = {"Authorization": f"Bearer {access.stdout.strip()}"}
    assert stack.protected({"headers": bearer})[0] == 200
    header = run_cli(issuer, *WHO, "--header")
    assert header.stdout == f"Authorization: {bearer['Authorization']}\n"
    shown = run_cli(issuer, *WHO, "--json")
    assert json.loads(shown.stdout)["server"] == key
    assert run_cli(issuer, *WHO, "--access-token", "--min-valid", "60").returncode == 0
    target = tmp_path / "job.json"
    exported = run_cli(issuer, *WHO, "--export", str(target))
    assert exported.returncode == 0, exported.stderr
    assert f"Wrote the token for {issuer} (client {PUBLIC_CLIENT_ID})" in exported.stderr
    refresh = json.loads(target.read_text())["refresh_token"]
    doctor = run_cli("--doctor", issuer, *WHO)
    assert doctor.returncode == 0, doctor.stderr
    assert re.search(rf"cached token:\s+{re.escape(key)}: access token valid", doctor.stdout)

    logout = run_cli("--logout", issuer, *WHO)
    assert logout.returncode == 0, logout.stderr
    assert (f"Logged out of {issuer} (client {PUBLIC_CLIENT_ID}): the server revoked the "
            "token") in logout.stderr
    status, body = refresh_at_provider(stack, refresh)  # the grant is gone at the provider
    assert status == 400 and body["error"] == "invalid_grant", body
    listed = run_cli("--list")
    assert (listed.returncode, listed.stdout) == (0, "")
    assert "No cached tokens" in listed.stderr
    assert browser.launches() == 1  # every action after the login used the cache


@pytest.mark.timeout(180)
def test_scoped_login_logout_and_remove_with_client_id(stack, browser, run_cli):
    issuer = stack.issuer
    scoped = (*WHO, "--scope", "openid profile")
    assert run_cli(issuer, *scoped, "--timeout", "30").returncode == 0
    browser.wait_done()
    logout = run_cli("--logout", issuer, *WHO, "--scope", "profile", "--scope", "openid")
    assert logout.returncode == 0, logout.stderr
    assert "the server revoked the token" in logout.stderr
    assert "No cached tokens" in run_cli("--list").stderr

    assert run_cli(issuer, *scoped, "--timeout", "30").returncode == 0
    browser.wait_done(2)
    removed = run_cli("--remove", issuer, *scoped)
    assert removed.returncode == 0, removed.stderr
    assert "No cached tokens" in run_cli("--list").stderr


# -- 8: how long the command line waits -------------------------------------------------


@pytest.mark.timeout(90)
def test_device_login_waits_as_long_as_the_code_lives(stack, browser):
    browser.set(delay=3)  # the person takes a moment
    code, stdout, screen = on_terminal(stack.host, "--access-token")
    assert code == 0, screen
    assert stack.protected({"headers": {"Authorization": f"Bearer {stdout.strip()}"}})[0] == 200
    # The stack's device codes live 600 s: the countdown starts there, not at 0:30.
    frames = re.findall(r"Waiting for approval\.\.\. (\d+):(\d\d) left", screen)
    assert frames, screen
    assert int(frames[0][0]) * 60 + int(frames[0][1]) >= 590, frames[:3]
    assert f"To log in to {stack.host}, open" in screen


@pytest.mark.timeout(90)
def test_browser_login_waits_minutes_and_names_the_provider(make_stack, browser, run_cli,
                                                            redirect_port):
    stack = make_stack(device=False)  # the provider has no device flow: the code flow
    done = run_cli(stack.issuer, *WHO, "-p", str(redirect_port), "--json")
    assert done.returncode == 0, done.stderr
    assert stack.protected(json.loads(done.stdout))[0] == 200
    assert (f"To log in to {stack.issuer} (client {PUBLIC_CLIENT_ID}) within 5 min, open this "
            "URL in a browser:") in done.stderr
    assert "#client_id" not in done.stderr
    browser.wait_done()
    assert browser.events("callback")


@pytest.mark.timeout(60)
def test_timeout_ends_the_wait_and_names_the_option(stack, browser, run_cli):
    browser.set(action="ignore")  # nobody approves
    start = time.monotonic()
    done = run_cli(stack.host, "--timeout", "3")
    assert 2.5 <= time.monotonic() - start < 15
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("oidc-auth: error:")]
    assert len(errors) == 1, done.stderr
    assert "--timeout SECONDS" in errors[0]
    assert "Traceback" not in done.stderr

