"""The browser pages: / (home), /login, /playground, /dashboard, /admin, plus /aipipe.js and /static/*."""
from __future__ import annotations

import asyncio
import inspect
import re

from ..pricing import Price
from ..providers import PROVIDERS
from .page_base import LOGIN_CSP, PageHandler, StaticHandler, static_path
from .redirects import RedirectError, check_redirect, redirect_from_query

# Providers whose chat wire format playground.js speaks, by config name, with the name people know them by.
# A provider missing here still shows on the home page; the playground needs its format written first.
# The providers whose chat wire format the playground speaks (ui/static/playground.js), by provider name
CHAT_FORMATS = frozenset({"openai", "openrouter", "gemini", "anthropic"})
# The model the playground starts with, when the provider prices it: cheap, quick and good enough to try things
STARTER_MODELS = ("openai/gpt-4o-mini", "gpt-4o-mini", "gemini-2.5-flash", "claude-haiku-4-5")
# Priced models that chat endpoints refuse (embeddings, speech, images) or that answer only on other APIs
NOT_CHAT = re.compile(r"embedding|tts|whisper|dall-e|moderation|image|audio|realtime|transcribe|turbo-instruct|codex"
                      r"|^(?:o1|o3|gpt-5)-pro$")
# How long the playground waits for a live model list (OpenRouter's) before rendering without it (the fetch goes on)
CATALOG_WAIT = 3.0


def about(provider) -> str:
    """The first line of the provider class's docstring, which says what its API offers."""
    return (inspect.getdoc(type(provider)) or provider.name).splitlines()[0]


def configured_providers(gateway) -> list[tuple[str, object]]:
    """(route, provider) for each provider the operator gave a key, in the provider table's order."""
    providers = gateway.config.providers
    return [(route, p) for route, p in PROVIDERS.items() if p.name in providers and providers[p.name].api_key]


def per_million(value: float) -> str:
    """A price per million tokens as people write it: $0.15, $2.50, $0.075."""
    text = f"{value:.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def price_label(price: Price) -> str:
    """What a model costs, shown next to its name in the playground's list."""
    if not (price.input or price.output or price.per_request):
        return "free"
    return f"{per_million(price.input)} in, {per_million(price.output)} out per 1M tokens"


def is_chat(model: str, price: Price) -> bool:
    """Whether a priced model answers chat requests, judged by its name and by what it is priced for."""
    if price.per_minute or price.per_million_chars or price.per_image:
        return False  # speech, transcription, images
    if price.input and not price.output:
        return False  # embeddings: priced by their input alone
    return NOT_CHAT.search(model) is None


async def live_prices(catalog) -> dict[str, Price]:
    """A provider's live price list (OpenRouter's): fetched when stale, but waited for CATALOG_WAIT at most, so a
    provider that is slow or down never holds up the page (its model box then takes any name typed in)."""
    listed = next(iter(catalog.prices), "")  # a listed model asks for a fetch only when the list is stale
    try:
        await asyncio.wait_for(asyncio.shield(catalog.price(listed)), CATALOG_WAIT)
    except asyncio.TimeoutError:
        pass
    return catalog.prices


async def model_prices(gateway, provider) -> dict[str, Price]:
    """Every model the gateway can price for a provider: its live list when it keeps one, else the shipped table."""
    if hasattr(provider, "catalog"):
        return await live_prices(provider.catalog(gateway))
    table = gateway.prices
    return {model: table.lookup(provider.name, model) for model in table.models(provider.name)}


async def chat_providers(gateway) -> list[dict]:
    """The playground's providers: configured ones it can talk to, each with its chat models and their prices."""
    out = []
    for route, provider in configured_providers(gateway):
        if provider.name not in CHAT_FORMATS:
            continue
        prices = await model_prices(gateway, provider)
        models = [{"id": m, "label": price_label(p)} for m, p in prices.items() if p and is_chat(m, p)]
        ids = {m["id"] for m in models}
        start = next((m for m in STARTER_MODELS if m in ids), models[0]["id"] if models else "")
        out.append({"route": route, "format": provider.name, "label": provider.label,
                    "models": models, "start": start})
    return out


class HomeHandler(PageHandler):
    """/: what AI Pipe is, how to call it from an app, and the routes this server answers."""

    def get(self) -> None:
        routes = [{"route": route, "about": about(p), "headers": [h for h in p.token_headers if h != "Authorization"]}
                  for route, p in configured_providers(self.gw)]
        self.render_template("home.html", routes=routes, proxy=self.gw.config.get("proxy.enabled"),
                             similarity=any(p.name == "openai" for _, p in configured_providers(self.gw)))


class PlaygroundHandler(PageHandler):
    """/playground: a chat with any configured provider, its model list rendered from the prices the gateway knows."""

    async def get(self) -> None:
        self.render_template("playground.html", providers=await chat_providers(self.gw))


class LoginHandler(PageHandler):
    """Google sign-in; hands the token to ?redirect= at once, after consent, or not at all."""

    csp = LOGIN_CSP
    referrer_policy = "no-referrer-when-downgrade"  # what Google's button needs to see our origin on localhost

    def get(self) -> None:
        target = redirect_from_query(self.request.query, self.get_query_argument("redirect", None))
        handoff, error = None, ""
        if target:
            try:
                handoff = check_redirect(target, self.base_url, self.gw.config.get("auth.redirect_origins"))
            except RedirectError as e:
                self.set_status(400)
                error = f"This sign-in link wants your token sent to an address that is not allowed. {e}."
        self.render_template("login.html", client_id=self.gw.config.get("auth.google_client_id"),
                             handoff=handoff, error=error)


def page_routes(gateway) -> list:
    """Routes for the pages and static files; they go before the provider catch-all."""
    deps = {"gateway": gateway}
    static = {"path": static_path()}
    return [
        (r"/", HomeHandler, deps),
        (r"/login/?", LoginHandler, deps),
        (r"/playground/?", PlaygroundHandler, deps),
        (r"/dashboard/?", PageHandler, {**deps, "template": "dashboard.html"}),
        (r"/admin/?", PageHandler, {**deps, "template": "admin.html"}),
        (r"/(aipipe\.js)", StaticHandler, static),
        (r"/static/(.*)", StaticHandler, static),
    ]
