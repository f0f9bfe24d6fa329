"""Serving phi_fast over HTTP in OpenAI's wire format: `create_app(model, ...)` (needs the `serve` extra)."""

from .app import create_app

__all__ = ["create_app"]
