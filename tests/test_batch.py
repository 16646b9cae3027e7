"""Batch-job handoff: ``--export FILE`` on a workstation, ``OIDC_TOKEN_FILE=FILE`` in the job.

Everything runs as real processes against the local fake server: the CLI that
exports, and job processes (with ``SLURM_JOB_ID`` set) that call
``authenticate()`` and refresh the file in place under its lock.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    LOGIN_ALLOWED,
    REPO,
    TOKEN,
    cli,
    default_store,
    error_lines,
    make_jwt,
    token_answer,
)
from conftest import bare_device_answer as device_answer
from tests import oac

# What a batch job does: get a token through the library, print a fingerprint of it.
JOB = """
import json, sys
sys.path.insert(0, sys.argv[2])
import py_oidc_auth_client as oac
try:
    token = oac.authenticate(sys.argv[1])
except oac.AuthError as exc:
    print(exc.message, file=sys.stderr)
    sys.exit(1)
print(json.dumps({"access": token["access_token"], "refresh": token["refresh_token"]}))
"""


def job(host: str, token_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run one job process the way a scheduler would: no terminal, SLURM_JOB_ID set."""
    full = {**os.environ, "OIDC_TOKEN_FILE": str(token_file), "SLURM_JOB_ID": "4242", **env}
    return subprocess.run([sys.executable, "-c", JOB, host, str(REPO)], env=full,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def bearer(access: str, expires: int, refresh: str, refresh_expires: int) -> oac.Token:
    """A `Token` with every documented field."""
    return {"access_token": access, "token_type": "Bearer", "expires": expires,
            "refresh_token": refresh, "refresh_expires": refresh_expires, "scope": "openid",
            "headers": {"Authorization": f"Bearer {access}"}}


def short_lived(lifetime: int, refresh: str = "refresh-1",
                refresh_lifetime: int = 86400) -> oac.Token:
    """A token whose access part lives *lifetime* seconds from now (JWT iat/exp agree)."""
    now = int(time.time())
    return bearer(make_jwt(lifetime, now), now + lifetime, refresh, now + refresh_lifetime)


def dead_token() -> oac.Token:
    now = int(time.time())
    return bearer(make_jwt(3600, now - 7200), now - 3600, "refresh-dead", now - 60)


# ---------------------------------------------------------------------------
# --export
# ---------------------------------------------------------------------------

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@posix_only
def test_export_writes_a_private_token_file(fake_server, make_token, tmp_path):
    token = make_token(refresh="refresh-secret-1")
    default_store().put(fake_server.url, token)
    target = tmp_path / "new-folder" / "job-token.json"
    proc = subprocess.run(  # umask 0: the file must be private anyway
        [sys.executable, "-m", "py_oidc_auth_client", fake_server.url, "--export", str(target)],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the result is the file; the note goes to stderr
    assert f"export OIDC_TOKEN_FILE={target}" in proc.stderr
    assert "refresh-secret-1" not in proc.stderr
    assert mode(target) == 0o600
    assert mode(target.parent) == 0o700  # the folder it had to create
    assert json.loads(target.read_text()) == {"server": fake_server.url, **token}
    # The same object that --json --show-secrets prints, so a hand-copied one works too.
    shown = cli(fake_server.url, "--json", "--show-secrets")
    assert json.loads(shown.stdout) == json.loads(target.read_text())
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "job-token.json", "job-token.json.lock"]  # no temp file left behind
    assert fake_server.requests == []


@posix_only
def test_export_replaces_a_file_atomically_and_keeps_it_private(fake_server, make_token,
                                                                 tmp_path):
    target = tmp_path / "job-token.json"
    target.write_text("old contents")
    target.chmod(0o644)
    token = make_token()
    default_store().put(fake_server.url, token)
    before = target.stat().st_ino
    proc = cli(fake_server.url, "--export", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.stat().st_ino != before  # a new file renamed over the old one
    assert mode(target) == 0o600
    assert json.loads(target.read_text()) == {"server": fake_server.url, **token}


def test_export_refuses_the_cache_itself(fake_server, make_token):
    default_store().put(fake_server.url, make_token())
    proc = cli(fake_server.url, "--export", default_store().path)
    assert proc.returncode == 2
    assert "token cache itself" in proc.stderr
    assert default_store().hosts() == [fake_server.url]


def test_export_into_an_unwritable_place_is_one_clean_error(fake_server, make_token, tmp_path):
    default_store().put(fake_server.url, make_token())
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = cli(fake_server.url, "--export", str(blocker / "token.json"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(blocker) in line


@pytest.mark.timeout(30)
def test_export_after_a_login(fake_server, tmp_path):
    fake_server.reply("POST", "/auth/v2/device", 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh="refresh-new"))
    target = tmp_path / "job-token.json"
    proc = cli(fake_server.url, "--export", str(target), env=LOGIN_ALLOWED)
    assert proc.returncode == 0, proc.stderr
    assert "ABCD-EFGH" in proc.stderr
    assert json.loads(target.read_text())["refresh_token"] == "refresh-new"


# ---------------------------------------------------------------------------
# The job side: OIDC_TOKEN_FILE with SLURM_JOB_ID
# ---------------------------------------------------------------------------


@posix_only
@pytest.mark.timeout(60)
def test_export_then_jobs_use_and_refresh_the_file_in_place(fake_server, tmp_path):
    # Workstation: a token whose access part is about to expire.  It counts as valid for
    # half its life: 8 s leave the export and the first job time on a loaded machine.
    default_store().put(fake_server.url, short_lived(16, refresh="refresh-1"))
    target = tmp_path / "job-token.json"
    assert cli(fake_server.url, "--export", str(target)).returncode == 0
    exported = json.loads(target.read_text())

    # A job while the access token is valid: no request at all.
    first = job(fake_server.url, target)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"access": exported["access_token"],
                                        "refresh": "refresh-1"}
    assert fake_server.requests == []

    # Later jobs, after it expired: one refreshes the file in place (rotated refresh
    # token), the next one just reads it.
    time.sleep(max(0.0, exported["expires"] - time.time()) + 0.2)
    answer = token_answer(refresh="refresh-2")
    fake_server.reply("POST", TOKEN, 200, answer)
    second = job(fake_server.url, target)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"access": answer["access_token"], "refresh": "refresh-2"}
    (hit,) = fake_server.hits(TOKEN)
    assert hit.form == {"refresh-token": "refresh-1", "grant_type": "refresh-token"}
    on_disk = json.loads(target.read_text())
    assert (on_disk["access_token"], on_disk["refresh_token"]) == (answer["access_token"],
                                                                   "refresh-2")
    assert mode(target) == 0o600
    third = job(fake_server.url, target)
    assert json.loads(third.stdout)["access"] == answer["access_token"]
    assert len(fake_server.hits(TOKEN)) == 1
    # The workstation's cache is a separate copy, untouched by the jobs.
    assert default_store().get(fake_server.url)["refresh_token"] == "refresh-1"


@posix_only
@pytest.mark.timeout(60)
def test_many_jobs_starting_at_once_refresh_once(fake_server, tmp_path):
    target = tmp_path / "job-token.json"
    expired = short_lived(-30, refresh="refresh-1")
    target.write_text(json.dumps({"server": fake_server.url, **expired}))
    target.chmod(0o600)
    answer = token_answer(refresh="refresh-2")

    def slow(req: Any) -> tuple[int, dict[str, str], Any]:
        time.sleep(0.5)  # a slow server widens the window for a double refresh
        if req.form.get("refresh-token") != "refresh-1":
            return 400, {}, {"error": "invalid_grant"}  # a reused, rotated refresh token
        return 200, {}, answer

    fake_server.reply("POST", TOKEN, 200, slow)
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(job(fake_server.url, target)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert {json.loads(r.stdout)["access"] for r in results} == {answer["access_token"]}
    assert len(fake_server.hits(TOKEN)) == 1
    assert json.loads(target.read_text())["refresh_token"] == "refresh-2"


@pytest.mark.timeout(30)
def test_a_hand_copied_json_show_secrets_output_works_as_token_file(fake_server, make_token,
                                                                    tmp_path):
    default_store().put(fake_server.url, make_token())
    shown = cli(fake_server.url, "--json", "--show-secrets")
    target = tmp_path / "copied.json"
    target.write_text(shown.stdout)
    target.chmod(0o600)
    done = job(fake_server.url, target)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["access"] == json.loads(shown.stdout)["access_token"]


@pytest.mark.timeout(20)
def test_dead_token_file_fails_fast_naming_the_file(fake_server, tmp_path):
    target = tmp_path / "job-token.json"
    target.write_text(json.dumps({"server": fake_server.url, **dead_token()}))
    target.chmod(0o600)
    before = target.read_text()
    start = time.monotonic()
    done = job(fake_server.url, target, BROWSER="true")  # even where a login could start
    assert time.monotonic() - start < 5
    assert done.returncode == 1
    message = done.stderr.strip()
    assert str(target) in message
    assert "OIDC_TOKEN_FILE" in message
    assert "expired" in message
    assert f"--export {target}" in message  # says how to make a new one
    assert fake_server.requests == []
    assert target.read_text() == before  # the user's file is left as it was


@pytest.mark.timeout(20)
def test_dead_token_file_in_the_cli_is_one_clean_error(fake_server, tmp_path):
    target = tmp_path / "job-token.json"
    target.write_text(json.dumps({"server": fake_server.url, **dead_token()}))
    proc = cli(fake_server.url, "--access-token",
               env={"OIDC_TOKEN_FILE": str(target), "SLURM_JOB_ID": "1", **LOGIN_ALLOWED})
    assert proc.returncode == 1
    assert proc.stdout == ""
    (line,) = error_lines(proc.stderr)
    assert str(target) in line
    assert fake_server.requests == []


@pytest.mark.timeout(20)
def test_refused_refresh_in_a_token_file_fails_naming_the_file(fake_server, tmp_path):
    target = tmp_path / "job-token.json"
    target.write_text(json.dumps({"server": fake_server.url, **short_lived(-30)}))
    fake_server.reply("POST", TOKEN, 400, {"error": "invalid_grant"})
    done = job(fake_server.url, target)
    assert done.returncode == 1
    assert str(target) in done.stderr
    assert "refused" in done.stderr
    assert len(fake_server.hits(TOKEN)) == 1
    assert target.exists()  # the user's file is never deleted


def test_missing_token_file_says_so(fake_server, tmp_path):
    target = tmp_path / "nope.json"
    done = job(fake_server.url, target)
    assert done.returncode == 1
    assert f"{target} (OIDC_TOKEN_FILE) does not exist" in done.stderr
    assert fake_server.requests == []


def test_token_file_never_prompts_even_where_a_login_could_start(fake_server, tmp_path,
                                                                 monkeypatch):
    target = tmp_path / "job-token.json"
    target.write_text(json.dumps({"server": fake_server.url, **dead_token()}))
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(target))
    monkeypatch.setenv("BROWSER", "true")  # not a batch job, and a login would be allowed
    fake_server.reply("POST", "/auth/v2/device", 200, device_answer())
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url)
    assert str(target) in info.value.message
    assert info.value.error == "login_required"
    assert fake_server.requests == []


