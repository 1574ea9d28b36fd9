"""The web dashboard's files as served (in memory, no browser): content types, the
Content-Security-Policy, ETag revalidation, unknown names, and that the page refers
only to files that exist and contains nothing the CSP would block."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from lokid.http.dashboard import create_dashboard_surface
from lokid.http.surface import Surface
from lokid.http.web import load_web_files

from .asgi import call

WEB = Path(__file__).resolve().parent.parent / "lokid" / "web"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
IMPORT = re.compile(r"""^\s*import\s+(?:[^'"]*?\s+from\s+)?["']([^"']+)["']""", re.MULTILINE)
DYNAMIC_IMPORT = re.compile(r"""\bimport\(\s*["']([^"']+)["']\s*\)""")


class FakeDaemon:
    def core_problems(self) -> dict[str, str]:
        return {}

    def readiness_problems(self) -> dict[str, str]:
        return {}

    def uptime_seconds(self) -> float:
        return 1.0

    async def status(self) -> dict[str, Any]:
        return {"status": "idle"}


@pytest.fixture
def surface() -> Surface:
    return create_dashboard_surface(FakeDaemon())


@pytest.mark.parametrize(
    ("path", "content_type", "start"),
    [
        ("/", "text/html; charset=utf-8", b"<!doctype html>"),
        ("/ui/index.html", "text/html; charset=utf-8", b"<!doctype html>"),
        ("/ui/app.js", "text/javascript; charset=utf-8", b"/**"),
        ("/ui/styles.css", "text/css; charset=utf-8", b"/*"),
        ("/ui/logo.svg", "image/svg+xml", b"<svg"),
    ],
)
async def test_files_are_served_with_type_csp_and_etag(
    surface: Surface, path: str, content_type: str, start: bytes
) -> None:
    answer = await call(surface, "GET", path)
    assert answer.status == 200
    assert answer.headers["content-type"] == content_type
    assert answer.body.startswith(start)
    assert answer.headers["content-security-policy"] == CSP
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-cache"
    etag = answer.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{20}"', etag)

    again = await call(surface, "GET", path, headers={"If-None-Match": etag})
    assert again.status == 304
    assert again.body == b""
    assert again.headers["etag"] == etag
    assert again.headers["content-security-policy"] == CSP
    assert "content-length" not in again.headers  # RFC 9110 §8.6: not 0 for a 304

    stale = await call(surface, "GET", path, headers={"If-None-Match": '"0000"'})
    assert stale.status == 200 and stale.body == answer.body


@pytest.mark.parametrize("name", ["nothing.js", "..%2Fweb.py", "__init__.py", "app.js.map"])
async def test_unknown_names_are_404_in_the_error_body(surface: Surface, name: str) -> None:
    answer = await call(surface, "GET", f"/ui/{name}")
    assert answer.status == 404
    assert answer.json()["error"]["code"] == "NOT_FOUND"


def test_every_servable_file_is_in_the_package() -> None:
    served = set(load_web_files())
    on_disk = {p.name for p in WEB.iterdir() if p.suffix in (".html", ".js", ".css", ".svg")}
    assert served == on_disk
    assert {"index.html", "app.js", "api.js", "sse.js", "ws.js", "styles.css"} <= served


class References(HTMLParser):
    """src/href of every element, inline scripts and style attributes of index.html."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.style_attributes: list[str] = []
        self.style_elements = 0
        self.event_attributes: list[str] = []
        self._in_script_without_src = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            value = values.get(name)
            if value is not None:
                self.urls.append(value)
        if "style" in values:
            self.style_attributes.append(tag)
        self.event_attributes += [name for name, _ in attrs if name.startswith("on")]
        if tag == "style":
            self.style_elements += 1
        self._in_script_without_src = tag == "script" and "src" not in values

    def handle_data(self, data: str) -> None:
        if self._in_script_without_src and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script_without_src = False


def test_the_page_refers_only_to_files_that_exist_and_has_nothing_inline() -> None:
    parser = References()
    parser.feed((WEB / "index.html").read_text())
    assert parser.inline_scripts == 0
    assert parser.style_attributes == [] and parser.style_elements == 0
    assert parser.event_attributes == []
    files = [url for url in parser.urls if not url.startswith("#")]
    assert files, "index.html loads nothing?"
    for url in files:
        assert url.startswith("/ui/"), f"index.html refers to {url} (only /ui/<file> is served)"
        assert (WEB / url.removeprefix("/ui/")).is_file(), f"index.html refers to missing {url}"
    assert "/ui/app.js" in files and "/ui/styles.css" in files


def test_every_module_import_names_an_existing_file() -> None:
    modules = sorted(WEB.glob("*.js"))
    seen: set[str] = set()
    for module in modules:
        text = module.read_text()
        for target in IMPORT.findall(text) + DYNAMIC_IMPORT.findall(text):
            assert target.startswith("./") or target.startswith("/ui/"), (module.name, target)
            name = target.removeprefix("./").removeprefix("/ui/")
            assert (WEB / name).is_file(), f"{module.name} imports missing {target}"
            seen.add(name)
        # what the CSP would block, or what would parse API data as markup
        assert ".innerHTML" not in text and ".outerHTML" not in text, module.name
        assert ".insertAdjacentHTML" not in text and "document.write(" not in text, module.name
        assert 'setAttribute("style"' not in text and "eval(" not in text, module.name
    # every module is reachable from app.js (no dead file shipped)
    assert {m.name for m in modules} - {"app.js"} <= seen
