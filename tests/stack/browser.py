"""A scripted web browser for ``BROWSER``: plays the human at the test provider.

Use it as ``BROWSER="/path/to/python /abs/path/tests/stack/browser.py %s"``.  Python's
``webbrowser`` waits for the command, so, like a real browser, this starts a detached
worker and returns at once.  The worker (``human.visit``) logs in at the provider and
approves or denies; in the code flow it finally GETs the client's loopback callback.

Steered by environment variables, read when the browser is opened:

``OIDC_TEST_BROWSER_ACTION``  ``approve`` (default), ``deny``, or ``ignore`` (do nothing)
``OIDC_TEST_BROWSER_TAMPER``  ``state``: change the callback's ``state`` before the GET;
                              ``iss``: change the callback's ``iss`` (RFC 9207);
                              ``nonce``: change the ``nonce`` of the authorize URL before
                              the provider sees it (its ID token then carries that nonce)
``OIDC_TEST_BROWSER_USER``    login name (default ``alice``)
``OIDC_TEST_BROWSER_DELAY``   seconds to wait before acting (default 0)
``OIDC_TEST_BROWSER_TIMEOUT`` give up after this many seconds (default 30)
``OIDC_TEST_BROWSER_LOG``     JSON-lines file; every step is appended as one object
                              (``launch``, ``open``, ``login``, ..., ``callback``,
                              ``error``, and a final ``done``).  It may hold a code
                              and state: keep it in a private temp directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def _log(event: dict[str, Any]) -> None:
    path = os.environ.get("OIDC_TEST_BROWSER_LOG")
    if not path:
        return
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    # One write per line on an O_APPEND file: concurrent workers do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _worker(url: str) -> int:
    sys.path.insert(0, _HERE)
    import human

    action = os.environ.get("OIDC_TEST_BROWSER_ACTION", "approve")
    pid = os.getpid()

    def record(event: dict[str, Any]) -> None:
        _log(dict(event, pid=pid))

    try:
        delay = float(os.environ.get("OIDC_TEST_BROWSER_DELAY", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        if action == "ignore":
            record({"t": time.time(), "event": "ignored"})
            return 0
        human.visit(
            url,
            action=action,
            user=os.environ.get("OIDC_TEST_BROWSER_USER", "alice"),
            tamper_state=os.environ.get("OIDC_TEST_BROWSER_TAMPER") == "state",
            tamper_iss=os.environ.get("OIDC_TEST_BROWSER_TAMPER") == "iss",
            tamper_nonce=os.environ.get("OIDC_TEST_BROWSER_TAMPER") == "nonce",
            timeout=float(os.environ.get("OIDC_TEST_BROWSER_TIMEOUT", "30") or 30),
            record=record,
        )
        return 0
    except Exception as exc:  # reported to the log; the test decides
        record({"t": time.time(), "event": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        record({"t": time.time(), "event": "done"})


def main(argv: list) -> int:
    if len(argv) >= 2 and argv[0] == "--worker":
        return _worker(argv[1])
    if len(argv) != 1:
        sys.stderr.write("usage: browser.py URL\n")
        return 2
    log_path = os.environ.get("OIDC_TEST_BROWSER_LOG")
    with contextlib.ExitStack() as stack:
        errors: Any = subprocess.DEVNULL
        if log_path:
            errors = stack.enter_context(open(log_path + ".stderr", "ab"))
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", argv[0]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,  # detached, as a real browser would be
            close_fds=True,
        )
    _log({"t": time.time(), "event": "launch", "pid": proc.pid})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
