"""Routing policies: which worker serves a request."""
