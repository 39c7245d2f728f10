"""Thin HTTP routes: each validates its body, asks server/generation.py and server/formats.py for the
work and the shape, and returns. `API_ROUTERS` lists them for create_app."""

from __future__ import annotations

from fastapi import APIRouter

from server.routes import chat, completions, health, metrics, models

API_ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    metrics.router,
    models.router,
    chat.router,
    completions.router,
)
