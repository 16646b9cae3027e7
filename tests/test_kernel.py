"""Notebooks for real: a Jupyter kernel (ipykernel) runs cells that log in, driven by nbclient.

What a user keeps on the page is what nbclient saves: the cell outputs after the
kernel is done, with display updates applied in place as a front end applies them.
The server is the local fake server, the kernel a separate process.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DEVICE, REPO, TOKEN, device_answer, oauth_error, token_answer
from tests import extra

nbformat = extra("nbformat")
nbclient = extra("nbclient")
if importlib.util.find_spec("ipykernel") is None:  # never imported here: see kernel_env
    extra("ipykernel")  # skips, or fails where the test extra is required

USER_CODE = device_answer()["user_code"]


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """The kernel imports this checkout's module; its runtime files stay in the test's HOME."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("JUPYTER_PLATFORM_DIRS", raising=False)
    before = set(sys.modules)
    yield tmp_path
    # Finding the kernel imports ipykernel here too, which would make every later
    # test of this process look like a notebook to the library.
    for name in set(sys.modules) - before:
        if name.partition(".")[0] == "ipykernel":
            del sys.modules[name]


def run_notebook(cwd: Path, *sources: str, **client: Any) -> list[Any]:
    """Execute one notebook in a fresh kernel; the saved outputs of each cell."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    options: dict[str, Any] = {"timeout": 60, "allow_errors": True, "kernel_name": "python3",
                               "resources": {"metadata": {"path": str(cwd)}}}
    options.update(client)
    nbclient.NotebookClient(nb, **options).execute()
    return [cell["outputs"] for cell in nb.cells]


def login_cell(url: str, call: str = "oac.authenticate") -> str:
    # Waiting notes would come every 0.2 s here (30 s in real use), so a short wait
    # shows whether any reach the page.
    return ("import py_oidc_auth_client as oac\n"
            "oac._PROGRESS_EVERY = 0.2\n"
            f"token = {call}({url!r}, timeout=30)\n"
            "print('got', token['token_type'])")


def displays(outputs: list[Any]) -> list[Any]:
    return [o for o in outputs if o["output_type"] == "display_data"]


def stderr(outputs: list[Any]) -> str:
    return "".join(o["text"] for o in outputs
                   if o["output_type"] == "stream" and o["name"] == "stderr")


def approve_after(seconds: float) -> Any:
    """A token route that answers authorization_pending for *seconds* after the first poll."""
    # Timed from the first poll, not from now: a loaded machine may take longer than
    # *seconds* to start the kernel, and the test must still see the login wait.
    first: list[float] = []
    answer = token_answer()

    def reply(req: Any) -> tuple[int, dict[str, str], Any]:
        first[:] = first or [req.time]
        if req.time - first[0] < seconds:
            return 400, {}, oauth_error("authorization_pending")
        return 200, {}, answer

    return reply


@pytest.mark.timeout(90)
@pytest.mark.parametrize("call", ["oac.authenticate", "await oac.authenticate_async"],
                         ids=["sync", "awaited"])
def test_an_approved_login_leaves_one_logged_in_line(kernel_env, fake_server, call):
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 200, approve_after(2.5))
    (outputs,) = run_notebook(kernel_env, login_cell(fake_server.url, call))
    assert [o.get("text") for o in outputs if o["output_type"] == "stream"] == ["got Bearer\n"]
    (shown,) = displays(outputs)
    text, html = shown["data"]["text/plain"], shown["data"]["text/html"]
    assert "Logged in to" in text and fake_server.url in text
    assert USER_CODE not in text + html  # the spent code is gone from the page
    assert "idp.example/device" not in text + html
    assert stderr(outputs) == ""  # no "still waiting" boxes
    assert len(fake_server.hits(TOKEN)) >= 2  # it did wait


@pytest.mark.timeout(90)
def test_a_denied_login_says_so_in_place(kernel_env, fake_server):
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"), times=2)
    fake_server.reply("POST", TOKEN, 400, oauth_error("access_denied"))
    (outputs,) = run_notebook(kernel_env, login_cell(fake_server.url))
    (shown,) = displays(outputs)
    text = shown["data"]["text/plain"]
    assert "failed" in text and "denied" in text
    assert USER_CODE not in text + shown["data"]["text/html"]
    assert stderr(outputs) == ""
    (error,) = [o for o in outputs if o["output_type"] == "error"]
    assert error["ename"] == "AuthError"


@pytest.mark.timeout(90)
def test_an_interrupted_login_ends_with_a_short_message(kernel_env, fake_server):
    # "Interrupt kernel" while a sync login waits: nbclient interrupts a cell that
    # runs past its timeout, as a person would press the stop button.
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    outputs, after = run_notebook(kernel_env, login_cell(fake_server.url), "print('next')",
                                  timeout=2, interrupt_on_timeout=True,
                                  shell_timeout_interval=1)
    (shown,) = displays(outputs)
    text = shown["data"]["text/plain"]
    assert "cancelled" in text
    assert USER_CODE not in text + shown["data"]["text/html"]
    assert stderr(outputs) == ""
    (error,) = [o for o in outputs if o["output_type"] == "error"]
    assert len(error["traceback"]) == 1, error["traceback"]  # no frames of the module's internals
    assert "KeyboardInterrupt" in error["traceback"][0] and "cancelled" in error["traceback"][0]
    # The kernel is fine afterwards, and the login stopped polling.
    assert [o.get("text") for o in after] == ["next\n"]
    polls = len(fake_server.hits(TOKEN))
    time.sleep(1.5)
    assert len(fake_server.hits(TOKEN)) == polls
