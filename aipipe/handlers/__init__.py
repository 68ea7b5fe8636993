"""The URL table: routes(gateway) -> [(pattern, handler, kwargs)]."""
from __future__ import annotations

from .admin import AdminHandler
from .base import NotFoundHandler
from .proxy import ProviderHandler
from .similarity import SimilarityHandler
from .usage import UsageHandler


def routes(gateway) -> list:
    """Every route of the server; providers come last as they claim any first path segment."""
    deps = {"gateway": gateway}
    return [
        (r"/usage/?", UsageHandler, deps),
        (r"/admin/([^/]*)/?", AdminHandler, deps),
        (r"/similarity/?", SimilarityHandler, deps),
        (r"/([^/]+)/(.*)", ProviderHandler, deps),
        (r"/([^/]+)()", ProviderHandler, deps),
        (r".*", NotFoundHandler, deps),
    ]
