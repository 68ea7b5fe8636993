"""The URL table: routes(gateway) -> [(pattern, handler, kwargs)]."""
from __future__ import annotations

from .admin import AdminHandler
from .base import NotFoundHandler
from .fetch_proxy import proxy_routes
from .pages import page_routes
from .proxy import ProviderHandler
from .similarity import SimilarityHandler
from .token import token_routes
from .usage import UsageHandler


def routes(gateway) -> list:
    """Every route of the server; providers come last as they claim any first path segment."""
    deps = {"gateway": gateway}
    return [
        (r"/usage/?", UsageHandler, deps),
        (r"/admin/([^/]*)/?", AdminHandler, deps),
        *token_routes(gateway),
        *page_routes(gateway),
        (r"/similarity/?", SimilarityHandler, deps),
        *proxy_routes(gateway),
        (r"/([^/]+)/(.*)", ProviderHandler, deps),
        (r"/([^/]+)()", ProviderHandler, deps),
        (r".*", NotFoundHandler, deps),
    ]
