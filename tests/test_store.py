"""TokenStore: per-host entries, eviction, private atomic files, corruption, processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import child_env, make_jwt, run_child, token_answer
from tests import oac

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes and flock")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG layout")


def flow_store(host: str = "https://a.example.com", **options: str) -> oac.TokenStore:
    """The store a flow uses by default: the token file of OIDC_TOKEN_FILE, else the cache."""
    return oac.BaseFlow(host, **options).store


def raw_entry(lifetime: int = 3600, refresh_lifetime: int = 86400, refresh: str = "r-1",
              access: str = "a-1") -> dict:
    now = int(time.time())
    return {"access_token": access, "token_type": "Bearer", "expires": now + lifetime,
            "refresh_token": refresh, "refresh_expires": now + refresh_lifetime if refresh else 0,
            "scope": "openid", "headers": {"Authorization": f"Bearer {access}"}}


def write_raw(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    path.chmod(0o600)


def on_disk(store: oac.TokenStore) -> dict:
    """The stored entries as Tokens: the store keeps a "lifetime" beside each and leaves
    out "headers", which it rebuilds on read."""
    with open(store.path) as fh:
        data = json.load(fh)
    if isinstance(data, dict):
        for entry in data.values():
            if isinstance(entry, dict) and "lifetime" in entry:
                entry.pop("lifetime")
                assert "headers" not in entry
                entry["headers"] = {
                    "Authorization": f"{entry['token_type']} {entry['access_token']}"}
    return data


def corrupt_copies(store: oac.TokenStore) -> list[Path]:
    path = Path(store.path)
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


# -- the basic operations ------------------------------------------------------------


def test_put_get_roundtrip(tmp_store, make_token):
    token = make_token()
    tmp_store.put("https://a.example.com", token)
    assert tmp_store.get("https://a.example.com") == token
    assert tmp_store.get("https://b.example.com") is None


def test_a_new_store_object_reads_what_another_wrote(tmp_store, make_token):
    token = make_token()
    tmp_store.put("https://a.example.com", token)
    assert oac.TokenStore(tmp_store.path).get("https://a.example.com") == token


def test_put_overwrites(tmp_store, make_token):
    first, second = make_token(), make_token(lifetime=7200)
    tmp_store.put("https://a.example.com", first)
    tmp_store.put("https://a.example.com", second)
    assert tmp_store.get("https://a.example.com") == second
    assert tmp_store.hosts() == ["https://a.example.com"]


def test_remove(tmp_store, make_token):
    tmp_store.put("https://a.example.com", make_token())
    tmp_store.put("https://b.example.com", make_token())
    assert tmp_store.remove("https://a.example.com/") is True
    assert tmp_store.remove("https://a.example.com") is False
    assert tmp_store.get("https://a.example.com") is None
    assert tmp_store.hosts() == ["https://b.example.com"]
    assert list(on_disk(tmp_store)) == ["https://b.example.com"]


def test_remove_on_a_missing_file(tmp_store):
    assert tmp_store.remove("https://a.example.com") is False


def test_hosts_and_clear(tmp_store, make_token):
    assert tmp_store.hosts() == []
    for host in ("https://b.example.com", "https://a.example.com", "http://c.example.com:8080"):
        tmp_store.put(host, make_token())
    assert tmp_store.hosts() == ["http://c.example.com:8080", "https://a.example.com",
                                 "https://b.example.com"]
    tmp_store.clear()
    assert tmp_store.hosts() == []
    assert tmp_store.get("https://a.example.com") is None
    assert on_disk(tmp_store) == {}


def test_put_rejects_a_malformed_token(tmp_store):
    with pytest.raises(ValueError):
        tmp_store.put("https://a.example.com", {"access_token": ""})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tmp_store.put("https://a.example.com", {"access_token": "a", "expires": "soon"})  # type: ignore[arg-type]
    assert not os.path.exists(tmp_store.path)


def test_store_path_expands_user(isolated_env):
    store = oac.TokenStore("~/tokens/t.json")
    assert store.path == str(isolated_env / "tokens" / "t.json")


def test_repr_shows_the_path_only(tmp_store, make_token):
    token = make_token()
    tmp_store.put("https://a.example.com", token)
    tmp_store.get("https://a.example.com")
    for text in (repr(tmp_store), str(tmp_store)):
        assert tmp_store.path in text
        assert token["access_token"] not in text
        assert token["refresh_token"] not in text


# -- host keys --------------------------------------------------------------------------


@pytest.mark.parametrize("stored, looked_up", [
    ("https://Example.COM", "https://example.com"),
    ("HTTPS://example.com/", "https://example.com"),
    ("https://example.com:443", "https://example.com"),
    ("http://example.com:80/", "http://example.com"),
    ("https://example.com/app1/", "https://example.com/app1"),
    ("  https://example.com  ", "https://example.com"),
    ("http://[::1]:8080/", "http://[::1]:8080"),
])
def test_host_keys_are_normalised(tmp_store, make_token, stored, looked_up):
    token = make_token()
    tmp_store.put(stored, token)
    assert tmp_store.get(looked_up) == token
    assert tmp_store.hosts() == [looked_up]


@pytest.mark.parametrize("one, other", [
    ("https://example.com/app1", "https://example.com/app2"),
    ("https://example.com/App", "https://example.com/app"),
    ("https://example.com", "http://example.com"),
    ("https://example.com", "https://example.com:8443"),
    ("http://example.com:443", "https://example.com"),
    ("https://example.com", "https://example.com/app"),
])
def test_distinct_hosts_keep_distinct_entries(tmp_store, make_token, one, other):
    first, second = make_token(), make_token(lifetime=7200)
    tmp_store.put(one, first)
    tmp_store.put(other, second)
    assert tmp_store.get(one) == first
    assert tmp_store.get(other) == second
    assert len(tmp_store.hosts()) == 2


@pytest.mark.parametrize("host", ["", "ftp://x", "not a url", "https://h/?q=1"])
def test_invalid_hosts_raise_auth_error(tmp_store, make_token, host):
    with pytest.raises(oac.AuthError):
        tmp_store.get(host)
    with pytest.raises(oac.AuthError):
        tmp_store.put(host, make_token())


# -- expiry -----------------------------------------------------------------------------


def test_dead_entries_evicted_on_read(tmp_store):
    path = Path(tmp_store.path)
    write_raw(path, {
        "https://live.example.com": raw_entry(),
        "https://dead.example.com": raw_entry(lifetime=-100, refresh_lifetime=-10),
        "https://norefresh.example.com": raw_entry(lifetime=-100, refresh=""),
    })
    assert tmp_store.get("https://dead.example.com") is None
    assert tmp_store.get("https://norefresh.example.com") is None
    assert tmp_store.get("https://live.example.com")["access_token"] == "a-1"
    assert list(on_disk(tmp_store)) == ["https://live.example.com"]
    assert tmp_store.hosts() == ["https://live.example.com"]


def test_hosts_prunes_dead_entries(tmp_store):
    write_raw(Path(tmp_store.path), {
        "https://live.example.com": raw_entry(),
        "https://dead.example.com": raw_entry(lifetime=-100, refresh_lifetime=-10),
    })
    assert tmp_store.hosts() == ["https://live.example.com"]
    assert list(on_disk(tmp_store)) == ["https://live.example.com"]


def test_expired_access_with_valid_refresh_is_kept(tmp_store):
    write_raw(Path(tmp_store.path), {"https://a.example.com": raw_entry(lifetime=-100)})
    token = tmp_store.get("https://a.example.com")
    assert token is not None
    assert token["refresh_token"] == "r-1"
    assert token["expires"] < time.time()
    assert "https://a.example.com" in on_disk(tmp_store)


@pytest.mark.timeout(5)
def test_entry_evicted_once_it_dies_while_cached(tmp_store):
    expires = int(time.time()) + 2  # 1 to 2 s from now
    tmp_store.put("https://a.example.com", oac._token("short", "Bearer", expires, "", 0, ""))
    assert tmp_store.get("https://a.example.com") is not None
    time.sleep(max(0.0, expires + 0.05 - time.time()))
    assert tmp_store.get("https://a.example.com") is None
    assert on_disk(tmp_store) == {}


def test_put_of_a_dead_token_stores_nothing(tmp_store, make_token):
    tmp_store.put("https://live.example.com", make_token())
    tmp_store.put("https://a.example.com", make_token(lifetime=-100, refresh_lifetime=-10))
    assert tmp_store.get("https://a.example.com") is None
    assert list(on_disk(tmp_store)) == ["https://live.example.com"]


# -- private, atomic files ------------------------------------------------------------


@posix_only
def test_file_is_0600_and_created_directory_0700(tmp_path, make_token):
    store = oac.TokenStore(tmp_path / "fresh" / "tokens.json")
    store.put("https://a.example.com", make_token())
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "fresh").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path + ".lock").st_mode) == 0o600


@posix_only
def test_file_is_private_even_with_a_permissive_umask(tmp_path, make_token):
    old = os.umask(0)
    try:
        store = oac.TokenStore(tmp_path / "fresh" / "tokens.json")
        store.put("https://a.example.com", make_token())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "fresh").st_mode) == 0o700


@posix_only
def test_rewrite_makes_a_loose_file_private(tmp_store, make_token):
    write_raw(Path(tmp_store.path), {})
    os.chmod(tmp_store.path, 0o644)
    tmp_store.put("https://a.example.com", make_token())
    assert stat.S_IMODE(os.stat(tmp_store.path).st_mode) == 0o600


@posix_only
def test_existing_directory_mode_is_left_alone(tmp_path, make_token):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    oac.TokenStore(folder / "t.json").put("https://a.example.com", make_token())
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755


def test_atomic_write_leaves_no_temp_files(tmp_store, make_token):
    for i in range(20):
        tmp_store.put(f"https://h{i}.example.com", make_token())
        tmp_store.remove(f"https://h{i - 1}.example.com")
    names = sorted(os.listdir(os.path.dirname(tmp_store.path)))
    assert names == ["tokens.json", "tokens.json.lock"]
    assert list(on_disk(tmp_store)) == ["https://h19.example.com"]


def test_each_write_replaces_the_file(tmp_store, make_token):
    tmp_store.put("https://a.example.com", make_token())
    before = os.stat(tmp_store.path).st_ino
    with open(tmp_store.path, "rb") as held:  # a reader in the middle of reading the old file
        tmp_store.put("https://b.example.com", make_token())
        assert json.loads(held.read()).keys() == {"https://a.example.com"}
    assert os.stat(tmp_store.path).st_ino != before


# -- corrupt files -----------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    b"{not json",
    b'{"https://a.example.com": {"access_token": "a", ',
    b"[1, 2, 3]",
    b'"just a string"',
    b"null",
    b"\x00\xff\xfe\x80garbage\x9c\x00" * 10,
    b"",
])
def test_corrupt_file_moved_aside_with_a_warning(tmp_store, make_token, caplog, content):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    path = Path(tmp_store.path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    path.chmod(0o600)
    assert tmp_store.get("https://a.example.com") is None
    (aside,) = corrupt_copies(tmp_store)
    assert aside.read_bytes() == content
    assert str(aside) in caplog.text
    assert not path.exists()
    # The store keeps working: the next write starts a fresh file.
    token = make_token()
    tmp_store.put("https://a.example.com", token)
    assert tmp_store.get("https://a.example.com") == token
    assert oac.TokenStore(tmp_store.path).get("https://a.example.com") == token
    assert len(corrupt_copies(tmp_store)) == 1


def test_corrupt_file_found_by_a_write_is_moved_aside(tmp_store, make_token, caplog):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    path = Path(tmp_store.path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{{{{")
    token = make_token()
    tmp_store.put("https://a.example.com", token)
    (aside,) = corrupt_copies(tmp_store)
    assert aside.read_bytes() == b"{{{{"
    assert str(aside) in caplog.text
    assert on_disk(tmp_store) == {"https://a.example.com": token}


def test_directory_at_the_store_path(tmp_store, make_token, caplog):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    path = Path(tmp_store.path)
    path.mkdir(parents=True)
    (path / "inside").write_text("keep me")
    assert tmp_store.get("https://a.example.com") is None
    (aside,) = corrupt_copies(tmp_store)
    assert (aside / "inside").read_text() == "keep me"
    assert str(aside) in caplog.text
    token = make_token()
    tmp_store.put("https://a.example.com", token)
    assert tmp_store.get("https://a.example.com") == token


def test_partly_bad_entries_keep_the_good_ones(tmp_store, caplog):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    good = raw_entry(access="good-access")
    original = {
        "https://good.example.com": good,
        "https://bad1.example.com": {"access_token": 5, "expires": 1},
        "https://bad2.example.com": "a string",
        "https://bad3.example.com": {"access_token": "x", "expires": "tomorrow"},
        "https://bad4.example.com": {"access_token": "x", "expires": True},
        "https://bad5.example.com": {"expires": 2_000_000_000},
    }
    write_raw(Path(tmp_store.path), original)
    token = tmp_store.get("https://good.example.com")
    assert token is not None
    assert token["access_token"] == "good-access"
    assert tmp_store.get("https://bad1.example.com") is None
    (aside,) = corrupt_copies(tmp_store)  # only what could not be read is kept aside
    assert json.loads(aside.read_text()) == {k: v for k, v in original.items()
                                             if k != "https://good.example.com"}
    assert str(aside) in caplog.text
    assert "1 good" in caplog.text
    assert list(on_disk(tmp_store)) == ["https://good.example.com"]
    assert stat.S_IMODE(os.stat(tmp_store.path).st_mode) & 0o077 == 0


@pytest.mark.parametrize("number", ["Infinity", "NaN", "1e400"])
def test_non_finite_expiry_is_a_malformed_entry(tmp_store, caplog, number):
    path = Path(tmp_store.path)
    path.parent.mkdir(parents=True)
    good = json.dumps(raw_entry(access="good-access"))
    path.write_text('{"https://good.example.com": ' + good + ', "https://bad.example.com": '
                    '{"access_token": "x", "expires": ' + number + "}}")
    assert tmp_store.get("https://good.example.com")["access_token"] == "good-access"
    assert len(corrupt_copies(tmp_store)) == 1


@posix_only
def test_world_readable_file_warns_with_the_fix(tmp_store, caplog):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    write_raw(Path(tmp_store.path), {"https://a.example.com": raw_entry()})
    os.chmod(tmp_store.path, 0o644)
    assert tmp_store.get("https://a.example.com") is not None
    assert f"chmod 600 {tmp_store.path}" in caplog.text
    # Warned once per store, not on every read.
    caplog.clear()
    os.utime(tmp_store.path, ns=(1, 1))  # forces a re-read
    tmp_store.get("https://a.example.com")
    assert "chmod" not in caplog.text


@posix_only
def test_private_file_does_not_warn(tmp_store, make_token, caplog):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    tmp_store.put("https://a.example.com", make_token())
    oac.TokenStore(tmp_store.path).get("https://a.example.com")
    assert caplog.text == ""


# -- processes -----------------------------------------------------------------------------

WRITER = """
import os, sys, time
import py_oidc_auth_client as oac
path, index, go = sys.argv[1], sys.argv[2], sys.argv[3]
store = oac.TokenStore(path)
while not os.path.exists(go):
    time.sleep(0.001)
