"""Security of the token store and token files, each attack performed for real.

Real local HTTP servers record what they are sent; second processes (some as the
user ``nobody``, standing in for another user of a shared login node) read, write
and attack the files.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import FakeServer, _handler, make_jwt, token_answer
from tests import oac

REPO = Path(__file__).resolve().parents[1]
TOKEN = "/auth/v2/token"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files and users")


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def unrelated() -> Iterator[FakeServer]:
    """A second real server, unrelated to the token file: it records whatever reaches it."""
    fake = FakeServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    fake.reply("POST", TOKEN, 200, token_answer(refresh="refresh-of-the-unrelated-host"))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield fake
    server.shutdown()
    server.server_close()


def cli(*args: str, env: dict[str, str] | None = None,
        user: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line in a second process (as *user* when given)."""
    return subprocess.run([sys.executable, "-m", "py_oidc_auth_client", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, user=user)


def python(code: str, *args: str, env: dict[str, str] | None = None,
           user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run *code* with this module in a second process (as *user* when given)."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, user=user)


def token(lifetime: int = 3600, refresh: str = "refresh-1",
          refresh_lifetime: int = 86400) -> oac.Token:
    now = int(time.time())
    return oac._token(make_jwt(lifetime, now), "Bearer", now + lifetime, refresh,
                      now + refresh_lifetime, "openid")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(obj))
    path.chmod(0o600)


# -- 1. A token file belongs to one server ---------------------------------------------------


def test_token_file_of_another_server_is_refused_and_nothing_is_sent(
        fake_server, unrelated, tmp_path, monkeypatch):
    # The workstation exports a token for its server, with the real command line.
    oac.TokenStore(app_name="py-oidc-auth").put(fake_server.url,
                                                token(refresh="refresh-of-the-right-host"))
    target = tmp_path / "job" / "token.json"
    done = cli(fake_server.url, "--export", str(target))
    assert done.returncode == 0, done.stderr
    assert json.loads(target.read_text())["server"] == fake_server.url
    # Hours later the access token has expired: a refresh would be the next step.
    on_file = json.loads(target.read_text())
    on_file["expires"] = int(time.time()) - 60
    target.write_text(json.dumps(on_file))
    before = target.read_bytes()
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(target))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for call in (lambda: oac.authenticate(unrelated.url),
                 lambda: oac.DeviceFlow(unrelated.url).token):
        with pytest.raises(oac.AuthError) as caught:
            call()
        message = caught.value.message
        assert str(target) in message
        assert f"issued for {fake_server.url}, not for {unrelated.url}" in message
        assert f"oidc-auth {unrelated.url} --export FILE" in message
        assert "refresh-of-the-right-host" not in message
    # A fresh access token is not handed out for the wrong server either.
    on_file["expires"] = int(time.time()) + 3600
    target.write_text(json.dumps(on_file))
    before = target.read_bytes()
    with pytest.raises(oac.AuthError, match="not for"):
        oac.authenticate(unrelated.url)
    # The command line in a job: one clean error, nothing printed on stdout.
    done = cli(unrelated.url, "--json", env={"OIDC_TOKEN_FILE": str(target)})
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert f"{target} was issued for {fake_server.url}, not for {unrelated.url}" in done.stderr
    assert unrelated.requests == []  # the unrelated host received nothing at all
    assert fake_server.requests == []
    assert target.read_bytes() == before  # and the file was not overwritten


def test_token_file_that_names_no_server_is_refused_with_the_fix(unrelated, tmp_path,
                                                                 monkeypatch):
    # An older export or a hand-made file: it could belong to any server, so none gets it.
    target = tmp_path / "old-export.json"
    old = token(lifetime=-60, refresh="refresh-of-an-old-export")
    write_json(target, old)
    before = target.read_bytes()
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(target))
    with pytest.raises(oac.AuthError) as caught:
        oac.authenticate(unrelated.url)
    message = caught.value.message
    assert f"{target} does not say which server" in message
    assert f"oidc-auth {unrelated.url} --export FILE" in message
    assert f'"server": "{unrelated.url}"' in message
    # The reference client's wrapped form, without a server: the same refusal.
    write_json(target, {"token": old, "stored_at": time.time()})
    done = cli(unrelated.url, "--json", env={"OIDC_TOKEN_FILE": str(target)})
    assert done.returncode == 1 and "does not say which server" in done.stderr
    assert "Traceback" not in done.stderr
    assert unrelated.requests == []
    write_json(target, old)
    assert target.read_bytes() == before


def test_reference_client_token_file_with_a_server_is_migrated(fake_server, tmp_path,
                                                               monkeypatch):
    # {"token": ..., "stored_at": ...} plus the "server" the user added: used, and the
    # refresh writes it in this module's form, keeping the binding.
    target = tmp_path / "token.json"
    write_json(target, {"server": fake_server.url + "/", "stored_at": time.time(),
                        "token": token(lifetime=-60, refresh="refresh-ref")})
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(target))
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh="refresh-ref-2"))
    got = oac.authenticate(fake_server.url)
    assert got["refresh_token"] == "refresh-ref-2"
    (hit,) = fake_server.hits(TOKEN)
    assert hit.form["refresh-token"] == "refresh-ref"
    on_file = json.loads(target.read_text())
    assert on_file["server"] == fake_server.url
    assert on_file["refresh_token"] == "refresh-ref-2"
    assert "token" not in on_file


def test_batch_job_for_the_right_server_refreshes_in_place_and_keeps_the_binding(
        fake_server, unrelated, tmp_path):
    oac.TokenStore(app_name="py-oidc-auth").put(fake_server.url, token(lifetime=3600))
    target = tmp_path / "token.json"
    assert cli(fake_server.url, "--export", str(target)).returncode == 0
    on_file = json.loads(target.read_text())
    on_file["expires"] = int(time.time()) - 60
    target.write_text(json.dumps(on_file))
    answer = token_answer(refresh="refresh-rotated")
    fake_server.reply("POST", TOKEN, 200, answer)
    done = cli(fake_server.url, "--json", "--show-secrets",
               env={"OIDC_TOKEN_FILE": str(target), "SLURM_JOB_ID": "1"})
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["refresh_token"] == "refresh-rotated"
    assert printed["server"] == fake_server.url
    on_file = json.loads(target.read_text())
    assert on_file == printed  # refreshed in place, the "server" field kept
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # The refreshed file is still refused for another server.
    done = cli(unrelated.url, "--json", env={"OIDC_TOKEN_FILE": str(target)})
    assert done.returncode == 1 and "not for" in done.stderr
    assert unrelated.requests == []