@pytest.mark.timeout(20)
def test_force_logs_in_into_the_token_file(fake_server, tmp_path, monkeypatch):
    # The recipe for a job with a login of its own: OIDC_TOKEN_FILE=FILE oidc-auth HOST --force
    target = tmp_path / "own-grant.json"
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(target))
    monkeypatch.setenv("BROWSER", "true")
    fake_server.reply("POST", "/auth/v2/device", 200, device_answer(interval=1))
    answer = token_answer(refresh="refresh-own")
    fake_server.reply("POST", TOKEN, 200, answer)
    token = oac.authenticate(fake_server.url, force=True, timeout=10)
    assert token["access_token"] == answer["access_token"]
    assert json.loads(target.read_text())["refresh_token"] == "refresh-own"
    assert default_store().hosts() == []


# ---------------------------------------------------------------------------
# --min-valid
# ---------------------------------------------------------------------------


def test_min_valid_met_needs_no_request(fake_server, make_token):
    default_store().put(fake_server.url, make_token(lifetime=3600, refresh_lifetime=86400))
    proc = cli(fake_server.url, "--min-valid", "3000")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Logged in to {fake_server.url}")
    proc = cli(fake_server.url, "--min-valid", "36000")  # the refresh token counts
    assert proc.returncode == 0, proc.stderr
    assert fake_server.requests == []