now = int(time.time())
for j in range(5):
    store.put(f"https://host-{index}-{j}.example.com",
              oac._token(f"access-{index}-{j}", "Bearer", now + 3600, "r", now + 86400, ""))
"""


@posix_only
@pytest.mark.timeout(30)
def test_concurrent_processes_lose_no_host(tmp_store, caplog):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    go = Path(tmp_store.path).parent.parent / "go"
    os.makedirs(os.path.dirname(tmp_store.path))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tmp_store.path, str(i), str(go)],
                              env=child_env(), stderr=subprocess.PIPE)
             for i in range(10)]
    try:
        time.sleep(0.3)  # let them start and wait at the gate
        go.touch()
        # Read while they write: a reader never sees a half-written file.
        reader = oac.TokenStore(tmp_store.path)
        while any(p.poll() is None for p in procs):
            reader.hosts()
        for proc in procs:
            assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
    expected = {f"https://host-{i}-{j}.example.com" for i in range(10) for j in range(5)}
    assert set(oac.TokenStore(tmp_store.path).hosts()) == expected
    assert set(on_disk(tmp_store)) == expected
    assert corrupt_copies(tmp_store) == []
    assert "corrupt" not in caplog.text
    assert sorted(os.listdir(os.path.dirname(tmp_store.path))) == ["tokens.json",
                                                                   "tokens.json.lock"]


HOLDER = """
import sys
import py_oidc_auth_client as oac
with oac._FileLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lock_holder(tmp_path):
    """Start a process that holds the module's lock on a file until told to stop."""
    procs = []

    def start(path: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, path], env=child_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        proc.stdin.close()
        proc.stdout.close()


