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


@pytest.mark.timeout(120)
def test_cli_export_then_batch_jobs_refresh_the_file_against_the_real_stack(
    make_stack, browser, run_cli, expire, monkeypatch, tmp_path
):
    stack = make_stack(access_ttl=4)  # rotating refresh tokens, as oidc-provider does
    target = tmp_path / "jobs" / "token.json"
    done = run_cli(stack.host, "--export", str(target), "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert f"export OIDC_TOKEN_FILE={target}" in done.stderr
    exported = json.loads(target.read_text())
    assert exported["refresh_token"]
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    browser.wait_done()

    # The jobs: no terminal, a Slurm job id, the token file; the browser must not be used.
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(target))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    expire(exported)
    stack.reset_requests()
    job = run_cli(stack.host, "--access-token")
    assert job.returncode == 0, job.stderr
    access = job.stdout.strip()
    assert access != exported["access_token"]
    assert [(r["method"], r["path"]) for r in stack.requests()] == [("POST", "/auth/v2/token")]
    assert stack.protected({"headers": {"Authorization": f"Bearer {access}"}})[0] == 200
    refreshed = json.loads(target.read_text())  # refreshed in place, the rotated token kept
    assert refreshed["access_token"] == access
    assert refreshed["refresh_token"] not in ("", exported["refresh_token"])
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert browser.launches() == 1

    # A job that needs the login to last a year refuses to start (exit 3).
    refused = run_cli(stack.host, "--access-token", "--min-valid", str(365 * 86400))
    assert refused.returncode == 3, refused.stderr
    assert refused.stdout == ""
    assert "--min-valid" in refused.stderr

    # Revoked at the provider: the next job fails at once and names the file.
    stack.revoke(json.loads(target.read_text())["refresh_token"])
    expire(json.loads(target.read_text()))
    dead = run_cli(stack.host, "--access-token")
    assert dead.returncode == 1
    assert str(target) in dead.stderr
    assert "refused" in dead.stderr
    assert "Traceback" not in dead.stderr
    assert browser.launches() == 1
