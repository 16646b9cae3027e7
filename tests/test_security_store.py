"""Security of the token store and token files, each attack performed for real.

Real local HTTP servers record what they are sent; second processes (some as the
user ``nobody``, standing in for another user of a shared login node) read, write
and attack the files.
"""

from __future__ import annotations

import asyncio
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

from conftest import REPO, TOKEN, FakeServer, _handler, make_jwt, token_answer
from tests import oac

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


# -- 13. Set-aside corrupt stores are not a second token store --------------------------------


def test_good_entries_are_salvaged_and_only_the_unreadable_part_kept_aside(isolated_env):
    store = oac.TokenStore(app_name="py-oidc-auth")
    path = Path(store.path)
    good = {f"https://good{i}.example.com": dict(token(refresh=f"refresh-good-{i}"))
            for i in range(3)}
    rounds = 5
    for round_ in range(rounds):
        bad = {"https://bad.example.com": {"access_token": 5, "expires": round_,
                                           "refresh_token": f"refresh-bad-{round_}"}}
        write_json(path, {**good, **bad})
        # A second process reads the store and repairs it.
        done = python("import json, py_oidc_auth_client as oac\n"
                      "print(json.dumps(oac.TokenStore(app_name='py-oidc-auth').hosts()))")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == sorted(good)
        assert "set the unreadable part aside in" in done.stderr  # the warning names it
        time.sleep(0.02)
    live = json.loads(path.read_text())
    assert sorted(live) == sorted(good)  # every good refresh token stays in the live store
    assert [live[h]["refresh_token"] for h in sorted(good)] == [
        f"refresh-good-{i}" for i in range(3)]
    copies = sorted(path.parent.glob(path.name + ".corrupt-*"))
    assert len(copies) == 3  # capped: the oldest were removed
    for copy in copies:
        text = copy.read_text()
        assert "refresh-good-" not in text  # no good token in a copy
        assert "refresh-bad-" in text
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert any("refresh-bad-4" in c.read_text() for c in copies)  # the newest is kept
    assert not any("refresh-bad-0" in c.read_text() for c in copies)
    # --clear removes the live tokens and the copies.
    done = cli("--clear")
    assert done.returncode == 0, done.stderr
    assert sorted(path.parent.glob(path.name + ".corrupt-*")) == []
    assert oac.TokenStore(app_name="py-oidc-auth").hosts() == []


# -- 14. No link followed, every folder private ---------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder another user (nobody) can reach, like a shared scratch file system."""
    import shutil
    import tempfile

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        print("skipped: planting files as another user needs root (the tests run as root in CI)")
        pytest.skip("needs root to act as the user nobody")
    folder = Path(tempfile.mkdtemp(prefix="oidc-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_nobody(*command: str) -> None:
    subprocess.run(command, check=True, user="nobody", capture_output=True, timeout=30)


@posix_only
def test_folders_made_under_umask_000_are_all_private(tmp_path):
    nested = tmp_path / "a" / "b" / "c" / "tokens.json"
    export = tmp_path / "x" / "y" / "job.json"
    code = ("import os, sys, time\n"
            "import py_oidc_auth_client as oac\n"
            "os.umask(0)\n"
            "now = int(time.time())\n"
            "tok = oac._token('acc', 'Bearer', now + 600, 'ref', now + 6000, '')\n"
            "oac.TokenStore(sys.argv[1]).put('https://a.example.com', tok)\n"
            "oac._export(sys.argv[2], 'https://a.example.com', tok, oac.TokenStore(sys.argv[1]))\n")
    done = python(code, str(nested), str(export))
    assert done.returncode == 0, done.stderr
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c",
                       tmp_path / "x", tmp_path / "x" / "y")}
    assert set(modes.values()) == {"0o700"}, modes
    assert stat.S_IMODE(nested.stat().st_mode) == 0o600
    assert stat.S_IMODE(export.stat().st_mode) == 0o600


@posix_only
@pytest.mark.parametrize("planted", ["lock", "store"])
def test_a_planted_link_at_the_lock_or_store_path_is_never_followed(shared_dir, tmp_path,
                                                                    planted):
    victim = tmp_path / "victim.txt"  # a file of the user's that the link points at
    victim.write_text("precious")
    never = tmp_path / "never-created"  # and a name the attacker wants us to create
    folder = shared_dir / "cache"
    folder.mkdir()
    folder.chmod(0o777)  # loose for a while: another user plants links meanwhile
    store_path = folder / "tokens.json"
    if planted == "lock":
        as_nobody("ln", "-s", str(never), str(store_path) + ".lock")
    else:
        as_nobody("ln", "-s", str(victim), str(store_path))
    folder.chmod(0o700)  # the user tightens the folder; the links stay
    store = oac.TokenStore(store_path)
    with pytest.raises(oac.AuthError) as caught:
        store.put("https://a.example.com", token())
    assert "is a symbolic link" in caught.value.message
    assert "Traceback" not in caught.value.message
    assert victim.read_text() == "precious"
    assert not never.exists()
    if planted == "store":
        with pytest.raises(oac.AuthError, match="symbolic link"):
            store.get("https://a.example.com")
        assert victim.read_text() == "precious"
        assert os.path.islink(store_path)  # not moved aside as "corrupt" either