@posix_only
@pytest.mark.timeout(15)
def test_file_lock_wait_is_bounded(tmp_path, lock_holder):
    path = str(tmp_path / "locked" / "t.json.lock")
    os.makedirs(os.path.dirname(path))
    holder = lock_holder(path)
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info, oac._FileLock(path, timeout=0.3):
        pass
    assert 0.3 <= time.monotonic() - start < 1.5
    assert path in info.value.message
    assert "0.3 s" in info.value.message
    # Once the holder lets go, the lock is ours at once.
    holder.stdin.close()
    holder.wait(5)
    start = time.monotonic()
    with oac._FileLock(path, timeout=2):
        pass
    assert time.monotonic() - start < 0.5


@posix_only
@pytest.mark.timeout(15)
def test_lock_of_a_killed_process_is_released(tmp_path, lock_holder):
    path = str(tmp_path / "t.json.lock")
    holder = lock_holder(path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(5)
    with oac._FileLock(path, timeout=2):
        pass


@posix_only
@pytest.mark.timeout(15)
def test_store_waits_for_the_lock_then_writes(tmp_store, make_token, lock_holder):
    os.makedirs(os.path.dirname(tmp_store.path))
    holder = lock_holder(tmp_store.path + ".lock")
    token = make_token()
    done = threading.Event()

    def put() -> None:
        tmp_store.put("https://a.example.com", token)
        done.set()

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    assert not done.wait(0.3)  # blocked by the other process
    holder.stdin.close()
    holder.wait(5)
    assert done.wait(5)
    assert tmp_store.get("https://a.example.com") == token


@posix_only
@pytest.mark.timeout(20)
def test_a_coroutine_waiting_for_the_lock_lets_its_loop_run(tmp_store, fake_server, lock_holder):
    # A notebook refreshes while another process holds the store's lock: the refresh
    # waits, and the notebook's other tasks run on meanwhile.
    os.makedirs(os.path.dirname(tmp_store.path))
    holder = lock_holder(tmp_store.path + ".lock")
    fake_server.reply("POST", "/auth/v2/token", 200, token_answer(refresh="r-2"))
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store)
    ticks: list[float] = []

    async def scenario() -> oac.Token:
        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        async def release() -> None:
            await asyncio.sleep(0.5)
            holder.stdin.close()

        ticker, releaser = asyncio.create_task(tick()), asyncio.create_task(release())
        try:
            return await flow.refresh("r-1")
        finally:
            ticker.cancel()
            await releaser

    start = time.monotonic()
    token = asyncio.run(scenario())
    assert time.monotonic() - start >= 0.5  # the refresh did wait for the lock
    assert len([t for t in ticks if t < start + 0.45]) >= 10  # and the loop ran meanwhile
    assert token["refresh_token"] == "r-2"
    assert tmp_store.get(fake_server.url) == token


