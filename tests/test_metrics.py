"""`GET /metrics` (docs/metrics.md): the exposition, its families, labels and bounds.

In-process daemons (`running_daemon`, the fake agent of `sessions_kit`) for
the behaviour, and one `loki serve` subprocess with auth on for the way
Prometheus really scrapes it (a bearer token, TCP).
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import prometheus_client
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from lokid.daemon import Daemon
from lokid.metrics import Histogram, LabelledHistogram

from .daemon_proc import DaemonProcess
from .sessions_kit import eventually, install_fake_agent, lab, make_project
from .test_events_http import api, running_daemon, stream

HTTP = "lokid_http_request_duration_seconds"

# name (as the parser gives it: counters without _total) -> type
FAMILIES = {
    "lokid_info": "gauge",
    "lokid_healthy": "gauge",
    "lokid_ready": "gauge",
    "lokid_sessions": "gauge",
    "lokid_sessions_live": "gauge",
    "lokid_agents_active": "gauge",
    "lokid_agents_capacity": "gauge",
    "lokid_agents_started": "counter",
    "lokid_events_published": "counter",
    "lokid_subscribers": "gauge",
    "lokid_subscribers_dropped": "counter",
    HTTP: "histogram",
    "lokid_store_commit_duration_seconds": "histogram",
    "lokid_store_writable": "gauge",
    "lokid_supervisor_restarts": "counter",
    "lokid_supervisor_down": "gauge",
    "lokid_actor_mailbox_messages": "gauge",
    "lokid_actor_crashes": "counter",
    "lokid_listener_connections": "gauge",
    "lokid_gate_refusals": "counter",
    "python_info": "gauge",
    "python_gc_collections": "counter",
}
PROCESS_FAMILIES = {"process_cpu_seconds": "counter", "process_resident_memory_bytes": "gauge"}


Families = dict[str, Metric]


def parse(text: str) -> Families:
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert len(families) == len(list(text_string_to_metric_families(text))), "a name repeats"
    return families


def value(families: Families, sample_name: str, **labels: str) -> float:
    """The value of the one sample `sample_name` with exactly `labels` (0 when absent)."""
    name = sample_name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        name = name.removesuffix(suffix)
    found = [
        s.value for s in families[name].samples if s.name == sample_name and s.labels == labels
    ]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def label_sets(families: Families, name: str) -> set[tuple[tuple[str, str], ...]]:
    return {
        tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        for s in families[name].samples
    }


async def scrape(client: httpx.AsyncClient) -> Families:
    answer = await client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(answer.text)


def requests_of(families: Families, route: str, status_class: str, **labels: str) -> float:
    wanted = {"listener": "api", "method": "GET", "route": route, "status_class": status_class}
    return value(families, f"{HTTP}_count", **{**wanted, **labels})


def control_client(daemon: Daemon) -> httpx.AsyncClient:
    assert daemon.listeners is not None
    transport = httpx.AsyncHTTPTransport(uds=daemon.listeners.urls()["socket"])
    return httpx.AsyncClient(transport=transport, base_url="http://lokid", timeout=10)


# -- the histogram itself ----------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_upper_bounds_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    for observed in (0.1, 0.5, 1.0, 2.0):
        histogram.observe(observed)
    assert histogram.buckets() == [("0.1", 1), ("1.0", 3), ("+Inf", 4)]
    assert histogram.count == 4
    assert math.isclose(histogram.total, 3.6)
    with pytest.raises(ValueError):
        Histogram((1.0, 0.1))


def test_a_full_labelled_histogram_folds_new_label_sets_into_other() -> None:
    histogram = LabelledHistogram(("a", "b"), (1.0,), max_series=2)
    first = histogram.child(("x", "1"))
    assert histogram.child(("x", "1")) is first
    histogram.child(("y", "2"))
    folded = histogram.child(("z", "3"))
    assert folded is histogram.child(("w", "4"))
    assert set(histogram.series) == {("x", "1"), ("y", "2"), ("other", "other")}
    assert histogram.folded == 2


# -- an in-process daemon ------------------------------------------------------------


async def test_the_exposition_parses_and_has_every_family(tmp_path: Path) -> None:
    async with (
        running_daemon(tmp_path) as daemon,
        httpx.AsyncClient(base_url=api(daemon), timeout=10) as client,
    ):
        families = await scrape(client)
        expected = dict(FAMILIES)
        if "process_cpu_seconds" in families:  # prometheus-client reads /proc (Linux)
            expected.update(PROCESS_FAMILIES)
        assert {name: families[name].type for name in expected if name in families} == expected
        assert value(families, "lokid_healthy") == 1
        assert value(families, "lokid_agents_capacity") == daemon.pool.capacity
        restarts = "lokid_supervisor_restarts_total"
        for child in ("store", "event_bus", "listeners"):
            assert value(families, restarts, supervisor="lokid", child=child) == 0
        assert value(families, restarts, supervisor="listeners", child="api") == 0
        assert value(families, "lokid_supervisor_down", supervisor="optional") == 0
        head = await client.head("/metrics")
        assert (head.status_code, head.content) == (200, b"")

        operation = (await client.get("/openapi.json")).json()["paths"]["/metrics"]["get"]
        assert list(operation["responses"]["200"]["content"]) == ["text/plain"]
        assert operation["x-required-scope"] == "read"
        # The dashboard listener does not serve it (the API listener and the socket do).
        dashboard = daemon.listeners.urls()["dashboard"]  # type: ignore[union-attr]
        assert (await client.get(f"{dashboard}/metrics")).status_code == 404


async def test_requests_are_counted_by_route_template_listener_and_status(
    tmp_path: Path,
) -> None:
    async with (
        running_daemon(tmp_path) as daemon,
        httpx.AsyncClient(base_url=api(daemon), timeout=10) as client,
        control_client(daemon) as owner,
    ):
        before = await scrape(client)
        for n in range(3):
            assert (await client.get(f"/api/sessions/session-nope-{n}")).status_code == 404
        assert (await client.get("/health")).status_code == 200
        assert (await owner.get("/api/sessions/session-nope-9")).status_code == 404
        assert (await owner.get("/dashboard/api/sessions/session-nope-8")).status_code == 404
        after = await scrape(client)

        template = "/api/sessions/{id}"
        assert requests_of(after, template, "4xx") == requests_of(before, template, "4xx") + 3
        assert requests_of(after, "/health", "2xx") == requests_of(before, "/health", "2xx") + 1
        assert requests_of(after, template, "4xx", listener="control") == 2
        assert requests_of(after, "/metrics", "2xx") >= 1  # the scrape before is in
        assert "session-nope" not in str(label_sets(after, HTTP))
        buckets = [s for s in after[HTTP].samples if s.name.endswith("_bucket")]
        assert any(s.labels["le"] == "+Inf" for s in buckets)


async def test_labels_stay_bounded_under_a_flood_of_distinct_paths(tmp_path: Path) -> None:
    async with (
        running_daemon(tmp_path) as daemon,
        httpx.AsyncClient(base_url=api(daemon), timeout=10) as client,
    ):
        await client.get("/nowhere")
        await client.get("/api/sessions/s-0")
        before = label_sets(await scrape(client), HTTP)
        for n in range(1000):
            path = f"/nowhere/{n}" if n % 2 else f"/api/sessions/s-{n}"
            assert (await client.get(path)).status_code == 404
        for method in ("BREW", "PROPFIND", "TRACE"):
            await client.request(method, f"/odd/{method}")
        families = await scrape(client)
        after = label_sets(families, HTTP)
        # 1,003 distinct paths added at most one label set: the odd methods as "other"
        assert len(after - before) <= 2, after - before
        assert (
            value(
                families,
                f"{HTTP}_count",
                listener="api",
                method="GET",
                route="unmatched",
                status_class="4xx",
            )
            == 501
        )
        assert (
            value(
                families,
                f"{HTTP}_count",
                listener="api",
                method="other",
                route="unmatched",
                status_class="4xx",
            )
            == 3
        )
        assert len(daemon.metrics.requests.series) < 20


async def test_sessions_by_status_events_and_commits_follow_a_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_agent(tmp_path, monkeypatch)
    project = make_project(tmp_path, "# Tiny\n\n## Features\n- The only feature\n")
    async with lab(tmp_path / "home") as the_lab:
        before = await scrape(the_lab.client)
        assert {s.labels["status"] for s in before["lokid_sessions"].samples} >= {
            "starting",
            "running",
            "paused",
            "completed",
            "failed",
        }
        assert sum(s.value for s in before["lokid_sessions"].samples) == 0

        created = await the_lab.create({"prd": str(project / "prd.md")})
        await the_lab.wait_status(created["id"], "completed")
        after = await scrape(the_lab.client)

        assert value(after, "lokid_sessions", status="completed") == 1
        assert sum(s.value for s in after["lokid_sessions"].samples) == 1
        assert value(after, "lokid_sessions_created_total") == 1
        assert value(after, "lokid_agents_started_total") >= 1
        published = "lokid_events_published_total"
        assert value(after, published) > value(before, published)
        commits = "lokid_store_commit_duration_seconds_count"
        assert value(after, commits) > value(before, commits)
        assert requests_of(after, "/api/sessions", "2xx", method="POST") == 1


async def test_subscribers_gauge_follows_an_sse_stream(tmp_path: Path) -> None:
    async with (
        running_daemon(tmp_path) as daemon,
        httpx.AsyncClient(base_url=api(daemon), timeout=10) as client,
    ):
        async with stream(api(daemon)) as sse:
            await sse.frame()
            families = await scrape(client)
            assert value(families, "lokid_subscribers", kind="sse") == 1
            assert value(families, "lokid_subscribers", kind="ws") == 0
            # a stream is counted when its head is sent, not when it ends
            assert requests_of(families, "/api/events", "2xx") == 1

        async def closed() -> bool:
            return value(await scrape(client), "lokid_subscribers", kind="sse") == 0

        await eventually(closed, "the stream's subscriber is gone")


async def test_a_crash_counts_a_restart_of_the_child(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        await daemon.registry.tell(object())  # no handler: the registry actor crashes

        def restarted() -> bool:
            stats = daemon.optional.statistics()
            registry = next(c for c in stats.children if c.id == "registry")
            return registry.restarts == 1 and registry.running

        await eventually(restarted, "the registry is back")
        async with httpx.AsyncClient(base_url=api(daemon), timeout=10) as client:
            families = await scrape(client)
        restarts = "lokid_supervisor_restarts_total"
        assert value(families, restarts, supervisor="optional", child="registry") == 1
        assert value(families, restarts, supervisor="lokid", child="optional") == 0
        assert value(families, restarts, supervisor="lokid", child="store") == 0
        assert value(families, "lokid_actor_crashes_total", actor="registry") == 1


async def test_each_daemon_has_its_own_registry(tmp_path: Path) -> None:
    async with (
        running_daemon(tmp_path / "a") as first,
        running_daemon(tmp_path / "b") as second,
        httpx.AsyncClient(timeout=10) as client,
    ):
        assert first.metrics.registry is not second.metrics.registry
        for _ in range(3):
            await client.get(f"{api(first)}/api/sessions/x")
        first_families = parse((await client.get(f"{api(first)}/metrics")).text)
        second_families = parse((await client.get(f"{api(second)}/metrics")).text)
        assert requests_of(first_families, "/api/sessions/{id}", "4xx") == 3
        assert requests_of(second_families, "/api/sessions/{id}", "4xx") == 0
    assert b"lokid_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


# -- `loki serve`, scraped as Prometheus does with auth on ---------------------------


@pytest.mark.e2e
def test_loki_serve_is_scraped_with_a_bearer_token(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, extra_env={"LOKI_ENTERPRISE_AUTH": "true"}).start()
    try:
        with daemon.control() as owner:
            made = owner.post(
                "/dashboard/api/enterprise/tokens", json={"name": "prom", "scopes": ["read"]}
            )
            assert made.status_code == 201, made.text
            assert owner.get("/metrics").status_code == 200  # the owner on the socket
        url = f"{daemon.api_url}/metrics"
        headers = {"Authorization": f"Bearer {made.json()['token']}"}
        assert httpx.get(url, timeout=5).status_code == 401
        with httpx.Client(headers=headers, timeout=5) as client:
            first = parse(_scraped(client, url))
            missing = [name for name in FAMILIES if name not in first]
            assert not missing, missing
            for n in range(5):
                assert client.get(f"{daemon.api_url}/api/sessions/gone-{n}").status_code == 404
            second = parse(_scraped(client, url))
        template = "/api/sessions/{id}"
        assert requests_of(second, template, "4xx") == requests_of(first, template, "4xx") + 5
        assert requests_of(second, "/metrics", "2xx") == requests_of(first, "/metrics", "2xx") + 1
        assert value(second, "lokid_gate_refusals_total", reason="unauthorized") >= 1
        assert value(second, "lokid_events_published_total") >= 1
        assert daemon.terminate()[0] == 0
    finally:
        daemon.kill()


def _scraped(client: httpx.Client, url: str) -> str:
    answer = client.get(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return answer.text
