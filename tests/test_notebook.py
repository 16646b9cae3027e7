"""Notebooks: ``authenticate()`` called in a cell, inside the kernel's running event loop.

A cell is an ``async def`` run by ``asyncio.run``; ``ipykernel`` in ``sys.modules``
makes it a notebook for the library, and a tiny fake ``IPython.display`` records
what would have been displayed.  The network is real (the local fake server).
"""

from __future__ import annotations

import _thread
import asyncio
import contextvars
import sys
import threading
import time
import types
import webbrowser
from typing import Any

import pytest

from conftest import DEVICE, TOKEN, oauth_error, token_answer
from tests import oac

CELL: contextvars.ContextVar[str] = contextvars.ContextVar("cell", default="no cell")


class FakeDisplay:
    """Stands in for IPython.display: records each display() call and its context."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    def display(self, *objs: Any, **kwargs: Any) -> None:
        if self.fail:
            raise RuntimeError("no frontend")
        self.calls.append({"objs": objs, "kwargs": kwargs, "cell": CELL.get(),
                           "thread": threading.current_thread().name})


@pytest.fixture
def notebook(monkeypatch):
    """A kernel process: ipykernel loaded, IPython.display faked; no terminal anywhere."""
    fake = FakeDisplay()
    ipython = types.ModuleType("IPython")
    display = types.ModuleType("IPython.display")
    display.display = fake.display  # type: ignore[attr-defined]
    ipython.display = display  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return fake


def device_answer_with_query() -> dict[str, Any]:
    return {"device_code": "dev-secret-123", "user_code": "ABCD-EFGH",
            "verification_uri": "https://idp.example/device",
            "verification_uri_complete": "https://idp.example/device?user_code=ABCD-EFGH&x=<1>",
            "expires_in": 600, "interval": 1}


def script_login(fake_server, pending: int = 1) -> dict[str, Any]:
    fake_server.reply("POST", DEVICE, 200, device_answer_with_query())
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"), times=pending)
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    return answer


def run_cell(body: Any) -> Any:
    """Run *body* (a plain function) as a notebook cell: inside a running event loop."""
    async def cell() -> Any:
        CELL.set("cell 7")
        asyncio.get_running_loop()  # there is a running loop, as in a kernel
        return body()

    return asyncio.run(cell())


@pytest.mark.timeout(30)
def test_sync_authenticate_in_a_cell_shows_a_clickable_link(notebook, fake_server, capsys):
    answer = script_login(fake_server)
    token = run_cell(lambda: oac.authenticate(fake_server.url, timeout=20))
    assert token["access_token"] == answer["access_token"]
    (call,) = notebook.calls
    assert call["kwargs"] == {"raw": True, "display_id": True}  # updated in place later
    (bundle,) = call["objs"]
    html, text = bundle["text/html"], bundle["text/plain"]
    uri = "https://idp.example/device?user_code=ABCD-EFGH&amp;x=&lt;1&gt;"  # escaped
    assert f'<a href="{uri}" target="_blank" rel="noopener">{uri}</a>' in html
    assert "<code>ABCD-EFGH</code>" in html
    assert fake_server.url in html
    assert "https://idp.example/device?user_code=ABCD-EFGH&x=<1>" in text  # plain fallback
    assert "dev-secret-123" not in html + text
    # Shown once, as the link: no second copy of the prompt on stderr.
    out, err = capsys.readouterr()
    assert out == ""
    assert "ABCD-EFGH" not in err
    # The output belongs to the cell that called authenticate().
    assert call["cell"] == "cell 7"
    assert call["thread"] == "oidc-auth"  # the login ran beside the blocked loop


@pytest.mark.timeout(30)
def test_without_ipython_the_code_is_plain_text(monkeypatch, fake_server, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", None)  # import IPython raises ImportError
    monkeypatch.delitem(sys.modules, "IPython.display", raising=False)
    answer = script_login(fake_server)
    token = run_cell(lambda: oac.authenticate(fake_server.url, timeout=20))
    assert token["access_token"] == answer["access_token"]
    err = capsys.readouterr().err
    assert "To log in to" in err
    assert "https://idp.example/device?user_code=ABCD-EFGH&x=<1>" in err
    assert "confirm the code: ABCD-EFGH" in err
    assert "<a href" not in err


@pytest.mark.timeout(30)
def test_a_failing_display_falls_back_to_text(notebook, fake_server, capsys):
    notebook.fail = True
    script_login(fake_server)
    run_cell(lambda: oac.authenticate(fake_server.url, timeout=20))
    assert "confirm the code: ABCD-EFGH" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_outside_a_notebook_ipython_is_not_used(monkeypatch, fake_server, capsys):
    # IPython installed but no kernel (a plain script with BROWSER set): text, no display call.
    fake = FakeDisplay()
    display = types.ModuleType("IPython.display")
    display.display = fake.display  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.setenv("BROWSER", "true")
    monkeypatch.setattr(webbrowser, "open", lambda url, *args, **kwargs: True)
    answer = script_login(fake_server)
    assert oac.authenticate(fake_server.url, timeout=20)["access_token"] == answer["access_token"]
    assert fake.calls == []
    assert "confirm the code: ABCD-EFGH" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_a_cached_token_in_a_cell_needs_no_thread(notebook, fake_server, tmp_store, make_token):
    token = make_token()
    tmp_store.put(fake_server.url, token)
    before = threading.active_count()
    start = time.monotonic()
    assert run_cell(lambda: oac.authenticate(fake_server.url, store=tmp_store)) == token
    assert time.monotonic() - start < 0.5
    assert threading.active_count() == before
    assert fake_server.requests == []


@pytest.mark.timeout(30)
def test_the_loop_runs_on_as_soon_as_the_call_returns(notebook, fake_server, tmp_store,
                                                      make_token):
    # A refresh in a cell: the loop waits for the call and not a moment longer.
    tmp_store.put(fake_server.url, make_token(lifetime=-10))
    answer = token_answer()

    def slow(req: Any) -> tuple[int, dict[str, str], Any]:
        time.sleep(0.5)
        return 200, {}, answer

    fake_server.reply("POST", TOKEN, 200, slow)
    ticks: list[float] = []

    async def cell() -> tuple[oac.Token, float]:
        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        token = oac.authenticate(fake_server.url, store=tmp_store)  # sync, in the loop thread
        returned = time.monotonic()
        await asyncio.sleep(0.05)
        task.cancel()
        return token, returned

    token, returned = asyncio.run(cell())
    assert token["access_token"] == answer["access_token"]
    after = [t for t in ticks if t > returned]
    assert after and after[0] - returned < 0.05  # the loop resumed at once
    assert not [t for t in threading.enumerate() if t.name == "oidc-auth"]


@pytest.mark.timeout(30)
def test_await_authenticate_async_keeps_the_kernel_free(notebook, fake_server):
    # The non-blocking way in a notebook: `await authenticate_async(...)` in a cell.
    answer = script_login(fake_server, pending=2)
    ticks: list[float] = []

    async def cell() -> oac.Token:
        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(ticker())
        token = await oac.authenticate_async(fake_server.url, timeout=20)
        task.cancel()
        return token

    start = time.monotonic()
    token = asyncio.run(cell())
    elapsed = time.monotonic() - start
    assert token["access_token"] == answer["access_token"]
    assert elapsed > 2  # two pending polls, one second apart
    assert len(ticks) > elapsed / 0.05 * 0.5  # other cells' tasks kept running throughout
    assert len(notebook.calls) == 1


def run_in_kernel_loop(body: Any) -> Any:
    """Like a kernel: a loop that leaves SIGINT to Python's default handler."""
    async def cell() -> Any:
        return body()

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(cell())
    finally:
        loop.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", [run_in_kernel_loop, run_cell],
                         ids=["kernel-loop", "asyncio.run"])