# -- where the store lives -------------------------------------------------------------


@linux_only
def test_default_path_honours_xdg_cache_home_and_app_name(tmp_path, monkeypatch):
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert oac.TokenStore().path == str(cache / "py-oidc-auth" / "token-store.json")
    assert oac.TokenStore(app_name="my-project").path == str(
        cache / "my-project" / "token-store.json")
    shared = flow_store(app_name="my-project")
    assert shared.path == str(cache / "my-project" / "token-store.json")
    assert shared is flow_store(app_name="my-project")


@linux_only
def test_default_store_is_created_privately(tmp_path, monkeypatch, make_token):
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    store = oac.TokenStore(app_name="my-project")
    store.put("https://a.example.com", make_token())
    assert stat.S_IMODE(os.stat(cache / "my-project").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


@linux_only
@pytest.mark.timeout(20)
def test_works_without_platformdirs(tmp_path, isolated_env):
    code = """
        import sys
        sys.modules["platformdirs"] = None  # import platformdirs -> ImportError
        import py_oidc_auth_client as oac
        print(oac._cache_dir("myapp"))
        print(oac.TokenStore(app_name="myapp").path)
    """
    xdg = tmp_path / "xdg"
    lines = run_child(code, XDG_CACHE_HOME=str(xdg)).splitlines()
    assert lines == [str(xdg / "myapp"), str(xdg / "myapp" / "token-store.json")]
    env = {k: v for k, v in child_env().items() if k != "XDG_CACHE_HOME"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.splitlines()[0] == str(isolated_env / ".cache" / "myapp")


@pytest.mark.timeout(20)
def test_import_does_not_load_platformdirs():
    out = run_child("""
        import sys
        import py_oidc_auth_client
        print("platformdirs" in sys.modules)
    """)
    assert out.strip() == "False"


# -- OIDC_TOKEN_FILE -----------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path, monkeypatch, make_token):
    """A token file for https://a.example.com as ``--json`` prints it, named by OIDC_TOKEN_FILE."""
    path = tmp_path / "job" / "token.json"
    path.parent.mkdir()
    token = make_token()
    path.write_text(json.dumps({"server": "https://a.example.com", **token}, indent=2))
    path.chmod(0o600)
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(path))
    return path, token


def test_token_file_holds_one_token_for_its_server_only(token_file):
    path, token = token_file
    store = flow_store()
    assert store.path == str(path)
    assert store.get("https://A.example.com/") == token
    with pytest.raises(oac.AuthError) as caught:
        store.get("https://b.example.com/app")
    assert "issued for https://a.example.com, not for https://b.example.com/app" in str(
        caught.value)


def test_token_file_put_writes_one_token_object(token_file, make_token):
    path, _ = token_file
    store = flow_store()
    new = make_token(lifetime=7200)
    store.put("https://a.example.com", new)
    assert json.loads(path.read_text()) == {"server": "https://a.example.com", **new}
    if sys.platform != "win32":
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_token_file_store_is_separate_from_the_cache(token_file):
    path, _ = token_file
    file_store = flow_store()
    cache_store = oac.TokenStore()
    assert file_store is not cache_store
    assert cache_store.path != str(path)
    assert cache_store.get("https://a.example.com") is None


def test_unset_token_file_means_the_cache(monkeypatch):
    monkeypatch.delenv("OIDC_TOKEN_FILE", raising=False)
    store = flow_store()
    assert store is flow_store("https://b.example.com")  # one shared store
    assert store.path.endswith(os.path.join("py-oidc-auth", "token-store.json"))


def test_missing_token_file_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(tmp_path / "nope.json"))
    store = flow_store()
    assert store.get("https://a.example.com") is None


