"""OpenAI: /openai/* -> {base_url}/*, priced from the shipped table."""
from __future__ import annotations

import re

import orjson

from ..errors import ApiError
from .base import MISSING_MODEL, NO_BODY_METHODS, Call, Provider, refuse_unpriced_tools, require_price, set_hold

# POSTs that cost nothing and name no model, matched whole against the path as sent (aipipe/request_path.py
# keeps that path plain): any other POST is priced, so an unexpected spelling costs money, never the reverse.
FREE_POST = re.compile(
    r"/v1/(?:files(?:/[^/]+)?|uploads(?:/[^/]+/(?:parts|complete|cancel))?|moderations"
    r"|(?:batches|responses|fine_tuning/jobs|vector_stores/[^/]+/file_batches|threads/[^/]+/runs)/[^/]+/cancel"
    r"|fine_tuning/jobs/[^/]+/(?:pause|resume))")
# Tools OpenAI runs and charges per call or per container, beyond tokens (the Responses API's built-in tools)
HOSTED_TOOLS = ("web_search", "file_search", "code_interpreter", "image_generation")
# POSTs priced from the answer's usage (or from the request, for speech and images): the call is over when its
# answer is. Work that goes on after the answer (fine-tuning jobs, Assistants runs, background responses,
# realtime sessions with their own client keys) would be billed one call's estimate for hours of it: refused.
PRICED_POST = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/audio/speech",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/generations", "/v1/images/edits",
    "/v1/images/variations",
})


class OpenAI(Provider):
    """OpenAI's API: chat completions, responses, embeddings, audio, images, models."""

    route = name = "openai"
    label = "OpenAI"
    default_base_url = "https://api.openai.com"
    key_env = "OPENAI_API_KEY"
    forwarded = frozenset({"openai-beta"})
    shared_listings = re.compile(
        r"/v1/(?:files|uploads|batches|vector_stores|fine_tuning/jobs|assistants|chat/completions|evals|containers"
        r"|conversations|responses|threads|videos)/?")

    async def prepare(self, call: Call, gateway) -> None:
        """Require a priced model on every paid call; ask chat streams to report usage."""
        if call.method in NO_BODY_METHODS or FREE_POST.fullmatch(call.path) is not None:
            return
        path = call.path.rstrip("/")  # the endpoint, however the client ended it
        if path not in PRICED_POST:
            raise ApiError(400, f"OpenAI endpoint {call.path} is not supported here: only calls that are over when "
                                "their answer is can be priced")
        model = call.body_model()
        if not model:
            raise ApiError(400, MISSING_MODEL)
        price = require_price(call, gateway.prices.lookup("openai", model), model)
        data = call.data if isinstance(call.data, dict) else {}
        if data.get("background") is True:  # the answer comes back before the work (and its usage) is done
            raise ApiError(400, "Background responses are not supported here: their usage is known only after "
                                "the call has ended")
        refuse_unpriced_tools(data, HOSTED_TOOLS)
        if "web_search_options" in data and not price.per_request:
            # chat completions' search: priced only on the search models, whose every call pays its fee
            raise ApiError(400, "Tool web_search_options is not supported here: what the provider charges for it is "
                                "not priced")
        set_hold(call, price, gateway.default_hold, self._fixed_cost(call, data, gateway.prices),
                 gateway.config.get("limits.default_max_output_tokens"))
        if data.get("stream") is True and path == "/v1/chat/completions":
            options = data.get("stream_options") if isinstance(data.get("stream_options"), dict) else {}
            if not options.get("include_usage"):
                data["stream_options"] = {**options, "include_usage": True}
                call.body = orjson.dumps(data)
                call.strip_usage_chunk = True

    @staticmethod
    def _fixed_cost(call: Call, data: dict, prices) -> float:
        """Costs the answer will not report: characters spoken, images drawn (priced by quality and size: an image
        of a quality or size the table does not list costs the model's dearest)."""
        price = call.price
        if price.per_million_chars and isinstance(data.get("input"), str):
            return len(data["input"]) * price.per_million_chars / 1e6
        if price.per_image:
            if call.media_type == "multipart/form-data":  # edits and variations: the options are form fields
                data = {name: call.form_field(name) for name in ("quality", "size", "n") if call.form_field(name)}
                data["n"] = int(data["n"]) if data.get("n", "").isdigit() else 1
            quality, size = data.get("quality", "standard"), data.get("size", "1024x1024")
            variant = prices.lookup("openai", f"{call.model} {quality} {size}") if isinstance(quality, str) and \
                isinstance(size, str) else None
            n = data.get("n", 1)
            return (variant or price).per_image * (n if isinstance(n, int) and 0 < n <= 10 else 1)
        return 0.0


PROVIDER = OpenAI()
