"""The URL table: routes(gateway) -> [(pattern, handler, kwargs)]."""
from __future__ import annotations

from .admin import AdminHandler
from .base import NotFoundHandler
from .fetch_proxy import proxy_routes
from .ops import HealthHandler, MetricsHandler
from .pages import page_routes
from ..providers import PROVIDERS
from .proxy import ProviderHandler
from .similarity import SimilarityHandler
from .token import token_routes
from .usage import UsageHandler


def routes(gateway) -> list:
    """Every route of the server. Tornado tries them in order: calls to known providers, the bulk of the
    traffic, match first; any other first path segment reaches ProviderHandler last, which answers 404."""
    deps = {"gateway": gateway}
    known = "|".join(sorted(PROVIDERS))
    return [
        (rf"/({known})/(.*)", ProviderHandler, deps),
        (r"/usage/?", UsageHandler, deps),
        (r"/healthz", HealthHandler, deps),
        (r"/metrics", MetricsHandler, deps),
        (r"/admin/([^/]+)/?", AdminHandler, deps),  # /admin/ itself is the admin page (page_routes)
        *token_routes(gateway),
        *page_routes(gateway),
        (r"/similarity/?", SimilarityHandler, deps),
        *proxy_routes(gateway),
        (r"/([^/]+)/(.*)", ProviderHandler, deps),
        (r"/([^/]+)()", ProviderHandler, deps),
        (r".*", NotFoundHandler, deps),
    ]
