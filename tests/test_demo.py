"""GET /demo: the browser demo's built files (server/demo.py), served from
DEMO_DIR; only its own files, and a sentence saying how to build it when it
is not built. The demo itself is tested in Chromium (clients/ts/demo/test)."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from server.config import Config, ConfigError
from tests.conftest import ServerProcess

INDEX = "<!doctype html><title>demo</title><script type=module src=demo/demo.js></script>"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    out = root / "dist"
    out.mkdir()
    (out / "index.html").write_text(INDEX)
    (out / "demo.js").write_text("console.log('demo')")
    (out / "notes.txt").write_text("not a file of the page")
    (out / "sub").mkdir()
    (out / "sub" / "inner.js").write_text("nested")
    (root / "secret.js").write_text("outside the demo")
    return out


@pytest.fixture(scope="module")
async def demo_server(stack, built) -> AsyncIterator[ServerProcess]:
    proc = await ServerProcess(stack, DEMO_DIR=str(built)).start()
    yield proc
    await proc.stop()


async def get(server: ServerProcess, path: str) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(server.http + path, allow_redirects=False) as r:
            return r.status, dict(r.headers), await r.text()


async def test_the_page_and_its_files_are_served_with_their_types(demo_server):
    status, headers, body = await get(demo_server, "/demo")
    assert (status, body) == (200, INDEX)
    assert headers["Content-Type"].startswith("text/html")
    status, headers, body = await get(demo_server, "/demo/demo.js")
    assert (status, body) == (200, "console.log('demo')")
    assert headers["Content-Type"].startswith("text/javascript")


async def test_the_trailing_slash_leads_to_the_page_so_its_relative_names_resolve(demo_server):
    status, headers, _ = await get(demo_server, "/demo/")
    assert status == 302
    async with aiohttp.ClientSession() as s:
        async with s.get(demo_server.http + "/demo/") as r:
            assert (r.status, r.url.path, await r.text()) == (200, "/demo", INDEX)


@pytest.mark.parametrize("path", ["/demo/nope.js", "/demo/notes.txt", "/demo/sub/inner.js", "/demo/..%2Fsecret.js",
                                  "/demo/%2E%2E%2Fsecret.js", "/demo/.hidden.js", "/demo/index.html%00.js"])
async def test_nothing_but_the_pages_own_files_is_served(demo_server, path):
    status, _, body = await get(demo_server, path)
    assert status == 404
    assert "outside" not in body and "nested" not in body


async def test_a_server_without_a_built_demo_says_how_to_build_it(stack, tmp_path):
    proc = await ServerProcess(stack, DEMO_DIR=str(tmp_path / "not-built")).start()
    try:
        for path in ("/demo", "/demo/demo.js"):
            status, headers, body = await get(proc, path)
            assert status == 404
            assert headers["Content-Type"].startswith("text/plain")
            assert "make demo" in body
    finally:
        await proc.stop()


def test_demo_dir_naming_a_file_is_refused_naming_the_variable(monkeypatch, tmp_path):
    file = tmp_path / "index.html"
    file.write_text(INDEX)
    monkeypatch.setenv("DEMO_DIR", str(file))
    with pytest.raises(ConfigError, match="DEMO_DIR"):
        Config.from_env()
    monkeypatch.setenv("DEMO_DIR", "")
    assert Config.from_env().demo_dir == ""