@posix_only
def test_a_planted_link_at_the_temp_path_is_skipped(shared_dir, tmp_path, monkeypatch):
    import tempfile

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = shared_dir / "cache"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    store_path = folder / "tokens.json"
    # The attacker guessed the next temp name (here: we make the guess come true).
    as_nobody("ln", "-s", str(victim), str(folder / ".tokens.json.guessed.tmp"))
    folder.chmod(0o700)
    names = iter(["guessed", "fresh"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    oac.TokenStore(store_path).put("https://a.example.com", token(refresh="refresh-x"))
    assert victim.read_text() == "precious"
    assert os.path.islink(folder / ".tokens.json.guessed.tmp")
    assert json.loads(store_path.read_text())["https://a.example.com"]["refresh_token"] == (
        "refresh-x")


@posix_only
def test_a_planted_link_at_the_aside_path_is_never_written_through(shared_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = shared_dir / "cache"
    folder.mkdir()
    folder.chmod(0o777)
    store_path = folder / "tokens.json"
    write_json(store_path, {"https://good.example.com": dict(token(refresh="refresh-good")),
                            "https://bad.example.com": "not a token"})
    # The aside name is predictable (time and pid): plant links for the next seconds.
    now = time.time()
    for ahead in range(4):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now + ahead))
        as_nobody("ln", "-s", str(victim), f"{store_path}.corrupt-{stamp}-{os.getpid()}")
    folder.chmod(0o700)
    store = oac.TokenStore(store_path)
    assert store.get("https://good.example.com")["refresh_token"] == "refresh-good"
    assert victim.read_text() == "precious"
    written = [p for p in folder.glob("tokens.json.corrupt-*") if not p.is_symlink()]
    assert len(written) == 1
    assert json.loads(written[0].read_text()) == {"https://bad.example.com": "not a token"}


@posix_only
@pytest.mark.parametrize("how", ["world-writable", "owned-by-nobody"])
def test_a_store_folder_another_user_controls_is_refused(shared_dir, how):
    folder = shared_dir / "py-oidc-auth"
    folder.mkdir()
    if how == "world-writable":
        folder.chmod(0o777)
    else:
        folder.chmod(0o700)
        os.chown(folder, 65534, 65534)
    store = oac.TokenStore(folder / "tokens.json")
    with pytest.raises(oac.AuthError) as caught:
        store.put("https://a.example.com", token(refresh="refresh-secret"))
    message = caught.value.message
    assert str(folder) in message
    assert ("can be written by other users (mode 0777)" if how == "world-writable"
            else "belongs to another user (uid 65534)") in message
    assert list(folder.iterdir()) == []  # nothing written there
    # The command line: one clean error and exit code 1.
    done = cli("--clear", env={"XDG_CACHE_HOME": str(shared_dir)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: The folder {folder} " in done.stderr
    assert list(folder.iterdir()) == []


# -- 11. A refreshed token is never lost when the store cannot be written ---------------------


def victim_python() -> str:
    """A Python the user nobody may run (this one may live in root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            done = subprocess.run([candidate, "-c", "pass"], user="nobody",
                                  capture_output=True, timeout=30, check=False)
        except OSError:
            continue
        if done.returncode == 0:
            return candidate
    print("skipped: no Python that the user nobody may run")
    pytest.skip("no Python runnable by nobody")


@pytest.fixture
def unwritable_token_file(shared_dir, fake_server) -> Iterator[tuple[Path, Path, str]]:
    """A token file nobody can read and lock but not replace: its folder is root's, 0755."""
    python_ = victim_python()
    folder = shared_dir / "job"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    target = folder / "token.json"
    old = dict(token(lifetime=-60, refresh="refresh-1"))
    write_json(target, {"server": fake_server.url, **old})
    lock = folder / "token.json.lock"
    lock.touch(mode=0o600)
    for path in (target, lock):
        os.chown(path, 65534, 65534)
    yield target, folder, python_


def rotating(fake_server: FakeServer, lifetime: int) -> None:
    """The token route rotates refresh tokens and refuses a used one (as Keycloak can)."""
    state = {"current": "refresh-1", "n": 1}

    def answer(req: Any) -> tuple[int, dict[str, str], Any]:
        if req.form.get("refresh-token") != state["current"]:
            return 400, {}, {"detail": 'Upstream OIDC error: {"error": "invalid_grant"}'}
        state["n"] += 1
        state["current"] = f"refresh-{state['n']}"
        return 200, {}, token_answer(lifetime=lifetime, refresh=state["current"])

    fake_server.reply("POST", TOKEN, 200, answer)


VICTIM = """
import json, sys, time
import py_oidc_auth_client as oac
first = oac.authenticate(sys.argv[1])
again = oac.DeviceFlow(sys.argv[1]).token
time.sleep(float(sys.argv[2]))
second = oac.authenticate(sys.argv[1])
print(json.dumps([first["refresh_token"], again["refresh_token"], second["refresh_token"]]))
"""


@posix_only
@pytest.mark.timeout(60)
def test_refresh_with_an_unwritable_token_file_keeps_the_rotated_token(
        unwritable_token_file, fake_server):
    target, folder, python_ = unwritable_token_file
    before = target.read_bytes()
    rotating(fake_server, lifetime=4)  # valid for 2 s (half the lifetime is the margin)
    done = subprocess.run([python_, "-c", VICTIM, fake_server.url, "2.5"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "OIDC_TOKEN_FILE": str(target), "SLURM_JOB_ID": "1"},
                          user="nobody", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The caller got the new token, later calls in the process still had the rotated
    # refresh token, and the second refresh sent it (the server refuses a used one).
    assert json.loads(done.stdout) == ["refresh-2", "refresh-2", "refresh-3"]
    assert [hit.form["refresh-token"] for hit in fake_server.hits(TOKEN)] == [
        "refresh-1", "refresh-2"]
    # Without any logging set up, the warning reached stderr, naming file and OS error.
    assert f"could not be saved to {target}" in done.stderr
    assert "Permission denied" in done.stderr
    assert "Traceback" not in done.stderr
    assert "refresh-2" not in done.stderr
    assert target.read_bytes() == before  # really not written
    assert sorted(p.name for p in folder.iterdir()) == ["token.json", "token.json.lock"]


@posix_only
@pytest.mark.timeout(60)
def test_the_cli_prints_the_refreshed_token_and_says_it_was_not_saved(
        unwritable_token_file, fake_server):
    target, _, python_ = unwritable_token_file
    rotating(fake_server, lifetime=3600)
    done = subprocess.run([python_, "-m", "py_oidc_auth_client", fake_server.url, "--json",
                           "--show-secrets"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "OIDC_TOKEN_FILE": str(target)},
                          user="nobody", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["refresh_token"] == "refresh-2"
    assert done.stderr.startswith("oidc-auth: The new token for ")
    assert f"could not be saved to {target}" in done.stderr
    assert "Permission denied" in done.stderr


@pytest.mark.timeout(30)
def test_a_login_token_is_returned_when_the_store_refuses_it(fake_server, shared_dir,
                                                             monkeypatch, caplog):
    # A store folder another user can write to is refused (item 14): the login the
    # user just finished must not be thrown away for it.
    loose = shared_dir / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    store = oac.TokenStore(loose / "tokens.json")
    fake_server.reply("POST", "/auth/v2/device", 200, {
        "device_code": "dev-1", "user_code": "ABCD-EFGH", "expires_in": 600, "interval": 1,
        "verification_uri": "https://idp.example/device"})
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh="refresh-login"))
    monkeypatch.setenv("BROWSER", "true")
    got = oac.authenticate(fake_server.url, store=store, timeout=20)
    assert got["refresh_token"] == "refresh-login"
    assert f"could not be saved to {loose / 'tokens.json'}" in caplog.text
    assert "can be written by other users" in caplog.text
    assert store.get(fake_server.url)["refresh_token"] == "refresh-login"  # kept in process
    assert list(loose.iterdir()) == []


@pytest.mark.timeout(30)
def test_a_kept_token_is_saved_by_the_next_write_that_works(fake_server, shared_dir, caplog):
    folder = shared_dir / "cache"
    folder.mkdir()
    folder.chmod(0o777)
    store = oac.TokenStore(folder / "tokens.json")
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh="refresh-kept"))
    flow = oac.DeviceFlow(fake_server.url, store=store)
    assert asyncio.run(flow.refresh("refresh-1"))["refresh_token"] == "refresh-kept"
    assert "could not be saved" in caplog.text
    assert not (folder / "tokens.json").exists()
    folder.chmod(0o700)  # the user fixes the folder
    store.put("https://other.example.com", token(refresh="refresh-other"))
    on_disk = json.loads((folder / "tokens.json").read_text())
    assert on_disk[fake_server.url]["refresh_token"] == "refresh-kept"
    assert on_disk["https://other.example.com"]["refresh_token"] == "refresh-other"


@posix_only
@pytest.mark.timeout(20)
def test_a_fifo_at_the_store_path_does_not_hang(tmp_path):
    path = tmp_path / "store" / "tokens.json"
    path.parent.mkdir(mode=0o700)
    os.mkfifo(path)
    store = oac.TokenStore(path)
    assert store.get("https://a.example.com") is None
    assert not path.exists()  # moved aside: it is no file
