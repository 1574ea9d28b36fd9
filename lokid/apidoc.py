"""Reference documents generated from the code, so they cannot drift from it.

* **The API reference**, `docs/api-reference.md`: every route of both TCP
  listeners, rendered from the OpenAPI documents their `Surface`s build
  (`Surface.openapi()`, the very document `GET /openapi.json` serves, made
  from the same `Route` records the dispatch tables use): method, path,
  summary, required scope, parameters with their types and constraints,
  request body fields, responses and what they mean, the error body.
* **The command-line reference**: every `loki` command, argument and option
  from the argparse parser (`lokid.cli.build_parser`), written between two
  marker lines of `docs/configuration.md`.

Use:

    python -m lokid.apidoc --write                    # rewrite both in this checkout
    python -m lokid.apidoc > docs/api-reference.md    # the API reference alone

`tests/test_apidoc.py` fails while either document is stale. The output
depends on the code only: a `Daemon` is built on a throwaway `LOKI_HOME`
(never started, nothing bound), and the defaults come from `Config`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"
API_REFERENCE = "api-reference.md"
CONFIGURATION = "configuration.md"
REGENERATE = "python -m lokid.apidoc --write"

CLI_BEGIN = f"<!-- BEGIN GENERATED: command-line reference ({REGENERATE}) -->"
CLI_END = "<!-- END GENERATED: command-line reference -->"

METHODS = ("get", "head", "post", "put", "patch", "delete", "options")
SHORT_PATTERN = 48  # longer patterns are described, or left to /openapi.json
DASH = "\N{EN DASH}"
MAX_DEPTH = 4  # nesting of object fields shown in a fields table

# Where a route group is explained (by OpenAPI tag); a tag without an entry gets no link.
TAG_DOCS: Mapping[str, tuple[str, ...]] = {
    "health": ("operations.md",),
    "status": ("architecture.md",),
    "sessions": ("sessions.md", "session-states.md"),
    "tasks": ("sessions.md",),
    "events": ("events.md",),
    "metrics": ("metrics.md",),
    "web": ("web-dashboard.md",),
    "enterprise": ("security.md", "audit.md"),
    "websocket": ("websocket.md",),
    "projects": ("board.md",),
    "board": ("board.md",),
    "registry": ("registry.md",),
}

# What each value of a route's `requires=` means (lokid.http.gate.REQUIREMENTS);
# a requirement missing here stops the generator (and so fails the test).
REQUIREMENT_MEANINGS: Mapping[str, str] = {
    "open": "nothing: no token, no rate limit, no audit entry (the probes and the web page)",
    "authenticated": "any valid token (what a path no route declares gets: 401 before 404)",
    "read": "the `read` scope: reading sessions, tasks, events, board, registry, status",
    "write": "the `write` scope: every change but the token routes",
    "audit": "the `audit` scope: the audit log",
    "admin": "the `admin` scope: API tokens; implies every other scope",
}


# -- Markdown helpers ----------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def code(value: str, *, cell: bool = True) -> str:
    """`value` as an inline code span; `cell`: inside a table (`|` escaped)."""
    value = value.replace("\n", " ")
    if cell:
        value = value.replace("|", "\\|")
    if "`" in value:
        return f"`` {value} ``"
    return f"`{value}`"


def prose(value: str) -> str:
    """Free text for a table cell: one line; `|`, `<`, `*` escaped outside code spans."""
    value = " ".join(value.split())
    out: list[str] = []
    last = 0
    for match in _CODE_SPAN.finditer(value):
        out.append(_escape(value[last : match.start()]))
        out.append(match.group(0).replace("|", "\\|"))
        last = match.end()
    out.append(_escape(value[last:]))
    return "".join(out)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def sentence(text: str) -> str:
    """`text` as a sentence: capital first letter, a full stop at the end."""
    text = prose(text)
    if text and text[-1] not in ".!?:":
        text += "."
    return text[:1].upper() + text[1:]


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return lines


def literal(value: Any) -> str:
    return code(json.dumps(value, ensure_ascii=False))


# -- JSON Schema, in words -----------------------------------------------------------


def schema_text(schema: Mapping[str, Any]) -> str:
    """A one-line description of a JSON Schema: type, then its constraints."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return "the error body" if name == "Error" else f"`{name}`"
    for key in ("anyOf", "oneOf"):
        if key not in schema:
            continue
        rest = {k: v for k, v in schema.items() if k != key}
        needs = _required_alternatives(schema[key])
        if needs is not None:
            how = "exactly one of" if key == "oneOf" else "at least one of"
            given = " or ".join(" and ".join(code(n) for n in names) for names in needs)
            return ", ".join([_type_name(rest), f"{how} {given} given", *_constraints(rest)])
        alternatives = " or ".join(schema_text(s) for s in schema[key])
        return ", ".join([alternatives, *_constraints(rest)])
    if "const" in schema:
        return literal(schema["const"])
    if "enum" in schema:
        choices = ", ".join(literal(v) for v in schema["enum"])
        return ", ".join([f"one of {choices}", *_constraints(schema, enum=True)])
    return ", ".join([_type_name(schema), *_constraints(schema)])


