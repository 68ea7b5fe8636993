"""Providers by URL prefix: /<name>/... is served by PROVIDERS[name]."""
from __future__ import annotations

from .base import Call, Provider
from .openai import PROVIDER as OPENAI
from .openrouter import PROVIDER as OPENROUTER

PROVIDERS: dict[str, Provider] = {"openai": OPENAI, "openrouter": OPENROUTER}

__all__ = ["Call", "Provider", "PROVIDERS"]
