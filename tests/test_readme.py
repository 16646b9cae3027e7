"""The README's examples, run as written against a local server, so the docs stay true.

Every ``sh`` and ``python`` block of the sections below runs in document order:
``https://myapp.example.com`` becomes the local fake server, ``oidc-auth``,
``python`` and ``sbatch`` are small shims on PATH (``sbatch`` runs the script at
once, without a terminal and with ``SLURM_JOB_ID`` set), and HOME is private
to the test.  A ``<!-- readme-test: file NAME -->`` comment before a block
writes it to NAME instead; ``<!-- readme-test: skip (why) -->`` skips it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from typing import Any, Callable

import pytest

from conftest import DEVICE, REPO, TOKEN, oauth_error, token_answer
from tests import oac

README = REPO / "README.md"
HOST = "https://myapp.example.com"
SECTIONS = ("Command line", "Batch jobs and clusters", "Notebooks", "Troubleshooting")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="runs POSIX shell snippets")


def blocks(section: str) -> list[tuple[str, str, str]]:
    """``(language, directive, code)`` for each fenced block of a README section."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no section {section!r}"
    found = []
    for m in re.finditer(r"(?:<!-- readme-test: (.*?) -->\n)?```(\w+)\n(.*?)^```", match[1],
                         re.M | re.S):
        directive, language, code = m[1] or "", m[2], m[3]
        found.append((language, directive, code))
    return found


@pytest.fixture
def shell(tmp_path, fake_server):
    """Run README snippets: ``shell(language, code, **env)``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        # What pip installs: a script named oidc-auth that calls main().
        "oidc-auth": f'exec "{sys.executable}" -c "import sys; sys.argv[0] = \'oidc-auth\'; '
                     f'from py_oidc_auth_client import main; sys.exit(main())" "$@"',
        "python": f'exec "{sys.executable}" "$@"',
        "sbatch": 'SLURM_JOB_ID=4242 exec bash "$@" </dev/null',
    }
    for name, body in shims.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    workdir = tmp_path / "work"
    workdir.mkdir()
    base = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO)}

    def run(language: str, code: str, **env: str) -> subprocess.CompletedProcess[str]:
        code = code.replace(HOST, fake_server.url)
        if language == "sh":
            argv = ["bash", "-e", "-c", code]
        else:
            argv = [sys.executable, "-c", NOTEBOOK_CELL, code]
        return subprocess.run(argv, cwd=workdir, env={**base, **env}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)

    run.workdir, run.url = workdir, fake_server.url  # type: ignore[attr-defined]
    return run


# Python blocks run like a notebook cell: inside a running event loop, top-level
# await allowed, ipykernel loaded and IPython.display faked (it prints what it shows).
NOTEBOOK_CELL = """
import ast, asyncio, inspect, json, sys, types
if "--plain" not in sys.argv:
    sys.modules["ipykernel"] = types.ModuleType("ipykernel")
    display = types.ModuleType("IPython.display")
    display.display = lambda *objs, **kw: print("DISPLAY " + json.dumps(objs[0]))
    sys.modules["IPython"] = types.ModuleType("IPython")
    sys.modules["IPython.display"] = display
