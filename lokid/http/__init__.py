"""The API surfaces: one module per surface, shared conventions beside them.

- `surface`: route table, lean ASGI path, Quart app, OpenAPI document.
- `errors`: the seed's error body and the code -> status table.
- `convert`: the cattrs converters (camelCase API, snake_case dashboard).
- `health`: health probes and status, served on every surface.
- `api`, `dashboard`: the two TCP listeners' applications.
- `control`: the Unix socket's application (API + dashboard under /dashboard).
"""

from lokid.http.errors import ApiError, error_body
from lokid.http.surface import LeanResponse, Param, Route, Surface, json_body

__all__ = ["ApiError", "LeanResponse", "Param", "Route", "Surface", "error_body", "json_body"]
