"""lokid: a daemon that runs and supervises autonomous coding-agent sessions.

The package root stays light (the `loki` CLI imports it on every call); the
parts live in their own modules: `lokid.supervisor`, `lokid.actor`,
`lokid.actors` (one module per actor kind), `lokid.http` (the API surfaces),
`lokid.daemon` (the embeddable `serve`), `lokid.cli`.
"""

__version__ = "0.1.0"
