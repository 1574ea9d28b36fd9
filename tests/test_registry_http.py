"""Registry routes over in-memory ASGI: a `Surface` with a real store, audit writer and a
running `RegistryScanner` (no sockets, no daemon). Every route, its bad input (the seed's
error body), file-system trouble in the answer (never a 500), notifications, the audit of
`discover?register=true`, the job bound, and the periodic sync on a mock clock."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
import threading
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from lokid import registry
from lokid.actors.audit_writer import AuditWriter, list_audit
from lokid.actors.registry_scanner import RegistryScanner, RegistryScannerStatistics
from lokid.actors.store import StoreActor
from lokid.http.gate import Gate
from lokid.http.registry import install_registry
from lokid.http.surface import Surface
from lokid.tokens import create_token

from .asgi import Answer, call
from .child_status import StubChildStatus
from .test_registry import locked

Note = tuple[str, dict[str, Any]]


@attrs.frozen
class Rig:
    surface: Surface
    scanner: RegistryScanner
    store: StoreActor
    notes: list[Note]
    home: pathlib.Path

    async def get(self, path: str, **kwargs: Any) -> Answer:
        return await call(self.surface, "GET", path, **kwargs)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Answer:
        data = (
            b""
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        return await call(self.surface, "POST", path, body=data, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Answer:
        return await call(self.surface, "DELETE", path, **kwargs)

    async def register(self, path: pathlib.Path, name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"path": str(path)}
        if name is not None:
            body["name"] = name
        answer = await self.post("/api/registry/projects", body)
        assert answer.status == 201, answer.json()
        entry: dict[str, Any] = answer.json()
        return entry

    def updates(self) -> list[dict[str, Any]]:
        return [data for kind, data in self.notes if kind == "registry.updated"]


@contextlib.asynccontextmanager
async def rig(
    tmp_path: pathlib.Path,
    *,
    auth: bool = False,
    deadline: float | None = 30.0,
    **options: Any,
) -> AsyncIterator[Rig]:
    """Store, audit writer and scanner running; a surface with the registry routes."""
    store = StoreActor(tmp_path / "lokid.db")
    writer = AuditWriter(store)
    notes: list[Note] = []
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    options.setdefault("initial_sync", False)
    scanner = RegistryScanner(
        store,
        loki_home=home,
        notify=lambda kind, data: notes.append((kind, data)),
        **options,
    )
    statuses = [StubChildStatus() for _ in range(3)]
    with trio.fail_after(deadline) if deadline is not None else contextlib.nullcontext():
        async with trio.open_nursery() as nursery:
            for actor, status in zip((store, writer, scanner), statuses, strict=True):
                nursery.start_soon(functools.partial(actor.run, task_status=status))
                await status.started_event.wait()
            surface = Surface("test", "0")
            gate = Gate(auth_enabled=auth, store=store, audit=writer)
            surface.gate = gate
            install_registry(surface, scanner, gate)
            yield Rig(surface, scanner, store, notes, home)
            for status in reversed(statuses):
                status.shutdown_requested.set()


def project(path: pathlib.Path, tasks: dict[str, Any] | None = None) -> pathlib.Path:
    queue = path / ".loki" / "queue"
    queue.mkdir(parents=True)
    for name, value in (tasks or {}).items():
        (queue / f"{name}.json").write_text(json.dumps(value))
    return path


def project_file(root: pathlib.Path, relative: bytes, text: str) -> None:
    """Write `text` to the file named by the bytes `relative` (which need not be UTF-8)."""
    pathlib.Path(os.fsdecode(os.fsencode(root) + b"/" + relative)).write_text(text)


def task(id: str, status: str = "pending") -> dict[str, Any]:
    return {"id": id, "title": f"task {id}", "status": status}


def error_of(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, answer.body
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"code", "message", "details"}
    assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


async def audit_entries(store: StoreActor) -> list[dict[str, Any]]:
    answer = await store.read(lambda db: list_audit(db, limit=1000))
    return list(reversed(answer["entries"]))


# -- register, list, get, unregister ----------------------------------------------------------


async def test_register_answers_the_entry_and_lists_it(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a"), task("b")], "failed": [task("c")]})
    async with rig(tmp_path) as r:
        entry = await r.register(alpha, name="Alpha")
        real = str(alpha.resolve())
        assert entry == {
            "id": registry.registry_id(real),
            "name": "Alpha",
            "path": real,
            "status": "ok",
            "has_loki": True,
            "registered_at": entry["registered_at"],
            "last_seen": entry["registered_at"],
            "tasks": {"pending": 2, "active": 0, "completed": 0, "failed": 1, "total": 3},
        }
        assert entry["registered_at"].endswith("Z")
        plain = tmp_path / "plain"
        plain.mkdir()
        second = await r.register(plain)
        assert (second["name"], second["has_loki"], second["tasks"]["total"]) == ("plain", False, 0)
        listed = (await r.get("/api/registry/projects")).json()
        assert [p["id"] for p in listed["projects"]] == [second["id"], entry["id"]]  # newest first
        assert (listed["total"], listed["limit"], listed["offset"]) == (2, 100, 0)
        one = await r.get(f"/api/registry/projects/{entry['id']}")
        assert one.status == 200 and one.json() == entry
        assert [d["action"] for d in r.updates()] == ["registered", "registered"]
        assert r.updates()[0]["project"] == entry
        # it is in the table: a fresh scanner (restart) loads it
        rows = await r.store.read(lambda db: list(db.query("SELECT id, path FROM registry")))
        assert {row["id"] for row in rows} == {entry["id"], second["id"]}


async def test_the_same_real_path_twice_is_409(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha")
    (tmp_path / "alias").symlink_to(alpha)
    async with rig(tmp_path) as r:
        entry = await r.register(alpha)
        again = await r.post("/api/registry/projects", {"path": str(tmp_path / "alias")})
        error = error_of(again, 409, "CONFLICT")
        assert error["details"]["id"] == entry["id"]
        again = await r.post("/api/registry/projects", {"path": str(alpha) + "/"})
        error_of(again, 409, "CONFLICT")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "path"),
        ({"path": ""}, "path"),
        ({"path": 7}, "path"),
        ({"path": "relative/dir"}, "path"),
        ({"path": "/no/such/folder/anywhere"}, "path"),
        ({"path": "/etc/hostname"}, "path"),
        ({"path": "/tmp", "name": ""}, "name"),
        ({"path": "/tmp", "name": "x" * 201}, "name"),
        ({"path": "/tmp", "name": 3}, "name"),
        ({"path": "/tmp", "name": "a\u0000b\u001b[31mred"}, "name"),
        ({"path": "/tmp", "name": "two\nlines"}, "name"),
        ({"path": "/tmp", "name": "tab\there"}, "name"),
        ({"path": "/tmp", "name": "evil\u202etxt.exe"}, "name"),
        ({"path": "/tmp", "name": "para\u2029graph"}, "name"),
        ({"path": "/tmp", "name": "c1\u009bcontrol"}, "name"),
        ({"path": "/tmp", "alias": "a"}, "alias"),
    ],
)
async def test_bad_register_bodies_are_422_naming_the_field(
    tmp_path: pathlib.Path, body: dict[str, Any], field: str
) -> None:
    async with rig(tmp_path) as r:
        answer = await r.post("/api/registry/projects", body)
        error = error_of(answer, 422, "VALIDATION_ERROR")
        assert error["details"]["field"] == field
        assert r.updates() == []


async def test_a_name_with_control_characters_is_refused_and_a_folders_is_made_safe(
    tmp_path: pathlib.Path,
) -> None:
    """Names are shown in `loki registry ls`: an escape sequence must not reach a terminal."""
    odd = project(tmp_path / "odd\x1b[2Jname")
    async with rig(tmp_path) as r:
        answer = await r.post("/api/registry/projects", {"path": str(odd), "name": "x\x1b[31m"})
        error = error_of(answer, 422, "VALIDATION_ERROR")
        assert error["details"]["field"] == "name" and "U+001B" in error["message"]
        entry = await r.register(odd)
        assert entry["name"] == "odd\ufffd[2Jname" and entry["path"] == str(odd)
        found = (await r.get(f"/api/registry/discover?roots={tmp_path}")).json()
        assert [p["name"] for p in found["projects"]] == ["odd\ufffd[2Jname"]
        named = await r.register(project(tmp_path / "fine"), name="  Zürich ✓ 👩\u200d💻 ")
        assert named["name"] == "Zürich ✓ 👩\u200d💻"


async def test_malformed_json_is_400(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        error_of(await r.post("/api/registry/projects", b"{nope"), 400, "BAD_REQUEST")
        error_of(await r.post("/api/registry/projects", b"[1]"), 400, "BAD_REQUEST")


async def test_a_path_of_an_unknown_user_is_not_resolved_against_the_working_folder(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "~nosuchuser-lokid" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # where a relative "~nosuchuser-lokid/x" would be found
    async with rig(tmp_path) as r:
        answer = await r.post("/api/registry/projects", {"path": "~nosuchuser-lokid/x"})
        error = error_of(answer, 422, "VALIDATION_ERROR")
        assert error["details"]["field"] == "path"
        assert "no user 'nosuchuser-lokid'" in error["message"], error


async def test_a_missing_folder_says_so(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        gone = tmp_path / "gone"
        answer = await r.post("/api/registry/projects", {"path": str(gone)})
        error = error_of(answer, 422, "VALIDATION_ERROR")
        assert "does not exist" in error["message"] and error["details"]["kind"] == "missing"


async def test_idempotency_key_answers_a_retry_with_the_first_answer(
    tmp_path: pathlib.Path,
) -> None:
    alpha = project(tmp_path / "alpha")
    beta = project(tmp_path / "beta")
    key = {"Idempotency-Key": "reg-once-1"}
    async with rig(tmp_path) as r:
        first = await r.post("/api/registry/projects", {"path": str(alpha)}, headers=key)
        assert first.status == 201
        retry = await r.post("/api/registry/projects", {"path": str(alpha)}, headers=key)
        assert (retry.status, retry.json()) == (201, first.json())
        other = await r.post("/api/registry/projects", {"path": str(beta)}, headers=key)
        error_of(other, 409, "CONFLICT")
        assert len(r.updates()) == 1
        bad = await r.post("/api/registry/projects", {"path": str(beta)},
                           headers={"Idempotency-Key": ""})  # fmt: skip
        error_of(bad, 400, "BAD_REQUEST")


async def test_unregister_then_404s(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha")
    async with rig(tmp_path) as r:
        entry = await r.register(alpha)
        gone = await r.delete(f"/api/registry/projects/{entry['id']}")
        assert (gone.status, gone.body) == (204, b"")
        assert alpha.is_dir()  # files untouched
        error_of(await r.delete(f"/api/registry/projects/{entry['id']}"), 404, "NOT_FOUND")
        error_of(await r.get(f"/api/registry/projects/{entry['id']}"), 404, "NOT_FOUND")
        error_of(await r.get(f"/api/registry/projects/{entry['id']}/health"), 404, "NOT_FOUND")
        assert (await r.get("/api/registry/projects")).json()["total"] == 0
        assert r.updates()[-1] == {
            "action": "unregistered",
            "id": entry["id"],
            "path": entry["path"],
        }
        assert (await r.register(alpha))["id"] == entry["id"]  # may come back


async def test_list_filters_and_pages(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        made = [await r.register(project(tmp_path / f"p{i}")) for i in range(3)]
        shutil.rmtree(tmp_path / "p1")
        await r.post("/api/registry/sync")
        missing = (await r.get("/api/registry/projects?status=missing")).json()
        assert [p["id"] for p in missing["projects"]] == [made[1]["id"]]
        page = (await r.get("/api/registry/projects?limit=1&offset=1")).json()
        assert [p["id"] for p in page["projects"]] == [made[1]["id"]] and page["total"] == 3
        for query, field in (("status=gone", "status"), ("limit=0", "limit"),
                             ("limit=1001", "limit"), ("offset=-1", "offset")):  # fmt: skip
            error = error_of(await r.get(f"/api/registry/projects?{query}"), 400, "BAD_REQUEST")
            assert error["details"]["field"] == field


@pytest.mark.parametrize("route", ["projects", "discover", "tasks", "learnings"])
async def test_a_query_parameter_the_route_does_not_take_is_400(
    tmp_path: pathlib.Path, route: str
) -> None:
    """Not ignored: `?state=missing` must not look like a filter that was applied."""
    async with rig(tmp_path) as r:
        documented = "depth=2" if route == "discover" else "limit=5"  # discover is not paged
        answer = await r.get(f"/api/registry/{route}?{documented}&state=missing")
        error = error_of(answer, 400, "BAD_REQUEST")
        assert error["details"]["field"] == "state" and "not a query parameter" in error["message"]


# -- health ----------------------------------------------------------------------------------


async def test_health_healthy_degraded_missing(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a")]})
    async with rig(tmp_path) as r:
        entry = await r.register(alpha)
        url = f"/api/registry/projects/{entry['id']}/health"
        healthy = (await r.get(url)).json()
        assert healthy["status"] == "healthy" and healthy["id"] == entry["id"]
        assert set(healthy["checks"]) == {
            "path",
            "loki_dir",
            "queue",
            "state_files",
            "session",
            "activity",
            "disk",
        }
        (alpha / ".loki" / "autonomy-state.json").write_text("[]")
        degraded = (await r.get(url)).json()
        assert degraded["status"] == "degraded" and degraded["problems"]
        shutil.rmtree(alpha)
        missing = await r.get(url)
        assert missing.status == 200 and missing.json()["status"] == "missing"


# -- discover --------------------------------------------------------------------------------


def tree(root: pathlib.Path) -> list[pathlib.Path]:
    return [
        project(root / "a" / "one"),
        project(root / "b" / "two"),
        project(root / "c" / "d" / "three"),
    ]


async def test_discover_finds_projects_with_registered_flags(tmp_path: pathlib.Path) -> None:
    made = tree(tmp_path / "root")
    async with rig(tmp_path) as r:
        await r.register(made[0])
        answer = await r.get(f"/api/registry/discover?roots={tmp_path / 'root'}&depth=2")
        assert answer.status == 200
        body = answer.json()
        assert next(iter(body)) == "projects"  # the first list: what clients take as the items
        got = [(p["name"], p["registered"]) for p in body["projects"]]
        assert got == [("one", True), ("two", False)]  # three is at depth 3
        assert body["total"] == 2 and body["depth"] == 2 and body["errors"] == []
        assert body["roots"][0]["status"] == "ok"
        assert "registered" not in body  # nothing was registered
        deeper = (await r.get(f"/api/registry/discover?roots={tmp_path / 'root'}&depth=3")).json()
        assert deeper["total"] == 3


async def test_discover_roots_comma_list_last_key_counts_and_defaults(
    tmp_path: pathlib.Path,
) -> None:
    project(tmp_path / "x" / "p1")
    project(tmp_path / "y" / "p2")
    async with rig(tmp_path, default_roots=(str(tmp_path / "y"), str(tmp_path / "none"))) as r:
        both = f"/api/registry/discover?roots={tmp_path / 'x'},{tmp_path / 'y'}"
        assert [p["name"] for p in (await r.get(both)).json()["projects"]] == ["p1", "p2"]
        repeated = f"/api/registry/discover?roots={tmp_path / 'x'}&roots={tmp_path / 'y'}"
        last = (await r.get(repeated)).json()  # a repeated key: its last value (docs/http.md)
        assert [p["name"] for p in last["projects"]] == ["p2"]
        assert [root["given"] for root in last["roots"]] == [str(tmp_path / "y")]
        default = (await r.get("/api/registry/discover")).json()
        assert [p["name"] for p in default["projects"]] == ["p2"]
        assert [root["status"] for root in default["roots"]] == ["ok", "missing"]
        assert default["errors"] == []  # a default root that does not exist is no error


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("depth=0", "depth"),
        ("depth=11", "depth"),
        ("depth=x", "depth"),
        ("roots=relative/path", "roots"),
        ("register=maybe", "register"),
        ("roots=" + ",".join(f"/r{i}" for i in range(33)), "roots"),
        ("roots=", "roots"),  # not "the configured roots"
        ("roots=,,", "roots"),
        ("roots=/tmp,", "roots"),
        ("roots=%20", "roots"),
        ("roots=~nosuchuser-lokid/x", "roots"),  # not a folder below the working folder
    ],
)
async def test_discover_bad_query_values_are_400(
    tmp_path: pathlib.Path, query: str, field: str
) -> None:
    async with rig(tmp_path) as r:
        answer = await r.get(f"/api/registry/discover?{query}")
        assert error_of(answer, 400, "BAD_REQUEST")["details"]["field"] == field


async def test_discover_reports_trouble_in_the_answer_never_a_500(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    project(root / "kept")
    project(root / "doomed" / "p")
    project(root / "locked" / "p")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    real_scandir = os.scandir

    def scandir(path: str) -> Any:
        if path.endswith("/doomed"):
            shutil.rmtree(path)  # deleted during the scan
        if path.endswith("/locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(registry, "_scandir", scandir)
    async with rig(tmp_path) as r:
        answer = await r.get(f"/api/registry/discover?roots={root},{loop},{tmp_path / 'none'}")
        assert answer.status == 200
        body = answer.json()
        assert [p["name"] for p in body["projects"]] == ["kept"]
        assert sorted(e["kind"] for e in body["errors"]) == [
            "missing",
            "permission_denied",
            "symlink_loop",
            "vanished",
        ]


async def test_discover_register_true_registers_audits_and_notifies(
    tmp_path: pathlib.Path,
) -> None:
    made = tree(tmp_path / "root")
    async with rig(tmp_path) as r:
        known = await r.register(made[0])
        url = f"/api/registry/discover?roots={tmp_path / 'root'}&depth=3&register=true"
        body = (await r.get(url)).json()
        assert body["registered"] == 2
        assert [(p["name"], p["registered"], p["registered_now"]) for p in body["projects"]] == [
            ("one", True, False),
            ("two", True, True),
            ("three", True, True),
        ]
        listed = (await r.get("/api/registry/projects")).json()
        assert listed["total"] == 3 and known["id"] in {p["id"] for p in listed["projects"]}
        assert r.updates()[-1]["action"] == "discovered" and r.updates()[-1]["count"] == 2
        entries = await audit_entries(r.store)
        discover = [e for e in entries if e["action"] == "registry.discover"]
        assert len(discover) == 1
        assert discover[0]["details"] == {"registered": 2} and discover[0]["status"] == 200
        again = (await r.get(url)).json()
        assert again["registered"] == 0
        # a plain discover is a read: not audited
        await r.get(f"/api/registry/discover?roots={tmp_path / 'root'}")
        after = [e for e in await audit_entries(r.store) if e["action"] == "registry.discover"]
        assert len(after) == 2


async def test_discover_register_needs_the_write_scope(tmp_path: pathlib.Path) -> None:
    tree(tmp_path / "root")
    async with rig(tmp_path, auth=True) as r:
        reader = await r.store.write(lambda db: create_token(db, {"name": "r", "scopes": ["read"]}))
        writer = await r.store.write(
            lambda db: create_token(db, {"name": "w", "scopes": ["write"]})
        )
        url = f"/api/registry/discover?roots={tmp_path / 'root'}&register=true"
        as_reader = {"Authorization": f"Bearer {reader['token']}"}
        refused = await r.get(url, headers=as_reader)
        assert error_of(refused, 403, "FORBIDDEN")["details"]["required_scope"] == "write"
        assert (await r.get("/api/registry/projects", headers=as_reader)).json()["total"] == 0
        plain = await r.get(url.replace("&register=true", ""), headers=as_reader)
        assert plain.status == 200 and plain.json()["total"] == 3
        as_writer = {"Authorization": f"Bearer {writer['token']}"}
        assert (await r.get(url, headers=as_writer)).json()["registered"] == 3
        actions = [(e["action"], e["status"]) for e in await audit_entries(r.store)]
        assert ("auth.forbidden", 403) in actions and ("registry.discover", 200) in actions
        error_of(await r.get("/api/registry/projects"), 401, "UNAUTHORIZED")


async def test_a_folder_whose_name_is_not_utf8_is_reported_by_discover_and_register(
    tmp_path: pathlib.Path,
) -> None:
    """Such a folder cannot be named in JSON or stored: it is a `not_utf8` problem in a 200
    answer, never a 500 or a crashed scanner (it crashed the actor, then the daemon)."""
    root = tmp_path / "root"
    project(root / "good")
    bad = os.fsencode(root) + b"/bad\xffname"
    os.makedirs(bad + b"/.loki/queue")
    os.symlink(bad, os.fsencode(tmp_path / "link"))
    shown = f"{root}/bad\\xffname"
    async with rig(tmp_path) as r:
        for _ in range(3):
            for query in ("", "&register=true"):
                answer = await r.get(f"/api/registry/discover?roots={root}{query}")
                assert answer.status == 200, answer.body
                body = answer.json()
                assert [p["name"] for p in body["projects"]] == ["good"]
                assert [(e["kind"], e["path"]) for e in body["errors"]] == [("not_utf8", shown)]
        refused = await r.post("/api/registry/projects", {"path": str(tmp_path / "link")})
        error = error_of(refused, 422, "VALIDATION_ERROR")
        assert error["details"] == {"field": "path", "kind": "not_utf8", "path": shown}
        assert "bad\\xffname is not valid UTF-8" in error["message"]
        listed = (await r.get("/api/registry/projects")).json()
        assert [p["name"] for p in listed["projects"]] == ["good"]
        stats = r.scanner.statistics()
        assert (stats.running, stats.crashes) == (True, 0)


async def test_a_queue_file_whose_name_is_not_utf8_is_reported_by_tasks_and_sync(
    tmp_path: pathlib.Path,
) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a1")]})
    project_file(alpha, b".loki/queue/\xfe.json", json.dumps([task("b1")]))
    shown = f"{alpha}/.loki/queue/\\xfe.json"
    async with rig(tmp_path) as r:
        entry = await r.register(alpha)
        assert entry["tasks"]["total"] == 1
        tasks = await r.get("/api/registry/tasks")
        assert tasks.status == 200, tasks.body
        assert [t["id"] for t in tasks.json()["tasks"]] == ["a1"]
        assert [(e["kind"], e["path"]) for e in tasks.json()["errors"]] == [("not_utf8", shown)]
        project_file(alpha, b".loki/queue/review.json", '[{"id": "r\\ud800", "title": "t"}]')
        review = (await r.get("/api/registry/tasks?status=active")).json()
        assert [t["id"] for t in review["tasks"]] == ["r\ufffd"]  # a JSON "\\ud800"
        synced = await r.post("/api/registry/sync")
        assert synced.status == 200 and synced.json()["errors"][0]["path"] == shown
        health = await r.get(f"/api/registry/projects/{entry['id']}/health")
        assert health.status == 200 and health.json()["status"] == "healthy"


# -- sync ------------------------------------------------------------------------------------


async def test_sync_refreshes_status_and_counts_and_summarises(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a")]})
    beta = project(tmp_path / "beta")
    async with rig(tmp_path) as r:
        a = await r.register(alpha)
        b = await r.register(beta)
        r.notes.clear()
        quiet = (await r.post("/api/registry/sync")).json()
        assert (quiet["total"], quiet["ok"], quiet["missing"], quiet["updated"]) == (2, 2, 0, 0)
        assert r.updates() == []  # nothing changed: nothing announced
        (alpha / ".loki" / "queue" / "completed.json").write_text(json.dumps([task("z")]))
        shutil.rmtree(beta)
        summary = (await r.post("/api/registry/sync")).json()
        assert (summary["total"], summary["ok"], summary["missing"], summary["updated"]) == (
            2,
            1,
            1,
            2,
        )
        assert summary["errors"] == []
        got_a = (await r.get(f"/api/registry/projects/{a['id']}")).json()
        assert got_a["tasks"] == {
            "pending": 1,
            "active": 0,
            "completed": 1,
            "failed": 0,
            "total": 2,
        }
        assert got_a["last_seen"] >= a["last_seen"]
        got_b = (await r.get(f"/api/registry/projects/{b['id']}")).json()
        assert (got_b["status"], got_b["last_seen"]) == ("missing", quiet["synced_at"])
        [update] = r.updates()
        assert update["action"] == "synced" and sorted(update["ids"]) == sorted([a["id"], b["id"]])
        beta.mkdir()
        back = (await r.post("/api/registry/sync")).json()
        assert (back["ok"], back["missing"]) == (2, 0)
        actions = [e["action"] for e in await audit_entries(r.store)]
        assert actions.count("registry.sync") == 3


async def test_an_unreadable_folder_keeps_its_counts_and_agrees_everywhere(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent the daemon may not read (`chmod 700` by another user): the sync names the
    problem and the entry becomes `unreadable`, keeping `has_loki`, its counts and
    `last_seen`; its health says `unreadable` too; once readable again it is `ok`."""
    alpha = project(tmp_path / "parent" / "alpha", {"pending": [task("a"), task("b")]})
    async with rig(tmp_path) as r:
        entry = await r.register(alpha)
        url = f"/api/registry/projects/{entry['id']}"
        with locked(monkeypatch, alpha.parent):
            summary = (await r.post("/api/registry/sync")).json()
            health = (await r.get(f"{url}/health")).json()
        assert (summary["ok"], summary["missing"], summary["unreadable"]) == (0, 0, 1)
        assert [e["kind"] for e in summary["errors"]] == ["permission_denied"]
        got = (await r.get(url)).json()
        assert got == {**entry, "status": "unreadable"}
        assert health["status"] == "unreadable"
        assert health["checks"]["path"]["kind"] == "permission_denied"
        listed = (await r.get("/api/registry/projects?status=unreadable")).json()
        assert [p["id"] for p in listed["projects"]] == [entry["id"]]
        back = (await r.post("/api/registry/sync")).json()
        assert (back["ok"], back["unreadable"]) == (1, 0)
        again = (await r.get(url)).json()
        assert again["status"] == "ok" and again["tasks"] == entry["tasks"]
        assert again["last_seen"] >= entry["last_seen"]