def test_min_valid_refreshes_when_that_helps(fake_server):
    default_store().put(fake_server.url,
                        short_lived(300, refresh="refresh-1", refresh_lifetime=600))
    answer = token_answer(lifetime=3600, refresh="refresh-2", refresh_lifetime=86400)
    fake_server.reply("POST", TOKEN, 200, answer)
    proc = cli(fake_server.url, "--access-token", "--min-valid", "1800")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == answer["access_token"] + "\n"
    assert len(fake_server.hits(TOKEN)) == 1
    assert default_store().get(fake_server.url)["refresh_token"] == "refresh-2"


def test_min_valid_not_met_even_after_a_refresh_exits_3(fake_server):
    default_store().put(fake_server.url, short_lived(600, refresh="refresh-1"))
    answer = token_answer(lifetime=900, refresh=None)  # the server grants 15 min
    fake_server.reply("POST", TOKEN, 200, answer)
    proc = cli(fake_server.url, "--access-token", "--min-valid", "3600")
    assert proc.returncode == 3
    assert proc.stdout == ""  # a job script gets no token to start with
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "access token" in line
    assert "even after a refresh" in line
    assert "--min-valid 3600" in line
    assert len(fake_server.hits(TOKEN)) == 1


@pytest.mark.timeout(20)
def test_min_valid_in_a_job_with_a_token_file_names_the_refresh_token(fake_server, tmp_path):
    target = tmp_path / "job-token.json"
    target.write_text(json.dumps({"server": fake_server.url,
                                  **short_lived(300, refresh_lifetime=1200)}))
    fake_server.reply("POST", TOKEN, 200, token_answer(lifetime=900, refresh=None))
    proc = cli(fake_server.url, "--min-valid", "7200",
               env={"OIDC_TOKEN_FILE": str(target), "SLURM_JOB_ID": "1"})
    assert proc.returncode == 3
    (line,) = error_lines(proc.stderr)
    assert "refresh token" in line
    assert "expires in 19 min" in line or "expires in 20 min" in line
    assert f"--export {target}" in line
    # The refresh attempt went into the file, in place.
    assert json.loads(target.read_text())["expires"] > time.time() + 800


def test_min_valid_must_not_be_negative(fake_server):
    proc = cli(fake_server.url, "--min-valid", "-5")
    assert proc.returncode == 2
    assert "--min-valid" in proc.stderr
    assert fake_server.requests == []
