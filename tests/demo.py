"""Try the client by hand against a real local stack.

Run from the repository root::

    npm ci --prefix tests/stack        # once: the OpenID provider (Node.js 20+)
    python -m tests.demo               # or scripts/demo, which installs everything

It starts the test stack on 127.0.0.1 (``oidc-provider`` and a ``py-oidc-auth``
server in front of it), then runs ``python -m py_oidc_auth_client HOST --force``.
The login URL and code appear on the terminal: open the URL in your own browser,
sign in with any name and password (the provider's development login accepts
anything), and confirm.  The demo then shows a summary of the token (never the whole
token), asks the server's protected route who you are, and stops the stack; Ctrl-C
stops it too.

Options: ``--no-device`` starts the provider without the device flow, so the client
falls back to the authorization code flow (its callback listens on localhost:53100-5);
``--timeout N`` is how long the login may take (default: the command line's, as long
as the device code lives, 5 min for the code flow).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

STACK = Path(__file__).resolve().parent / "stack"
REPO = STACK.parents[1]
READY_DEADLINE = 30.0
APP_NAME = "py-oidc-auth-client-demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--no-device", action="store_true",
                        help="provider without device flow: the client uses the code flow")
    parser.add_argument("--timeout", type=int, help="seconds for the login (default: the "
                        "command line's, as long as the device code lives)")
    args = parser.parse_args(argv)

    problem = _missing_requirement()
    if problem:
        print(problem, file=sys.stderr)
        return 1

    logs = Path(tempfile.mkdtemp(prefix="oidc-demo-"))  # private (0700): the app logs tokens
    servers: list[_Server] = []
    # Ctrl-C and SIGTERM both end up in the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = False
    try:
        provider = _Server("provider", [shutil.which("node") or "node", str(STACK / "provider.mjs"),
                                        "--port=0", f"--device={0 if args.no_device else 1}"],
                           dict(os.environ), logs, r"ready issuer=(\S+)", STACK)
        servers.append(provider)
        issuer = provider.ready.group(1)
        app_env = dict(os.environ, APP_PORT="0",
                       APP_DISCOVERY_URL=f"{issuer}/.well-known/openid-configuration",
                       APP_CLIENT_ID="py-oidc-auth", APP_CLIENT_SECRET="py-oidc-auth-secret",
                       PYTHONUNBUFFERED="1")
        app = _Server("app", [sys.executable, str(STACK / "app.py")], app_env, logs,
                      r"ready url=(\S+)", REPO)
        servers.append(app)
        host = app.ready.group(1)
        print(f"Stack is up:\n  OpenID provider  {issuer}  (sign in with any name and password)\n"
              f"  py-oidc-auth app {host}\n", file=sys.stderr)
        ok = _login(host, args.timeout, logs)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        ok = True  # nothing to debug: drop the logs
        return 130
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.stop()
        if ok:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"Server logs (they may hold tokens): {logs}", file=sys.stderr)
        print("Stack stopped.", file=sys.stderr)


def _missing_requirement() -> str | None:
    if not shutil.which("node"):
        return ("The demo runs a real OpenID provider on Node.js: install Node.js 20 or newer "
                "(https://nodejs.org, or your package manager), then run\n"
                "    npm ci --prefix tests/stack")
    if not (STACK / "node_modules" / "oidc-provider").is_dir():
        return ("The OpenID provider's npm packages are not installed yet. Run, from the "
                "repository root:\n    npm ci --prefix tests/stack")
    for module in ("py_oidc_auth", "uvicorn", "greenlet"):
        try:
            __import__(module)
        except ImportError:
            return (f"Python package {module!r} is missing; install the stack extra:\n"
                    "    pip install -e '.[stack]'")
    return None


def _login(host: str, timeout: int | None, logs: Path) -> bool:
    env = dict(os.environ, XDG_CACHE_HOME=str(logs / "cache"))
    env.pop("BROWSER", None)  # the person uses their own browser
    env.pop("OIDC_TOKEN_FILE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "py_oidc_auth_client", host, "--force", "--json",
               "--app-name", APP_NAME]
    if timeout is not None:
        command += ["--timeout", str(timeout)]
    print("$ python -m py_oidc_auth_client", host, "--force --json\n", file=sys.stderr)
    # stdin and stderr stay the terminal's: the prompt and countdown show there.
    done = subprocess.run(command, env=env, cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(f"\nThe login failed (exit code {done.returncode}).", file=sys.stderr)
        return False
    token = json.loads(done.stdout)
    _summarise(token, _refresh_in_store(host, env))
    status, answer = _get(f"{host}/protected", token["headers"])
    print(f"\nGET {host}/protected -> HTTP {status}")
    print(json.dumps(answer, indent=2) if not isinstance(answer, str) else answer)
    return status == 200


def _refresh_in_store(host: str, env: dict[str, str]) -> str:
    """What the cache holds besides the printed token: --json leaves the refresh token out."""
    listed = subprocess.run([sys.executable, "-m", "py_oidc_auth_client", "--list",
                             "--app-name", APP_NAME], env=env, cwd=str(REPO),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        fields = line.split("\t")
        if fields[0] == host and len(fields) == 3:
            if fields[2].startswith("refresh "):  # "refresh valid for 29 d 23 h"
                return "kept in the store, " + fields[2][len("refresh "):]
            return "none: the server gave none, log in again when the access token expires"
    return "unknown: the store holds no token for this host"


def _summarise(token: dict[str, Any], refresh: str) -> None:
    now = time.time()
    access = token["access_token"]
    print("\nLogged in. Token summary:")
    print(f"  access_token   {access[:12]}... ({len(access)} characters, a JWT)")
    print(f"  token_type     {token['token_type']}")
    print(f"  scope          {token['scope']}")
    print(f"  expires        in {int(token['expires'] - now)} s")
    print(f"  refresh_token  {refresh}")
    try:
        payload = access.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        shown = {k: claims[k] for k in ("sub", "iss", "aud", "client_id") if k in claims}
        print(f"  claims         {json.dumps(shown)}")
    except (IndexError, ValueError):
        pass


def _get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=15) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


class _Server:
    """A stack process in its own process group, its output in a private log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path,
                 ready: str, cwd: Path) -> None:
        self.name = name
        out_path = logs / f"{name}.log"
        with open(out_path, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(ready, out_path.read_text("utf-8", "replace"))
            if found:
                self.ready = found
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the {name} did not start; see {out_path}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, AttributeError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
