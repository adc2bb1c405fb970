"""Tests that run the built images (``make images``) with podman or Docker: ``make test-images``.

Kept out of ``tests/`` so that ``make test`` needs no container engine.
"""
