"""Terminals: the CLI on a real pseudo terminal, and with stderr in a pipe or a log file."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import DEVICE, REPO, TOKEN, oauth_error, token_answer
from conftest import bare_device_answer as device_answer
from tests import oac

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo terminal")

ESC = b"\x1b"


def read_all(fd: int, proc: subprocess.Popen[bytes] | None = None, limit: float = 30) -> bytes:
    """Everything written to the terminal until the child closes it."""
    chunks, end = [], time.monotonic() + limit
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            if proc is not None and proc.poll() is not None:
                break
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def run_on_terminal(*args: str, env: dict[str, str] | None = None
                    ) -> tuple[int, str, bytes]:
    """Run the CLI with stdin and stderr on a new pseudo terminal, stdout in a pipe.

    Returns ``(exit code, stdout, everything the terminal showed)``.
    """
    master, slave = os.openpty()
    full = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    full.update({"TERM": "xterm-256color", **(env or {})})
    try:
        proc = subprocess.Popen([sys.executable, "-m", "py_oidc_auth_client", *args], cwd=REPO,
                                env=full, stdin=slave, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = -1
        screen = read_all(master, proc)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return proc.returncode, stdout.decode(), screen


def script_a_login(fake_server, pending: int = 3) -> dict:
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"), times=pending)
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    return answer


@pytest.mark.timeout(40)
def test_live_countdown_on_the_terminal_and_only_the_token_on_stdout(fake_server):
    answer = script_a_login(fake_server)
    code, stdout, screen = run_on_terminal(fake_server.url, "--access-token")
    assert code == 0, screen
    assert stdout == answer["access_token"] + "\n"  # nothing but the result
    text = screen.decode()
    assert "ABCD-EFGH" in text
    assert "https://idp.example/device" in text
    # One line rewritten in place: carriage return, erase line, the time left.
    frames = re.findall(r"\r\x1b\[KWaiting for approval\.\.\. (\d+):(\d\d) left", text)
    assert len(frames) >= 3
    lefts = [int(m) * 60 + int(s) for m, s in frames]
    assert lefts == sorted(lefts, reverse=True)
    assert 590 <= lefts[0] <= 600  # by default, as long as the device code lives (600 s)
    assert text.endswith("\r\x1b[K")  # wiped when done: the shell prompt starts clean
    assert answer["access_token"] not in text


@pytest.mark.timeout(40)
@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_color_and_dumb_terminals_get_no_escape_sequences(fake_server, env):
    answer = script_a_login(fake_server)
    code, stdout, screen = run_on_terminal(fake_server.url, "--json", env=env)
    assert code == 0, screen
    assert json.loads(stdout)["access_token"] == answer["access_token"]
    assert ESC not in screen
    text = screen.decode()
    # The CLI waits as long as the device code lives (10 min here).
    assert re.search(r"\rWaiting for approval\.\.\. 9:\d\d left", text)
    # The line is still wiped at the end, with spaces instead of an escape sequence.
    assert re.search(r"\r {30,}\r$", text), repr(text[-80:])


@pytest.mark.timeout(40)
def test_stderr_in_a_pipe_gets_whole_lines_only(fake_server):
    # A terminal on stdin (so a login may start), stderr into a pipe as in `2>log`.
    answer = script_a_login(fake_server, pending=2)
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "py_oidc_auth_client", fake_server.url,
                               "--header"], cwd=REPO, stdin=slave, capture_output=True,
                              timeout=30)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"Authorization: Bearer {answer['access_token']}\n"
    assert b"\r" not in proc.stderr
    assert ESC not in proc.stderr
    assert b"ABCD-EFGH" in proc.stderr
    assert b"Waiting for approval" not in proc.stderr


# A real process whose stderr goes to a log file, with the 30-s period shortened.
PROGRESS_IN_A_LOG = """
import sys
sys.path.insert(0, sys.argv[2])
import py_oidc_auth_client as oac
oac._PROGRESS_EVERY = 2.0
sys.exit(oac.main([sys.argv[1], "--timeout", "7", "--access-token"]))
"""


@pytest.mark.timeout(40)
def test_a_log_file_gets_a_progress_line_every_period(fake_server, tmp_path):
    assert oac._PROGRESS_EVERY == 30  # the real period
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    log = tmp_path / "job.log"
    with open(log, "wb") as stderr:
        proc = subprocess.run([sys.executable, "-c", PROGRESS_IN_A_LOG, fake_server.url,
                               str(REPO)], cwd=REPO, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=stderr, timeout=30,
                              env={**os.environ, "BROWSER": "true"})
    assert proc.returncode == 1
    assert proc.stdout == b""
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = re.findall(r"^still waiting for approval, 0:0(\d) left$", text, re.MULTILINE)
    assert len(lines) == 3, text  # at 2, 4 and 6 s of a 7-s wait
    assert [int(s) for s in lines] == sorted((int(s) for s in lines), reverse=True)
    assert text.strip().splitlines()[-1].startswith("oidc-auth: error: Gave up waiting")


def test_progress_lines_in_process(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(oac, "_PROGRESS_EVERY", 0.0)
    progress = oac._Progress(stream, live=False)
    progress.update(270.4)
    progress.update(269.0)
    progress.close()
    assert stream.getvalue() == ("still waiting for approval, 4:30 left\n"
                                 "still waiting for approval, 4:29 left\n")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stderr", "interactive", "env", "how"), [
    (io.StringIO(), None, {}, "a line on stderr every 30 s"),
    (Tty(), None, {}, "a live countdown line on stderr"),
    (Tty(), None, {"NO_COLOR": "1"},
     "a live countdown line on stderr, without escape sequences (NO_COLOR or TERM=dumb)"),
    (Tty(), False, {}, "a line on stderr every 30 s"),
    (None, None, {}, None),
])
def test_the_progress_says_what_it_shows(monkeypatch, stderr, interactive, env, how):
    # What --doctor prints as the progress row: the same decision the device login makes.
    monkeypatch.delenv("NO_COLOR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stderr", stderr)
    progress = oac._Progress.on_stderr(interactive)
    assert (progress and progress.how) == how


def test_live_progress_survives_a_closed_stderr():
    stream = io.StringIO()
    progress = oac._Progress(stream, live=True)
    stream.close()
    progress.update(10)  # no exception: a broken stderr must not end the login
    progress.close()


# The forked child only changes directory and execs: safe beside the server's threads.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.timeout(40)
def test_ctrl_c_on_the_terminal_exits_130_and_wipes_the_countdown(fake_server):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    argv = [sys.executable, "-m", "py_oidc_auth_client", fake_server.url, "--timeout", "60"]
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    pid, master = os.forkpty()  # the CLI gets the terminal as its controlling terminal
    if pid == 0:  # the child: become the CLI
        try:
            os.chdir(REPO)
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    try:
        screen = b""
        deadline = time.monotonic() + 20
        while b"Waiting for approval" not in screen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                screen += os.read(master, 4096)
        time.sleep(1.2)
        os.write(master, b"\x03")  # Ctrl-C, typed on the terminal
        screen += read_all(master, limit=15)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    text = screen.decode()
    assert os.waitstatus_to_exitcode(status) == 130, text
    assert "Waiting for approval..." in text
    assert "\r\x1b[Koidc-auth: interrupted" in text or "\r\x1b[K^C" in text, repr(text[-120:])
    assert "Traceback" not in text
    polls = len(fake_server.hits(TOKEN))
    time.sleep(1.5)
    assert len(fake_server.hits(TOKEN)) == polls  # it really stopped


@pytest.mark.timeout(20)
def test_doctor_on_a_terminal():
    code, stdout, screen = run_on_terminal("--doctor")
    assert code == 0, screen
    assert "stdin is a terminal, stderr is" in stdout
    assert "a live countdown line on stderr" in stdout
    assert re.search(r"^login: +allowed \(stdin is a terminal\)", stdout, re.MULTILINE)
    code, stdout, _ = run_on_terminal("--doctor", env={"NO_COLOR": "1"})
    assert "without escape sequences (NO_COLOR or TERM=dumb)" in stdout


def test_sigint_constant_is_what_the_shell_sees():
    assert 128 + signal.SIGINT == 130
