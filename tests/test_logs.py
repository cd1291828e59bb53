"""Log lines: JSON by default, each with time, level, logger, message and pid,
and a call's id, method and user when written during the call; the ``ref``
of an ``internal`` reply is that call id. ``LOG_FORMAT=text`` for a terminal."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time

from tests.conftest import ROOT, ServerProcess, register


async def _crash_logged(stack, **env: str) -> tuple[str, str, str]:
    """(the ``ref`` of a ``test.crash`` reply, the caller's user id, the
    server's whole log once the ref is in it)."""
    proc = ServerProcess(stack, test_methods=True, **env)
    proc.stderr = tempfile.TemporaryFile()
    await proc.start()
    try:
        async with await proc.connect() as c:
            user_id = (await register(c))["user"]["id"]
            reply = await c.call_raw("test.crash", {})
        assert reply["error"]["code"] == "internal"
        ref = reply["error"]["data"]["ref"]
        deadline = time.monotonic() + 5
        while True:  # another process writes the log: a bounded poll
            proc.stderr.seek(0)
            text = proc.stderr.read().decode()
            if ref in text:
                return ref, user_id, text
            assert time.monotonic() < deadline, text[-2000:]
            await asyncio.sleep(0.02)
    finally:
        await proc.stop()
        proc.stderr.close()


async def test_json_lines_carry_the_call_id_method_and_user_and_the_ref_is_the_call_id(stack):
    ref, user_id, text = await _crash_logged(stack, LOG_LEVEL="INFO")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    (crash,) = [line for line in lines if line.get("ref") == ref]
    assert crash["level"] == "ERROR" and crash["logger"] == "hangout.socket"
    assert crash["call_id"] == ref and crash["method"] == "test.crash" and crash["user"] == user_id
    assert ref in crash["message"]
    assert "RuntimeError: deliberate bug" in crash["exc_info"]  # with its traceback
    assert isinstance(crash["pid"], int) and crash["time"].endswith("+00:00")
    # Outside a call, no call fields: the context does not leak.
    serving = [line for line in lines if line["message"].startswith("serving on")]
    assert serving and all("call_id" not in line for line in serving)
    assert all({"time", "level", "logger", "message", "pid"} <= set(line) for line in lines)


async def test_text_lines_put_the_call_in_brackets(stack):
    ref, user_id, text = await _crash_logged(stack, LOG_FORMAT="text")
    (line,) = [line for line in text.splitlines() if f"ref={ref}" in line]
    assert " ERROR hangout.socket: internal error in test.crash" in line
    assert line.endswith(f"[call={ref} method=test.crash user={user_id}]")
    assert "RuntimeError: deliberate bug" in text


async def test_an_unknown_log_format_refuses_to_start_naming_it(stack):
    env = ServerProcess(stack, LOG_FORMAT="xml").env
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 2 and "LOG_FORMAT" in err.decode()
