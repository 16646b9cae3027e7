"""Stress the token store and the refresh path with real processes; print the figures.

    python benchmarks/stress_store.py

1. Lost writes: 16 processes x 20 rounds each put a distinct host into one store
   file.  Every one of the 320 hosts must be there afterwards.
2. One refresh per expiry: 32 processes call authenticate() on one expired
   access token against a local server that rotates refresh tokens and rejects
   a reused one.  Exactly one refresh request may reach it, and no process may
   fail.
3. Private files: while 300 puts run, a watcher scans the store's folder for a
   store, lock or temp file that group or others could read.  It must see none.

Exits 1 when a figure is off, so CI can run it as a check.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import py_oidc_auth_client as oac

WRITERS, ROUNDS = 16, 20
REFRESHERS = 32
WATCHED_PUTS = 300
HOST = "https://stress.example.org"


def _token(access: str, expires_in: int, refresh: str) -> oac.Token:
    now = int(time.time())
    return oac._token(access, "Bearer", now + expires_in, refresh, now + 3600, "openid")


# -- 1. lost writes --------------------------------------------------------------------------


def _writer(path: str, worker: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    store = oac.TokenStore(path)
    barrier.wait()
    for round_ in range(ROUNDS):
        store.put(f"https://h{worker}-{round_}.example.org", _token(f"a{worker}", 3600, "r"))


def lost_writes(folder: str) -> int:
    path = os.path.join(folder, "writes.json")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(path, i, barrier)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    hosts = set(oac.TokenStore(path).hosts())
    expected = {f"https://h{w}-{r}.example.org" for w in range(WRITERS) for r in range(ROUNDS)}
    return len(expected - hosts)


# -- 2. one refresh per expiry ---------------------------------------------------------------


class _RotatingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RotatingHandler)
        self.lock = threading.Lock()
        self.current, self.generation, self.refreshes, self.rejected = "refresh-0", 0, 0, 0


class _RotatingHandler(BaseHTTPRequestHandler):
    server: _RotatingServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        time.sleep(0.2)  # a slow provider widens the window for a race
        with self.server.lock:
            if form.get("refresh-token") == self.server.current:
                self.server.generation += 1
                self.server.refreshes += 1
                gen = self.server.generation
                self.server.current = f"refresh-{gen}"
                status, body = 200, {
                    "access_token": f"access-{gen}", "token_type": "Bearer",
                    "expires": int(time.time()) + 3600, "refresh_token": f"refresh-{gen}",
                    "refresh_expires": int(time.time()) + 7200, "scope": "openid",
                }
            else:  # a reused refresh token: the provider would revoke the grant
                self.server.rejected += 1
                status, body = 400, {"detail": 'Upstream OIDC error: {"error":"invalid_grant"}'}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _refresher(path: str, url: str, barrier: multiprocessing.synchronize.Barrier,
               results: multiprocessing.Queue[str]) -> None:
    os.environ.pop("OIDC_TOKEN_FILE", None)
    barrier.wait()
    try:
        token = oac.authenticate(url, store=oac.TokenStore(path), timeout=30)
        results.put(token["access_token"])
    except oac.AuthError as exc:
        results.put(f"ERROR {exc.message}")


def one_refresh(folder: str) -> tuple[int, int, int]:
    server = _RotatingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    path = os.path.join(folder, "refresh.json")
    oac.TokenStore(path).put(url, _token("access-0", -30, "refresh-0"))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(REFRESHERS), ctx.Queue()
    procs = [ctx.Process(target=_refresher, args=(path, url, barrier, results))
             for _ in range(REFRESHERS)]
    for p in procs:
        p.start()
    answers = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    server.shutdown()
    server.server_close()
    failures = sum(a != "access-1" for a in answers)
    return server.refreshes, server.rejected, failures


# -- 3. private files ------------------------------------------------------------------------


def readable_sightings(folder: str) -> tuple[int, int]:
    store_dir = os.path.join(folder, "private", "cache")
    store = oac.TokenStore(os.path.join(store_dir, "tokens.json"))
    done, sightings, scans = threading.Event(), [], [0]

    def watch() -> None:
        while not done.is_set():
            try:
                names = os.listdir(store_dir)
            except FileNotFoundError:
                continue
            scans[0] += 1
            for name in names:
                try:
                    mode = os.stat(os.path.join(store_dir, name)).st_mode
                except FileNotFoundError:
                    continue
                if mode & 0o077:
                    sightings.append(f"{name} {oct(mode)}")

    old_umask = os.umask(0o022)  # an ordinary umask: files would be 0644 if created naively
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(WATCHED_PUTS):
            store.put(f"https://p{i}.example.org", _token("a", 3600, "r"))
    finally:
        done.set()
        watcher.join()
        os.umask(old_umask)
    if os.stat(store_dir).st_mode & 0o077:
        sightings.append("cache folder " + oct(os.stat(store_dir).st_mode))
    return len(sightings), scans[0]


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        lost = lost_writes(folder)
        refreshes, rejected, failures = one_refresh(folder)
        sightings, scans = readable_sightings(folder)
    total = WRITERS * ROUNDS
    rows = [
        (f"hosts lost ({WRITERS} processes x {ROUNDS} puts)", f"{lost} of {total}", lost == 0),
        (f"refresh requests ({REFRESHERS} processes, one expiry)", str(refreshes),
         refreshes == 1),
        ("reused refresh tokens seen by the server", str(rejected), rejected == 0),
        ("processes without the new token", f"{failures} of {REFRESHERS}", failures == 0),
        (f"readable store/temp files seen ({WATCHED_PUTS} puts, {scans} scans)",
         str(sightings), sightings == 0),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"stress_store on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    for name, value, ok in rows:
        print(f"  {name:<{width}}  {value:>10}  {'ok' if ok else 'FAIL'}")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
