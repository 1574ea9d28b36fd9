"""The web dashboard's files (package data), served by `lokid.http.web`."""