def test_garbage_token_file_is_kept_aside(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="py_oidc_auth_client")
    path = tmp_path / "token.json"
    path.write_text('{"not": "a token"}')
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(path))
    store = flow_store()
    assert store.get("https://a.example.com") is None
    (aside,) = sorted(tmp_path.glob("token.json.corrupt-*"))
    assert aside.read_text() == '{"not": "a token"}'
    assert str(aside) in caplog.text


def test_token_file_is_what_flows_and_authenticate_use(token_file, fake_server):
    path, token = token_file
    path.write_text(json.dumps({"server": fake_server.url, **token}))
    assert oac.DeviceFlow(fake_server.url).token == token
    assert oac.authenticate(fake_server.url) == token
    assert fake_server.requests == []


@pytest.mark.timeout(10)
def test_token_file_is_refreshed_in_place(tmp_path, monkeypatch, fake_server):
    path = tmp_path / "token.json"
    now = int(time.time())
    old = oac._token(make_jwt(3600, now - 3700), "Bearer", now - 100, "refresh-old",
                     now + 86400, "openid")
    path.write_text(json.dumps({"server": fake_server.url, **old}))
    path.chmod(0o600)
    monkeypatch.setenv("OIDC_TOKEN_FILE", str(path))
    answer = token_answer(refresh=None)
    fake_server.reply("POST", "/auth/v2/token", 200, answer)
    token = oac.authenticate(fake_server.url)
    assert token["access_token"] == answer["access_token"]
    assert token["refresh_token"] == "refresh-old"  # not rotated: kept
    (hit,) = fake_server.hits("/auth/v2/token")
    assert hit.form["refresh-token"] == "refresh-old"
    on_file = json.loads(path.read_text())
    assert on_file["access_token"] == answer["access_token"]
    assert on_file["refresh_token"] == "refresh-old"
    assert on_file["server"] == fake_server.url  # a refresh keeps the binding


