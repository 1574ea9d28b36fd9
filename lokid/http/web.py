"""The web dashboard's files: `GET /` and `GET /ui/{name}` on the dashboard listener.

Rules:

* The page is plain HTML, CSS and JavaScript modules from `lokid/web/`
  (package data): no build step, no CDN, works offline.
* Every file is read once, when the surface is built, into a fixed table;
  a request can only name a file of that table (no path from the request
  ever reaches the file system, so no traversal).
* The files are open (`requires="open"`): with auth on, the page loads,
  asks for a token, and sends it with every API call. The files hold no
  data, only code.
* Answers carry a strict Content-Security-Policy (same origin only, no
  inline script), `nosniff`, no framing, and `Cache-Control: no-cache` with
  an `ETag`, so a browser revalidates after an upgrade.
* The page is same-origin with everything it calls: the dashboard listener
  also serves the session routes (`lokid.http.dashboard`), so no CORS.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import attrs

from lokid.http.errors import ApiError
from lokid.http.gate import OPEN
from lokid.http.surface import LeanResponse, Param, Scope, Surface, header, path_param

__all__ = ["WebFile", "install_web", "load_web_files"]

WEB_PACKAGE = "lokid.web"
INDEX = "index.html"
MAX_FILES = 64  # the page's own files; more means something is wrong with the package
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
)


@attrs.frozen
class WebFile:
    name: str
    body: bytes
    content_type: bytes
    etag: bytes

    def answer(self, if_none_match: str | None) -> LeanResponse:
        headers = ((b"content-type", self.content_type), (b"etag", self.etag), *SECURITY_HEADERS)
        if if_none_match is not None and if_none_match.encode() == self.etag:
            return LeanResponse(304, b"", headers)
        return LeanResponse(200, self.body, headers)


def load_web_files() -> dict[str, WebFile]:
    """Every servable file of `lokid/web/`, by name (flat: no sub-folders)."""
    files: dict[str, WebFile] = {}
    for entry in resources.files(WEB_PACKAGE).iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or suffix not in CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        files[entry.name] = WebFile(entry.name, body, CONTENT_TYPES[suffix], etag)
    if INDEX not in files or len(files) > MAX_FILES:
        raise RuntimeError(f"the web dashboard's files in {WEB_PACKAGE} are incomplete or too many")
    return files


IF_NONE_MATCH = Param(
    "If-None-Match", "header", description="the ETag of a copy the client has: 304 if current"
)


def _media(content_type: bytes) -> str:
    return content_type.decode().partition(";")[0]


def install_web(surface: Surface) -> None:
    files = load_web_files()
    text = {"type": "string"}

    @surface.lean(
        "GET",
        "/",
        "The web dashboard (an HTML page)",
        responses={200: "The page", 304: "Not modified"},
        params=(IF_NONE_MATCH,),
        content={200: {_media(files[INDEX].content_type): text}},
        tags=["web"],
        requires=OPEN,
    )
    async def page(scope: Scope) -> LeanResponse:
        return files[INDEX].answer(header(scope, "if-none-match"))

    @surface.lean(
        "GET",
        "/ui/{name}",
        "A file of the web dashboard (script, style sheet or image)",
        responses={200: "The file", 304: "Not modified", 404: "No such file"},
        params=[
            Param(
                "name",
                "path",
                {"type": "string", "enum": sorted(files)},
                required=True,
                description="file name, e.g. app.js",
            ),
            IF_NONE_MATCH,
        ],
        content={200: {_media(t): text for t in sorted({f.content_type for f in files.values()})}},
        tags=["web"],
        requires=OPEN,
    )
    async def asset(scope: Scope) -> LeanResponse:
        file = files.get(path_param(scope, "name"))
        if file is None:
            raise ApiError("NOT_FOUND", "No such file of the web dashboard")
        return file.answer(header(scope, "if-none-match"))
