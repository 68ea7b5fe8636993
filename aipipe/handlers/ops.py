"""What operators and their monitoring poll: GET /healthz and GET /metrics."""
from __future__ import annotations

import hmac

from ..errors import ApiError
from .base import ApiHandler


class HealthHandler(ApiHandler):
    """200 {"status": "ok"} while the usage store answers and charges are being written; 503 otherwise."""

    route_class = "health"

    async def get(self) -> None:
        problem = await self.gw.health()
        if problem is None:
            self.send_json({"status": "ok"})
        else:
            self.send_json({"status": "unavailable", "reason": problem}, 503)

    head = get


class MetricsHandler(ApiHandler):
    """Prometheus text; behind `[server] metrics_token` (a bearer token) when one is set."""

    route_class = "metrics"

    def get(self) -> None:
        wanted = self.gw.config.get("server.metrics_token")
        if wanted:
            given = self.request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {wanted}".encode()):
                raise ApiError(401, "Metrics need Authorization: Bearer <metrics_token>")
        text, content_type = self.gw.metrics.scrape()
        self.set_header("Content-Type", content_type)
        self.finish(text)