def test_store_written_by_the_reference_package_is_migrated(tmp_store, make_token):
    # The reference client (PyPI py-oidc-auth-client) uses the same default path but
    # wraps each token: {host: {"token": {...}, "stored_at": ...}}. Its tokens are read,
    # and the next write stores them in this module's layout.
    token = make_token()
    original = {"https://a.example.com": {"token": dict(token), "stored_at": time.time()}}
    write_raw(Path(tmp_store.path), original)
    assert tmp_store.get("https://a.example.com") == token
    assert corrupt_copies(tmp_store) == []
    tmp_store.put("https://b.example.com", make_token(refresh="refresh-b"))
    assert on_disk(tmp_store)["https://a.example.com"] == token


def test_relative_xdg_cache_home_is_ignored(isolated_env, monkeypatch):
    # The XDG spec: a relative path is invalid and must be ignored.
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    assert oac._cache_dir("my-project") == str(isolated_env / ".cache" / "my-project")


@pytest.mark.parametrize("xdg", ["absolute", None])
def test_cache_dir_agrees_with_platformdirs(tmp_path, monkeypatch, xdg):
    # On POSIX the module applies the XDG rule itself; it must give platformdirs' answer.
    platformdirs = pytest.importorskip("platformdirs")
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = platformdirs.user_cache_dir("my-project", appauthor=False)
    assert oac._cache_dir("my-project") == expected
