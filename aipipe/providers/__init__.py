"""Providers by URL prefix: /<name>/... is served by PROVIDERS[name]."""
from __future__ import annotations

from .base import Call, Provider
from .gemini import PROVIDER as GEMINI
from .openai import PROVIDER as OPENAI
from .openrouter import PROVIDER as OPENROUTER

PROVIDERS: dict[str, Provider] = {"openai": OPENAI, "openrouter": OPENROUTER, "geminiv1beta": GEMINI}

__all__ = ["Call", "Provider", "PROVIDERS"]
