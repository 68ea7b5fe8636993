"""The provider table: /<route>/... is served by PROVIDERS[route]. Adding a provider is adding its module here
(and its prices to pricing.json); configuration, tokens, headers and billing all read it from this table."""
from __future__ import annotations

from .anthropic import PROVIDER as ANTHROPIC
from .base import Call, Provider
from .gemini import PROVIDER as GEMINI
from .openai import PROVIDER as OPENAI
from .openrouter import PROVIDER as OPENROUTER

PROVIDERS: dict[str, Provider] = {p.route: p for p in (OPENAI, OPENROUTER, GEMINI, ANTHROPIC)}
BY_NAME: dict[str, Provider] = {p.name: p for p in PROVIDERS.values()}
# where any route other than a provider's accepts an AI Pipe token: every provider's token headers
TOKEN_HEADERS: tuple[str, ...] = tuple(dict.fromkeys(h for p in PROVIDERS.values() for h in p.token_headers))

__all__ = ["BY_NAME", "Call", "Provider", "PROVIDERS", "TOKEN_HEADERS"]
