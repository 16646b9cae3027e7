"""The command line, end to end: ``python -m py_oidc_auth_client`` against the stack."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.timeout(90)
def test_cli_json_list_and_remove(stack, browser, run_cli):
    done = run_cli(stack.host, "--json", "--show-secrets", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert stack.protected(token)[0] == 200
    assert token["refresh_token"]  # --show-secrets: the whole token
    assert "Traceback" not in done.stderr
    assert stack.issuer + "/device" in done.stderr  # the prompt went to stderr
    assert token["access_token"] not in done.stderr
    assert token["refresh_token"] not in done.stderr
    browser.wait_done()
    assert not browser.errors()

    stack.reset_requests()
    again = run_cli(stack.host, "--json")
    assert again.returncode == 0, again.stderr
    shown = json.loads(again.stdout)
    assert "refresh_token" not in shown  # plain --json keeps the refresh token private
    assert shown == {k: v for k, v in token.items() if k != "refresh_token"}
    assert stack.requests() == []  # answered from the cache

    listed = run_cli("--list")
    assert listed.returncode == 0, listed.stderr
    assert stack.host in listed.stdout
    assert token["access_token"] not in listed.stdout + listed.stderr

    removed = run_cli("--remove", stack.host)
    assert removed.returncode == 0, removed.stderr
    listed = run_cli("--list")
    assert listed.returncode == 0, listed.stderr
    assert stack.host not in listed.stdout


@pytest.mark.timeout(60)
def test_cli_failed_login_exits_1_with_one_line_and_no_traceback(stack, browser, run_cli):
    browser.set(action="deny")
    done = run_cli(stack.host, "--timeout", "30")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "denied" in last.lower(), done.stderr
    assert stack.host in last
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [last], done.stderr


@pytest.mark.timeout(30)
def test_cli_without_a_host_is_a_usage_error(run_cli):
    done = run_cli()
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
