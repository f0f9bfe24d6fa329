"""Serving phi_fast over HTTP (`python -m phi_fast serve`); `media` reads the images that requests name."""