async def test_sync_reports_malformed_queue_files(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a")]})
    async with rig(tmp_path) as r:
        await r.register(alpha)
        (alpha / ".loki" / "queue" / "failed.json").write_text("{oops")
        summary = (await r.post("/api/registry/sync")).json()
        assert [e["kind"] for e in summary["errors"]] == ["malformed"]
        assert summary["ok"] == 1


async def test_concurrent_syncs_coalesce(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        for i in range(3):
            await r.register(project(tmp_path / f"p{i}"))
        answers: list[Answer] = []

        async def one() -> None:
            answers.append(await r.post("/api/registry/sync"))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
        assert [a.status for a in answers] == [200] * 10
        assert r.scanner.statistics().syncs <= 3  # one running, one for all the waiters


# -- tasks -----------------------------------------------------------------------------------


async def test_tasks_aggregate_filter_and_page(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a1"), task("a2")]})
    beta = project(
        tmp_path / "beta",
        {"in-progress": {"tasks": [task("b1", "in_progress")]}, "failed": [task("b2")]},
    )
    async with rig(tmp_path) as r:
        a = await r.register(alpha, name="Alpha")
        b = await r.register(beta)
        every = (await r.get("/api/registry/tasks")).json()
        assert next(iter(every)) == "tasks"
        assert [t["id"] for t in every["tasks"]] == ["b1", "b2", "a1", "a2"]  # newest project first
        assert every["total"] == 4 and every["errors"] == []
        assert every["counts"] == {"pending": 2, "active": 1, "completed": 0, "failed": 1}
        first = every["tasks"][0]
        assert (first["project_id"], first["status"], first["queue"]) == (
            b["id"],
            "active",
            "in-progress",
        )
        only_a = (await r.get(f"/api/registry/tasks?project_id={a['id']}")).json()
        assert [t["project_name"] for t in only_a["tasks"]] == ["Alpha", "Alpha"]
        both = f"/api/registry/tasks?project_id={a['id']},{b['id']}&status=in_progress"
        assert [t["id"] for t in (await r.get(both)).json()["tasks"]] == ["b1"]
        # a repeated key counts with its last value (docs/http.md), a list too
        repeated = f"/api/registry/tasks?project_id={b['id']}&project_id={a['id']}"
        assert [t["id"] for t in (await r.get(repeated)).json()["tasks"]] == ["a1", "a2"]
        repeated = "/api/registry/tasks?status=bogus&status=failed"
        assert [t["id"] for t in (await r.get(repeated)).json()["tasks"]] == ["b2"]
        page = (await r.get("/api/registry/tasks?limit=2&offset=1")).json()
        assert [t["id"] for t in page["tasks"]] == ["b2", "a1"]
        assert (page["total"], page["limit"], page["offset"]) == (4, 2, 1)
        error = error_of(await r.get("/api/registry/tasks?project_id=reg-000000000000"), 404,
                         "NOT_FOUND")  # fmt: skip
        assert error["details"]["field"] == "project_id"
        for query, field in (("status=bogus", "status"), ("limit=abc", "limit")):
            error = error_of(await r.get(f"/api/registry/tasks?{query}"), 400, "BAD_REQUEST")
            assert error["details"]["field"] == field


@pytest.mark.parametrize(
    ("route", "query", "field"),
    [
        ("tasks", "project_id=", "project_id"),
        ("tasks", "project_id=,,", "project_id"),
        ("tasks", "project_id=%20", "project_id"),
        ("tasks", "project_id={id},", "project_id"),
        ("tasks", "project_id={id},,{id}", "project_id"),
        ("tasks", "project_id={id}&project_id=", "project_id"),  # the last one counts
        ("tasks", "status=", "status"),
        ("tasks", "status=failed&status=", "status"),
        ("projects", "status=", "status"),
        ("learnings", "type=", "type"),
        ("learnings", "type=%20", "type"),
    ],
)
async def test_an_empty_filter_value_is_400_never_no_filter(
    tmp_path: pathlib.Path, route: str, query: str, field: str
) -> None:
    """`?status=` would otherwise answer every item, as if the filter had been applied."""
    async with rig(tmp_path) as r:
        entry = await r.register(project(tmp_path / "p", {"pending": [task("t")]}))
        answer = await r.get(f"/api/registry/{route}?{query.format(id=entry['id'])}")
        error = error_of(answer, 400, "BAD_REQUEST")
        assert error["details"]["field"] == field
        assert error["message"].startswith(field)


async def test_tasks_with_malformed_files_and_a_deleted_project_are_200(
    tmp_path: pathlib.Path,
) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a1")]})
    beta = project(tmp_path / "beta", {"pending": [task("b1")]})
    async with rig(tmp_path) as r:
        await r.register(alpha)
        await r.register(beta)
        (alpha / ".loki" / "queue" / "failed.json").write_text('{"tasks": "nope"}')
        (alpha / ".loki" / "queue" / "completed.json").write_bytes(b"\xff\xfe")
        os.mkfifo(alpha / ".loki" / "queue" / "review.json")
        shutil.rmtree(beta)
        answer = await r.get("/api/registry/tasks")
        assert answer.status == 200
        body = answer.json()
        assert [t["id"] for t in body["tasks"]] == ["a1"]
        assert sorted(e["path"].rsplit("/", 1)[1] for e in body["errors"]) == [
            "completed.json",
            "failed.json",
            "review.json",
        ]


async def test_a_changed_queue_file_is_seen_by_the_next_request(tmp_path: pathlib.Path) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a1")]})
    async with rig(tmp_path) as r:
        await r.register(alpha)
        assert (await r.get("/api/registry/tasks")).json()["total"] == 1
        pending = alpha / ".loki" / "queue" / "pending.json"
        pending.write_text(json.dumps([task("a1"), task("a2")]))
        assert (await r.get("/api/registry/tasks")).json()["total"] == 2
        stats = r.scanner.statistics().task_cache
        assert stats.entries >= 2


# -- learnings -------------------------------------------------------------------------------


async def test_learnings_route(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        folder = r.home / "learnings"
        folder.mkdir()
        lines = [
            {"version": "1.0"},
            {"timestamp": "2026-01-01T00:00:00Z", "project": "p", "description": "Keep it small"},
            {"timestamp": "2026-01-02T00:00:00Z", "project": "p", "description": "Test it"},
        ]
        text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
        (folder / "patterns.jsonl").write_text(text)
        body = (await r.get("/api/registry/learnings")).json()
        assert next(iter(body)) == "learnings"
        assert [e["description"] for e in body["learnings"]] == ["Test it", "Keep it small"]
        assert [e["kind"] for e in body["errors"]] == ["malformed"]
        small = (await r.get("/api/registry/learnings?type=pattern&q=small&limit=5")).json()
        assert [e["description"] for e in small["learnings"]] == ["Keep it small"]
        none = (await r.get("/api/registry/learnings?type=mistakes")).json()
        assert none["learnings"] == [] and none["total"] == 0
        for query, field in (("type=ideas", "type"), ("q=" + "x" * 201, "q"), ("limit=0", "limit")):
            error = error_of(await r.get(f"/api/registry/learnings?{query}"), 400, "BAD_REQUEST")
            assert error["details"]["field"] == field


# -- the surface -----------------------------------------------------------------------------


async def test_wrong_methods_are_405_and_every_route_is_documented(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        error_of(await call(r.surface, "PUT", "/api/registry/projects"), 405, "METHOD_NOT_ALLOWED")
        error_of(await call(r.surface, "GET", "/api/registry/sync"), 405, "METHOD_NOT_ALLOWED")
        error_of(await call(r.surface, "POST", "/api/registry/tasks"), 405, "METHOD_NOT_ALLOWED")
        doc = r.surface.openapi()["paths"]
        assert {
            (method.upper(), path)
            for path, operations in doc.items()
            if path.startswith("/api/registry")
            for method in operations
        } == {
            ("GET", "/api/registry/projects"),
            ("POST", "/api/registry/projects"),
            ("GET", "/api/registry/projects/{id}"),
            ("DELETE", "/api/registry/projects/{id}"),
            ("GET", "/api/registry/projects/{id}/health"),
            ("GET", "/api/registry/discover"),
            ("POST", "/api/registry/sync"),
            ("GET", "/api/registry/tasks"),
            ("GET", "/api/registry/learnings"),
        }
        scopes = {
            (method.upper(), path): op["x-required-scope"]
            for path, operations in doc.items()
            for method, op in operations.items()
            if path.startswith("/api/registry")
        }
        assert {k for k, v in scopes.items() if v == "write"} == {
            ("POST", "/api/registry/projects"),
            ("DELETE", "/api/registry/projects/{id}"),
            ("POST", "/api/registry/sync"),
        }
        assert set(scopes.values()) == {"read", "write"}


async def test_statistics(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path, fs_threads=2, max_jobs=7) as r:
        await r.register(project(tmp_path / "alpha", {"pending": [task("a")]}))
        await r.get("/api/registry/tasks")
        await r.post("/api/registry/sync")
        await r.get(f"/api/registry/discover?roots={tmp_path}")
        stats = r.scanner.statistics()
        assert isinstance(stats, RegistryScannerStatistics)
        assert (stats.entries, stats.max_jobs, stats.fs_threads, stats.jobs) == (1, 7, 2, 0)
        assert stats.syncs == 1 and stats.discovers == 1 and stats.last_discover_ms is not None
        assert stats.running and stats.handled >= 4


async def test_more_jobs_than_the_bound_are_refused_with_503(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_scandir = os.scandir

    def slow(path: str) -> Any:
        gate.wait(10)
        return real_scandir(path)

    monkeypatch.setattr(registry, "_scandir", slow)
    async with rig(tmp_path, max_jobs=1) as r:
        answers: list[Answer] = []

        async def discover() -> None:
            answers.append(await r.get(f"/api/registry/discover?roots={tmp_path}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(discover)
            await trio.testing.wait_all_tasks_blocked()  # the discovery waits in its thread
            assert r.scanner.statistics().jobs == 1
            busy = await r.get("/api/registry/tasks")
            error_of(busy, 503, "UNAVAILABLE")
            listing = await r.get("/api/registry/projects")  # not a job: still answered
            assert listing.status == 200
            gate.set()
        assert [a.status for a in answers] == [200]
        assert r.scanner.statistics().jobs_refused == 1


# -- the periodic sync on a mock clock ---------------------------------------------------------


@pytest.fixture
def lazy_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 0.2 s of real idleness: worker threads (the store,
    the file system) finish their work before the clock moves past an ask timeout."""
    return trio.testing.MockClock(autojump_threshold=0.2)


async def test_the_periodic_sync_runs_every_interval(
    tmp_path: pathlib.Path, lazy_clock: trio.testing.MockClock
) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a")]})
    async with rig(tmp_path, deadline=None, interval=300.0) as r:
        entry = await r.register(alpha)
        start = trio.current_time()
        assert r.scanner.statistics().syncs == 0
        shutil.rmtree(alpha)
        await trio.sleep(299)
        assert r.scanner.statistics().syncs == 0
        await trio.sleep(2)
        assert r.scanner.statistics().syncs == 1
        got = (await r.get(f"/api/registry/projects/{entry['id']}")).json()
        assert got["status"] == "missing"
        assert r.updates()[-1]["action"] == "synced"
        await trio.sleep(300)
        assert r.scanner.statistics().syncs == 2
        assert trio.current_time() - start >= 600


async def test_the_first_sync_runs_at_start_when_asked(
    tmp_path: pathlib.Path, lazy_clock: trio.testing.MockClock
) -> None:
    alpha = project(tmp_path / "alpha", {"pending": [task("a")]})
    async with rig(tmp_path, deadline=None) as r:
        entry = await r.register(alpha)
    shutil.rmtree(alpha)
    async with rig(tmp_path, deadline=None, initial_sync=True, interval=300.0) as r:
        await trio.sleep(1)
        assert r.scanner.statistics().syncs == 1
        got = (await r.get(f"/api/registry/projects/{entry['id']}")).json()
        assert got["status"] == "missing"  # loaded from the table, then synced


async def test_a_restarted_scanner_loads_the_table_in_registration_order(
    tmp_path: pathlib.Path,
) -> None:
    async with rig(tmp_path) as r:
        made = [await r.register(project(tmp_path / f"p{i}")) for i in range(4)]
        before = (await r.get("/api/registry/projects")).json()
    async with rig(tmp_path) as r:
        after = (await r.get("/api/registry/projects")).json()
        assert after == before
        assert [p["id"] for p in after["projects"]] == [m["id"] for m in reversed(made)]


async def test_a_failing_notify_is_logged_and_the_change_stands(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(kind: str, data: dict[str, Any]) -> None:
        raise RuntimeError("hub down")

    async with rig(tmp_path) as r:
        r.scanner.notify = broken
        entry = await r.register(project(tmp_path / "alpha"))
        assert (await r.get(f"/api/registry/projects/{entry['id']}")).status == 200
        assert r.scanner.running
    assert "registry.updated notification failed" in caplog.text
