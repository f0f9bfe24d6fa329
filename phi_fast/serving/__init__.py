"""Serving phi_fast over HTTP in OpenAI's wire format (`python -m phi_fast serve`): `create_app(model, ...)`
(needs the `serve` extra); `media` reads the images that requests name."""

from .app import create_app

__all__ = ["create_app"]