code = compile(sys.argv[1], "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
async def cell():
    result = eval(code, {"__name__": "__main__"})
    if inspect.iscoroutine(result):
        await result
asyncio.run(cell())
"""


def runnable(section: str) -> list[tuple[str, str, str]]:
    found = [b for b in blocks(section) if b[0] in ("sh", "python")]
    assert found, f"no examples in {section!r}"
    return found


def run_section(section: str, shell: Any, before: Callable[[], None] = lambda: None,
                check: bool = True, **env: str) -> list[subprocess.CompletedProcess[str]]:
    for _, directive, code in runnable(section):
        if directive.startswith("file "):  # the job scripts the commands use
            path = shell.workdir / directive.split()[1]
            path.write_text(code.replace(HOST, shell.url))
            path.chmod(0o755)
    done = []
    for language, directive, code in runnable(section):
        if directive.startswith(("skip", "file ")):
            continue
        before()
        proc = shell(language, code, **env)
        done.append(proc)
        assert "Traceback" not in proc.stderr
        if not check and proc.returncode:
            break
        assert proc.returncode == 0, (code, proc.stdout, proc.stderr)
    return done


def test_the_readme_has_the_sections_and_documents_every_exit_code():
    for section in SECTIONS:
        assert runnable(section)
    text = README.read_text()
    for code in ("0", "1", "2", "3", "130"):
        assert re.search(rf"^\| {code} \| ", text, re.M), code


@pytest.mark.timeout(90)
def test_command_line_section(shell, fake_server, make_token):
    token = make_token()
    fake_server.reply("GET", "/api/data", 200, {"data": [1, 2, 3]})
    first, curl = run_section("Command line", shell,  # logged in on this workstation
                              before=lambda: oac.TokenStore().put(fake_server.url, token))
    out = first.stdout.splitlines()
    assert out[0].startswith(f"Logged in to {fake_server.url}: access token valid for 59 min")
    assert out[1] == token["access_token"]
    assert out[2] == f"Authorization: Bearer {token['access_token']}"
    assert "refresh_token" not in json.loads("\n".join(out[3:out.index("}") + 1]))
    assert f"{fake_server.url}\taccess valid for 59 min\trefresh valid for 23 h 59 min" in out
    assert "Logged out of" in first.stderr
    assert "Removed all tokens" in first.stderr
    assert curl.stdout == '{"data": [1, 2, 3]}' * 2
    assert [r.headers["Authorization"] for r in fake_server.hits("/api/data")] == [
        f"Bearer {token['access_token']}"] * 2


@pytest.mark.timeout(90)
def test_batch_section(shell, fake_server, make_token, isolated_env):
    token = make_token(lifetime=3600, refresh_lifetime=5 * 3600)
    oac.TokenStore().put(fake_server.url, token)
    fake_server.reply("GET", "/api/data", 200, {"ok": True})
    (handoff,) = run_section("Batch jobs and clusters", shell)
    exported = isolated_env / "job-token.json"
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert json.loads(exported.read_text()) == {"server": fake_server.url, **token}
    assert handoff.stdout.splitlines() == [
        f"Logged in to {fake_server.url}: access token valid for 59 min, refresh token valid "
        "for 4 h 59 min",  # --min-valid 14400: the job may start
        "job got a token for openid",
        '{"ok": true}',
    ]
    (hit,) = fake_server.hits("/api/data")
    assert hit.headers["Authorization"] == f"Bearer {token['access_token']}"
    assert fake_server.hits(TOKEN) == []

    # The same job when the login would not last its four hours: it refuses to start.
    oac.TokenStore().put(fake_server.url, make_token(lifetime=3600, refresh_lifetime=3600))
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh=None))
    (refused,) = run_section("Batch jobs and clusters", shell, check=False)
    assert refused.returncode == 1  # job.sh: `|| exit 1`
    assert "job got a token" not in refused.stdout
    assert re.search(r"oidc-auth: error: the refresh token for \S+ expires in 59 min even "
                     r"after a refresh, sooner than --min-valid 14400 asks \(4 h\); make a new "
                     r"token file on a workstation: oidc-auth \S+ --export \S+/job-token.json",
                     refused.stderr), refused.stderr


@pytest.mark.timeout(90)
def test_notebooks_section(shell, fake_server):
    # No cached token: the first cell logs in, and shows the device code as a link.
    fake_server.reply("POST", DEVICE, 200, {
        "device_code": "dev-1", "user_code": "WDJB-MJHT", "expires_in": 600, "interval": 1,
        "verification_uri": "https://idp.example/device",
        "verification_uri_complete": "https://idp.example/device?user_code=WDJB-MJHT"})
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    login, awaited = run_section("Notebooks", shell)
    shown = json.loads(login.stdout.removeprefix("DISPLAY "))
    assert '<a href="https://idp.example/device?user_code=WDJB-MJHT"' in shown["text/html"]
    assert "<code>WDJB-MJHT</code>" in shown["text/html"]
    assert "WDJB-MJHT" not in login.stderr  # shown once, as the link
    assert oac.TokenStore().get(fake_server.url)["access_token"] == answer["access_token"]
    assert awaited.stdout == ""  # the cached token: nothing to show


@pytest.mark.timeout(90)
def test_troubleshooting_section(shell, fake_server, make_token):
    oac.TokenStore().put(fake_server.url, make_token())
    (done,) = run_section("Troubleshooting", shell)
    assert "login:" in done.stdout
    assert "token cache:" in done.stdout
    assert done.stdout.rstrip().endswith("valid for 23 h 59 min")
    assert "oidc-auth: DEBUG: token store:" in done.stderr