def _required_alternatives(alternatives: Any) -> list[list[str]] | None:
    """The field names each alternative requires, when that is all they say."""
    found: list[list[str]] = []
    for alternative in alternatives:
        if not isinstance(alternative, Mapping) or "required" not in alternative:
            return None
        if set(alternative) - {"required", "properties", "type"}:
            return None
        found.append([str(name) for name in alternative["required"]])
    return found


def _type_name(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    names = kind if isinstance(kind, list) else [kind] if kind else []
    if not names:
        return "any"
    words: list[str] = []
    for name in names:
        if name == "array":
            items = schema.get("items")
            words.append(f"array of {schema_text(items)}" if items else "array")
        elif name == "string" and "format" in schema:
            words.append(f"string ({schema['format']})")
        elif name == "string" and "contentMediaType" in schema:
            words.append(f"string holding {code(str(schema['contentMediaType']))}")
        else:
            words.append(str(name))
    return " or ".join(words)


def _range(low: Any, high: Any, unit: str = "") -> str | None:
    suffix = f" {unit}" if unit else ""
    if low is not None and high is not None:
        return f"{low}{DASH}{high}{suffix}"
    if low == 1 and unit:
        return "not empty"
    if low is not None:
        return f"≥ {low}{suffix}"
    if high is not None:
        return f"≤ {high}{suffix}"
    return None


def _constraints(schema: Mapping[str, Any], *, enum: bool = False) -> list[str]:
    found: list[str] = []
    for text in (
        _range(schema.get("minimum"), schema.get("maximum")),
        _range(schema.get("minLength"), schema.get("maxLength"), "characters"),
        _range(schema.get("minItems"), schema.get("maxItems"), "items"),
        _range(schema.get("minProperties"), schema.get("maxProperties"), "keys"),
    ):
        if text is not None:
            found.append(text)
    if "exclusiveMinimum" in schema:
        found.append(f"> {schema['exclusiveMinimum']}")
    if "exclusiveMaximum" in schema:
        found.append(f"< {schema['exclusiveMaximum']}")
    if schema.get("uniqueItems"):
        found.append("no duplicates")
    examples = [] if enum else list(schema.get("examples", ()))
    if "pattern" in schema and not enum:
        pattern = str(schema["pattern"])
        if examples and _is_choice_pattern(pattern):
            choices = ", ".join(literal(v) for v in examples)
            found.append(f"one of {choices} (any case, white space around ignored)")
            examples = []
        else:
            found.append(pattern_text(pattern))
    if examples:
        found.append("e.g. " + ", ".join(literal(v) for v in examples))
    if "default" in schema:
        found.append(f"default {literal(schema['default'])}")
    if schema.get("additionalProperties") is False and schema.get("properties"):
        found.append("no other keys")
    if "allOf" in schema and not conditions(schema):
        found += [schema_text(part) for part in schema["allOf"]]
    return found


def _trimmed_inner(pattern: str) -> str | None:
    """The middle of a pattern `lokid.http.surface` wraps in optional white space."""
    space = _surface_constant("SPACE")
    head, tail = f"^[{space}]*", f"[{space}]*$"
    if space and pattern.startswith(head) and pattern.endswith(tail):
        return pattern[len(head) : -len(tail)]
    return None


def _is_choice_pattern(pattern: str) -> bool:
    inner = _trimmed_inner(pattern)
    return inner is not None and inner.startswith("(?:") and inner.endswith(")")


def pattern_text(pattern: str) -> str:
    """A regex in words where its shape is one `lokid.http.surface` builds, else itself."""
    space = _surface_constant("SPACE")
    control = _surface_constant("CONTROL")
    if space and pattern == f"[^{space}]":
        return "not only white space"
    inner = _trimmed_inner(pattern)
    if inner is not None:
        extra = "; no control characters" if control and control in inner else ""
        most = re.search(r"\{0,(\d+)\}", inner)
        if most is not None:
            return f"1{DASH}{int(most.group(1)) + 2} characters once trimmed{extra}"
        if inner.startswith("[^") and inner.endswith("]"):
            return f"1 character once trimmed{extra}"
    if len(pattern) <= SHORT_PATTERN:
        return f"matching {code(pattern)}"
    return "matching a pattern (see `/openapi.json`)"


def _surface_constant(name: str) -> str:
    from lokid.http import surface

    value = getattr(surface, name, "")
    return value if isinstance(value, str) else ""


def conditions(schema: Mapping[str, Any]) -> list[str]:
    """The `if`/`then` rules of an object schema (alone or in `allOf`), in words."""
    parts = [schema, *schema.get("allOf", ())]
    rules = []
    for part in parts:
        if not isinstance(part, Mapping) or "if" not in part:
            continue
        rule = f"when {_condition(part['if'])}: {_consequence(part.get('then', {}))}"
        if "else" in part:
            rule += f"; otherwise {_consequence(part['else'])}"
        rules.append(rule)
    return rules


def _condition(schema: Mapping[str, Any]) -> str:
    required = set(schema.get("required", ()))
    words = []
    for name, sub in dict(schema.get("properties", {})).items():
        if "const" in sub:
            words.append(f"{code(name)} is {literal(sub['const'])}")
        elif "enum" in sub:
            words.append(f"{code(name)} is one of {', '.join(literal(v) for v in sub['enum'])}")
        elif name in required:
            words.append(f"{code(name)} is given")
    return " and ".join(words) or schema_text(schema)


def _consequence(schema: Mapping[str, Any]) -> str:
    words = [
        f"{code(name)} {schema_text(sub)}" for name, sub in schema.get("properties", {}).items()
    ]
    words += [f"{code(name)} is required" for name in schema.get("required", ())]
    return "; ".join(words) or schema_text(schema)


def shapes(schema: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The object shapes a field may hold: its `contentSchema`, or object alternatives."""
    target = schema.get("contentSchema", schema)
    alternatives = target.get("anyOf") or target.get("oneOf") or []
    if not alternatives and target is not schema:
        alternatives = [target]
    return [a for a in alternatives if isinstance(a, Mapping) and a.get("properties")]


def schema_fields(
    schema: Mapping[str, Any], prefix: str = "", depth: int = 0
) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    """(dotted name, schema, required) of an object schema's properties, nested ones too."""
    required = set(schema.get("required", ()))
    for name, sub in dict(schema.get("properties", {})).items():
        yield prefix + name, sub, name in required
        if depth + 1 >= MAX_DEPTH:
            continue
        if sub.get("properties"):
            yield from schema_fields(sub, f"{prefix}{name}.", depth + 1)
        items = sub.get("items")
        if isinstance(items, Mapping) and items.get("properties"):
            yield from schema_fields(items, f"{prefix}{name}[].", depth + 1)


def fields_table(schema: Mapping[str, Any], *, with_required: bool) -> list[str]:
    """A table of the fields, then a table per shape of fields that hold one of several."""
    rows = []
    nested: list[tuple[str, Mapping[str, Any]]] = []
    for name, sub, required in schema_fields(schema):
        row = [code(name), prose(schema_text(sub))]
        if with_required:
            row.append("yes" if required else "")
        row.append(prose(str(sub.get("description", ""))))
        rows.append(row)
        nested += [(name, shape) for shape in shapes(sub)]
    header = ["field", "type", *(["required"] if with_required else []), "description"]
    lines = table(header, rows)
    for name, shape in nested:
        lines += ["", f"{code(name)} as {_shape_name(shape)}:", ""]
        lines += fields_table(shape, with_required=with_required)
    rules = conditions(schema)
    if rules:
        lines += ["", "Rules:", ""]
        lines += [f"- {prose(rule)}" for rule in rules]
    return lines


def _shape_name(shape: Mapping[str, Any]) -> str:
    if shape.get("description"):
        return prose(str(shape["description"]))
    kind = dict(shape.get("properties", {})).get("type", {})
    if "const" in kind:
        return f"a {literal(kind['const'])}"
    if "enum" in kind:
        return "one of " + ", ".join(literal(v) for v in kind["enum"])
    return "an object"


def object_schema(schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The object whose fields describe a body: the schema itself, or its array's items."""
    if schema.get("properties"):
        return schema
    items = schema.get("items")
    if schema.get("type") == "array" and isinstance(items, Mapping) and items.get("properties"):
        return items
    return None


# -- the API reference ---------------------------------------------------------------


def openapi_documents() -> list[tuple[str, str, dict[str, Any]]]:
    """(key, title, OpenAPI document) of the HTTP API and the Dashboard API."""
    from lokid.config import Config
    from lokid.daemon import Daemon
    from lokid.systemd import Notifier

    with tempfile.TemporaryDirectory(prefix="lokid-apidoc-") as home:
        daemon = Daemon(Config(loki_home=Path(home)), notifier=Notifier({}))
        return [
            ("api", "HTTP API", daemon.api.openapi()),
            ("dashboard", "Dashboard API", daemon.dashboard.openapi()),
        ]


def operations(document: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) in the document's order."""
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def anchor(key: str, operation: Mapping[str, Any]) -> str:
    return f"{key}-{operation['operationId']}".replace("_", "-")


def _response_key(status: str, response: Mapping[str, Any]) -> str:
    return json.dumps([status, response], sort_keys=True)


def common_responses(
    documents: Sequence[tuple[str, str, dict[str, Any]]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Responses documented identically on every route, and on every route with a token."""
    every: set[str] | None = None
    gated: set[str] | None = None
    found: dict[str, tuple[str, Any]] = {}
    for _, _, document in documents:
        for _, _, operation in operations(document):
            keys = set()
            for status, response in operation["responses"].items():
                key = _response_key(status, response)
                found[key] = (status, response)
                keys.add(key)
            every = keys if every is None else every & keys
            if operation.get("security"):
                gated = set(keys) if gated is None else gated & keys
    every = every or set()
    gated = (gated or set()) - every
    return (
        dict(sorted((found[k] for k in every), key=lambda item: item[0])),
        dict(sorted((found[k] for k in gated), key=lambda item: item[0])),
    )


def scope_holders(requires: str) -> str:
    """Which token scopes pass a route's requirement."""
    from lokid.tokens import IMPLIES, SCOPES

    if requires not in SCOPES:
        return ""
    holders = [scope for scope in SCOPES if requires in IMPLIES[scope]]
    return ", ".join(code(s) for s in holders)


def response_body(status: str, response: Mapping[str, Any]) -> str:
    content = response.get("content")
    if not content:
        return "—"
    parts = []
    for media, body in content.items():
        schema = body.get("schema", {})
        if "$ref" in schema:
            parts.append(schema_text(schema))
            continue
        what = schema_text(schema)
        if object_schema(schema) is not None:
            what += " (fields below)"
        parts.append(f"{code(media)}: {what}")
    return "; ".join(parts)


def render_operation(
    key: str,
    method: str,
    path: str,
    operation: Mapping[str, Any],
    common: Mapping[str, Any],
    gated: Mapping[str, Any],
    by_operation_id: Mapping[str, tuple[str, str]],
) -> list[str]:
    requires = str(operation.get("x-required-scope", ""))
    if requires not in REQUIREMENT_MEANINGS:
        raise ValueError(
            f"{method} {path}: requirement {requires!r} has no entry in "
            "lokid.apidoc.REQUIREMENT_MEANINGS; add one"
        )
    lines = [
        f'<a id="{anchor(key, operation)}"></a>',
        "",
        f"#### {code(f'{method} {path}', cell=False)}",
        "",
        sentence(str(operation.get("summary", ""))),
        "",
    ]
    holders = scope_holders(requires)
    scope_line = f"**Requires** `{requires}`"
    if holders:
        scope_line += f" (a token with {holders} when auth is on)"
    elif requires == "open":
        scope_line += " (no token, never rate limited, not audited)"
    else:
        scope_line += " (any valid token when auth is on)"
    lines += [scope_line + ".", ""]

    params = operation.get("parameters", [])
    if params:
        rows = [
            [
                code(str(p["name"])),
                str(p["in"]),
                prose(schema_text(p.get("schema", {}))),
                "yes" if p.get("required") else "",
                prose(str(p.get("description", ""))),
            ]
            for p in params
        ]
        lines += ["Parameters:", ""]
        lines += table(["name", "in", "type", "required", "description"], rows)
        lines.append("")

    body = operation.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            how = "required" if body.get("required") else "optional: left out, `{}` is assumed"
            lines.append(f"Request body ({code(media)}, {how}): {prose(schema_text(schema))}.")
            lines.append("")
            if schema.get("description"):
                lines += [sentence(str(schema["description"])), ""]
            target = object_schema(schema)
            if target is not None:
                lines += fields_table(target, with_required=True)
                lines.append("")

    rows = []
    for status, response in operation["responses"].items():
        if common.get(status) == response or gated.get(status) == response:
            continue
        rows.append(
            [
                code(status),
                prose(str(response.get("description", ""))),
                response_body(status, response),
            ]
        )
    tail = "the [responses of every route](#common-responses)"
    if operation.get("security"):
        tail += " and of [every route but the open ones](#gate-responses)"
    if rows:
        lines += ["Responses:", ""]
        lines += table(["status", "meaning", "body"], rows)
        lines += ["", f"Also {tail}.", ""]
    else:
        lines += [f"Responses: {tail}.", ""]

    for status, response in operation["responses"].items():
        for media, content in response.get("content", {}).items():
            target = object_schema(content.get("schema", {}))
            if target is None or not status.startswith("2"):
                continue
            lines += [f"Response {code(status)} ({code(media)}) fields:", ""]
            lines += fields_table(target, with_required=False)
            lines.append("")
        for name, link in response.get("links", {}).items():
            method_path = by_operation_id.get(str(link.get("operationId")))
            target_text = code(" ".join(method_path)) if method_path else code(link["operationId"])
            values = ", ".join(
                f"{code(k)} = {code(str(v))}" for k, v in link.get("parameters", {}).items()
            )
            lines += [
                f"Link {code(name)} → {target_text}" + (f" with {values}" if values else ""),
                "",
            ]
    return lines


def render_listener(
    key: str,
    title: str,
    document: Mapping[str, Any],
    common: Mapping[str, Any],
    gated: Mapping[str, Any],
    shared: Mapping[tuple[str, str], tuple[str, dict[str, Any]]],
    titles: Mapping[str, str],
) -> list[str]:
    """One listener's section; operations equal to one already shown link to it."""
    ops = list(operations(document))
    by_operation_id = {op["operationId"]: (method, path) for method, path, op in ops}
    lines = [f'<a id="{key}"></a>', "", f"## {title}", ""]
    info = document.get("info", {})
    if info.get("description"):
        lines += [prose(str(info["description"])), ""]
    lines += [f"{len(ops)} routes.", ""]
    rows = []
    for method, path, operation in ops:
        earlier = shared.get((method, path))
        target = anchor(earlier[0], earlier[1]) if earlier else anchor(key, operation)
        rows.append(
            [
                f"[{code(f'{method} {path}')}](#{target})",
                code(str(operation.get("x-required-scope", ""))),
                prose(str(operation.get("summary", ""))),
            ]
        )
    lines += table(["route", "requires", "summary"], rows)
    lines.append("")

    tags: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for method, path, operation in ops:
        tag = (operation.get("tags") or ["other"])[0]
        tags.setdefault(str(tag), []).append((method, path, operation))
    for tag, group in tags.items():
        lines += [f"### {title}: {tag}", ""]
        if tag in TAG_DOCS:
            links = ", ".join(f"[{name}]({name})" for name in TAG_DOCS[tag])
            lines += [f"How these work: {links}.", ""]
        for method, path, operation in group:
            earlier = shared.get((method, path))
            if earlier is not None:
                lines += [
                    f"#### {code(f'{method} {path}', cell=False)}",
                    "",
                    f"{prose(str(operation.get('summary', '')))}: as on the "
                    f"[{titles[earlier[0]]}]"
                    f"(#{anchor(earlier[0], earlier[1])}).",
                    "",
                ]
                continue
            lines += render_operation(key, method, path, operation, common, gated, by_operation_id)
    return lines


def render_common(
    documents: Sequence[tuple[str, str, dict[str, Any]]],
    common: Mapping[str, Any],
    gated: Mapping[str, Any],
) -> list[str]:
    from lokid.config import Config
    from lokid.http.errors import STATUS_BY_CODE

    defaults = Config(loki_home=Path("~/.loki"))
    lines = ['<a id="common"></a>', "", "## Common to every route", ""]
    lines += ["### Where", ""]
    lines += table(
        ["listener", "default address", "on the control socket", "its OpenAPI document"],
        [
            [
                "[HTTP API](#api)",
                code(f"http://{defaults.api_host}:{defaults.api_port}"),
                "at `/`",
                "`GET /openapi.json`",
            ],
            [
                "[Dashboard API](#dashboard)",
                code(f"http://{defaults.dashboard_host}:{defaults.dashboard_port}")
                + " (taken: the next free port)",
                "under `/dashboard`",
                "`GET /openapi.json`",
            ],
        ],
    )
    lines += [
        "",
        "The control socket (`$LOKI_HOME/lokid/lokid.sock`) speaks the same HTTP; its "
        "owner (the daemon's uid, or root) passes every requirement without a token. "
        "Settings: [configuration.md](configuration.md).",
        "",
    ]

    lines += ['<a id="requires"></a>', "", "### Requires", ""]
    lines += [
        "Each route states what the gate demands (`x-required-scope` in the OpenAPI "
        "document). With `LOKI_ENTERPRISE_AUTH` off (the default) every TCP caller passes; "
        "with it on, a token goes in `Authorization: Bearer loki_…` (a WebSocket may use "
        "`?token=`). Details: [security.md](security.md).",
        "",
    ]
    from lokid.http.gate import REQUIREMENTS

    rows = []
    for requirement in REQUIREMENTS:
        if requirement not in REQUIREMENT_MEANINGS:
            raise ValueError(
                f"requirement {requirement!r} has no entry in "
                "lokid.apidoc.REQUIREMENT_MEANINGS; add one"
            )
        rows.append(
            [
                code(requirement),
                prose(REQUIREMENT_MEANINGS[requirement]),
                scope_holders(requirement) or "—",
            ]
        )
    lines += table(["requires", "meaning", "token scopes that pass"], rows)
    lines.append("")

    components = documents[0][2].get("components", {})
    error = components.get("schemas", {}).get("Error")
    lines += ['<a id="error-body"></a>', "", "### The error body", ""]
    lines += [
        "Every answer that is not 2xx, on every route (unknown routes, wrong methods, bad "
        "JSON, auth and rate limits included):",
        "",
        "```json",
        '{"error": {"code": "NOT_FOUND", "message": "No route for GET /api/nothing", '
        '"details": {}}}',
        "```",
        "",
    ]
    if error:
        lines += fields_table(error, with_required=True)
        lines.append("")
        codes = error.get("properties", {}).get("error", {}).get("properties", {})
        names = codes.get("code", {}).get("enum", list(STATUS_BY_CODE))
        rows = [[code(str(STATUS_BY_CODE.get(n, "?"))), code(n)] for n in names]
        lines += ["Codes and their statuses (`lokid.http.errors.STATUS_BY_CODE`):", ""]
        lines += table(["status", "code"], rows)
        lines.append("")
    lines += ['<a id="common-responses"></a>', "", "### Responses of every route", ""]
    lines += table(
        ["status", "meaning", "body"],
        [
            [code(s), prose(str(r.get("description", ""))), response_body(s, r)]
            for s, r in common.items()
        ],
    )
    lines += [
        "",
        '<a id="gate-responses"></a>',
        "",
        "### Responses of every route but the open ones",
        "",
    ]
    lines += [
        "Every route that is not `open` (so: everything but the probes and the web page) "
        "may also answer:",
        "",
    ]
    lines += table(
        ["status", "meaning", "body"],
        [
            [code(s), prose(str(r.get("description", ""))), response_body(s, r)]
            for s, r in gated.items()
        ],
    )
    lines += [
        "",
        'A 401 carries `WWW-Authenticate: Bearer realm="lokid"`; a 429 carries '
        "`Retry-After`; while rate limiting is on every answer carries `X-RateLimit-Limit`, "
        "`X-RateLimit-Remaining` and `X-RateLimit-Reset`.",
        "",
    ]
    return lines


def api_reference(documents: Sequence[tuple[str, str, dict[str, Any]]] | None = None) -> str:
    """`docs/api-reference.md`."""
    documents = openapi_documents() if documents is None else documents
    common, gated = common_responses(documents)
    lines = [
        "# API reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from both listeners' OpenAPI documents. "
        "Do not edit. -->",
        "",
        "Every route of the HTTP API and the Dashboard API, generated from the route "
        "declarations (the same records each listener's `GET /openapi.json` and its dispatch "
        "tables are built from), so it lists exactly what the daemon serves. After changing "
        f"a route, regenerate it with `{REGENERATE}` (or `python -m lokid.apidoc > "
        "docs/api-reference.md`); `tests/test_apidoc.py` fails while this file is stale.",
        "",
        "The conventions behind it (error body, naming, limits, idempotency, the inline "
        "path): [http.md](http.md); who may call what and what is recorded: "
        "[security.md](security.md); the live stream: [events.md](events.md); the "
        "WebSocket's messages: [websocket.md](websocket.md).",
        "",
        "- [Common to every route](#common): where, what each route requires, the error "
        "body, the responses every route may give",
    ]
    for key, title, document in documents:
        count = sum(1 for _ in operations(document))
        lines.append(f"- [{title}](#{key}) ({count} routes)")
    lines.append("")
    lines += render_common(documents, common, gated)
    titles = {key: title for key, title, _ in documents}
    shown: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for key, title, document in documents:
        # an operation identical to one an earlier listener shows links to it
        shared = {
            (method, path): shown[(method, path)]
            for method, path, operation in operations(document)
            if (method, path) in shown and shown[(method, path)][1] == operation
        }
        lines += render_listener(key, title, document, common, gated, shared, titles)
        for method, path, operation in operations(document):
            shown.setdefault((method, path), (key, operation))
    return "\n".join(_strip_trailing(lines)) + "\n"


def _strip_trailing(lines: list[str]) -> list[str]:
    while lines and not lines[-1]:
        lines.pop()
    return [line.rstrip() for line in lines]


# -- the command-line reference ------------------------------------------------------


def _walk(
    parser: argparse.ArgumentParser, words: tuple[str, ...], help_text: str
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    yield words, parser, help_text
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: str(a.help or "") for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield from _walk(sub, (*words, name), helps.get(name, ""))


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def _label(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar
    if metavar is None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}" if action.choices else None
    return f"{names} {metavar or action.dest.upper()}"


def _meaning(action: argparse.Action) -> str:

    parts = [str(action.help or "")]
    setting = action.dest[4:] if action.dest.startswith("cfg_") else None
    if action.choices and not any(str(c) in parts[0] for c in action.choices):
        parts.append(f"one of {', '.join(map(str, action.choices))}")
    default = action.default
    if (
        action.nargs != 0
        and default not in (None, argparse.SUPPRESS)
        and str(default) not in parts[0]
    ):
        parts.append(f"default {default}")
    if action.required and action.option_strings:
        parts.append("required")
    if setting is not None:
        parts.append(f"setting `{setting}`")
    return "; ".join(p for p in parts if p)


def _usage(words: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    positional = [str(a.metavar or a.dest) for a in _visible(parser) if not a.option_strings]
    return " ".join([*words, *positional])


def cli_reference() -> str:
    """The generated block of `docs/configuration.md`: every command and option."""
    from lokid.cli import build_parser

    parser = build_parser()
    lines = [
        CLI_BEGIN,
        "",
        "Generated from `lokid.cli.build_parser`; `loki COMMAND --help` gives the same "
        "descriptions (this page adds the setting an option sets, its default and choices). "
        "Options shown under `loki` (global options) go **before** the command "
        "(`loki --data-dir DIR status`). `lokid [options]` is "
        "`loki [global options] serve [options]`, the options in any order.",
        "",
    ]
    for words, sub, help_text in _walk(parser, ("loki",), str(parser.description or "")):
        actions = _visible(sub)
        has_commands = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
        if not actions and has_commands:
            continue
        heading = _usage(words, sub)
        if has_commands and len(words) > 1:
            heading += " [ACTION]"
        lines += [f"### {code(heading, cell=False)}", ""]
        if help_text:
            lines += [sentence(help_text), ""]
        if actions:
            lines += table(
                ["argument / option", "meaning"],
                [[code(_label(a)), prose(_meaning(a))] for a in actions],
            )
            lines.append("")
    lines.append(CLI_END)
    return "\n".join(_strip_trailing(lines)) + "\n"


def with_cli_reference(text: str, block: str) -> str:
    """`text` (docs/configuration.md) with its generated block replaced by `block`."""
    start = text.find(CLI_BEGIN)
    end = text.find(CLI_END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {CLI_BEGIN!r} and {CLI_END!r} are missing")
    return text[:start] + block.rstrip("\n") + text[end + len(CLI_END) :]


# -- entry point ---------------------------------------------------------------------


def write(docs: Path = DOCS) -> list[Path]:
    """Rewrite the generated documents under `docs`; the files that changed."""
    changed: list[Path] = []
    reference = docs / API_REFERENCE
    new = api_reference()
    if not reference.exists() or reference.read_text(encoding="utf-8") != new:
        reference.write_text(new, encoding="utf-8")
        changed.append(reference)
    configuration = docs / CONFIGURATION
    old = configuration.read_text(encoding="utf-8")
    updated = with_cli_reference(old, cli_reference())
    if updated != old:
        configuration.write_text(updated, encoding="utf-8")
        changed.append(configuration)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lokid.apidoc",
        description="Print docs/api-reference.md, or rewrite the generated documents.",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="rewrite docs/api-reference.md and the command-line reference in "
        "docs/configuration.md",
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(api_reference())
        return 0
    for path in write(args.docs):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