def test_interrupting_the_kernel_cancels_the_login_at_once(notebook, fake_server, runner):
    # "Interrupt kernel" (or Ctrl-C) during a sync login.  A kernel's loop gets a
    # KeyboardInterrupt; asyncio.run (3.11+) cancels its main task instead.
    fake_server.reply("POST", DEVICE, 200, device_answer_with_query())
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    timer = threading.Timer(1.5, _thread.interrupt_main)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner(lambda: oac.authenticate(fake_server.url, timeout=60))
    finally:
        timer.cancel()
    assert time.monotonic() - start < 3  # not the 60-s timeout
    # The login in the worker thread was cancelled too: polling stops, the thread ends.
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t.name == "oidc-auth"]:
        assert time.monotonic() < deadline, "the login thread is still running"
        time.sleep(0.05)
    polls = len(fake_server.hits(TOKEN))
    time.sleep(1.5)
    assert len(fake_server.hits(TOKEN)) == polls


@pytest.mark.timeout(30)
def test_errors_in_a_cell_are_auth_errors(notebook, fake_server):
    fake_server.reply("POST", DEVICE, 200, device_answer_with_query())
    fake_server.reply("POST", TOKEN, 400, oauth_error("access_denied"))
    with pytest.raises(oac.AuthError) as info:
        run_cell(lambda: oac.authenticate(fake_server.url, timeout=20))
    assert "denied" in info.value.message
