"""Gemini: /geminiv1beta/* -> {base_url}/v1beta/*, priced by the model named in the path."""
from __future__ import annotations

import math
import re
from urllib.parse import parse_qsl, urlencode

import orjson

from ..errors import ApiError
from ..pricing import cost_of
from ..usage import Usage, read_usage
from .base import NO_BODY_METHODS, Call, Provider, refuse_unpriced_tools, require_price, set_hold

# Google runs (and bills) the model in the path; a `model` in the body is never consulted.
MODEL_ACTION = re.compile(r"^/models/([A-Za-z0-9._-]+):([A-Za-z]+)$")
GENERATE = frozenset({"generateContent", "streamGenerateContent"})
EMBED = frozenset({"embedContent", "batchEmbedContents"})
FREE = frozenset({"countTokens"})
# Grounding with Google Search or Maps is charged per prompt, beyond tokens (both spellings of the keys are accepted)
HOSTED_TOOLS = ("google_search", "googleSearch", "google_maps", "googleMaps")
CHARS_PER_TOKEN = 4  # Google's rule of thumb; embeddings report no usage, so their input is estimated


def embed_tokens(data, body: bytes) -> int:
    """Estimated input tokens of an embedContent / batchEmbedContents body: text characters / 4 per item."""
    if not isinstance(data, dict):
        return math.ceil(len(body) / CHARS_PER_TOKEN)
    requests = data.get("requests") if isinstance(data.get("requests"), list) else [data]
    total = 0
    for item in requests:
        item = item if isinstance(item, dict) else {}
        content = item.get("content") if isinstance(item.get("content"), dict) else {}
        parts = content.get("parts") if isinstance(content.get("parts"), list) else []
        chars = sum(len(p["text"]) for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
        chars += len(item["title"]) if isinstance(item.get("title"), str) else 0
        total += max(1, math.ceil(chars / CHARS_PER_TOKEN))
    return total


def _loads(body: bytes):
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None  # forwarded intact all the same; Google judges the body


class Gemini(Provider):
    """Google's Gemini API: generate (JSON, SSE, JSON-array streams), embed, count tokens."""

    route = "geminiv1beta"  # the route names the API version; configuration and ledger say "gemini"
    name = "gemini"
    label = "Gemini"
    default_base_url = "https://generativelanguage.googleapis.com"
    key_env = "GEMINI_API_KEY"
    prefix = "/v1beta"
    token_headers = ("Authorization", "x-goog-api-key")  # what Google's SDKs send
    shared_listings = re.compile(r"/(?:files|cachedContents|batches|tunedModels|fileSearchStores)/?")

    def target_url(self, base_url: str, call: Call) -> str:
        """The upstream URL, without any ?key= (the server key travels in x-goog-api-key)."""
        query = urlencode([(k, v) for k, v in parse_qsl(call.query, keep_blank_values=True) if k != "key"])
        url = base_url + self.prefix + call.path
        return f"{url}?{query}" if query else url

    def auth_headers(self, key: str) -> dict[str, str]:
        """Gemini takes its key in x-goog-api-key, never Authorization."""
        return {"x-goog-api-key": key}

    def rejects_operator_key(self, status: int, body: bytes) -> bool:
        """Google refuses a bad key with 400 API_KEY_INVALID rather than 401."""
        return status == 400 and b"API_KEY_INVALID" in body

    async def prepare(self, call: Call, gateway) -> None:
        """Price by the path's model; refuse unknown models and methods before anything goes upstream."""
        match = MODEL_ACTION.match(call.path)
        if match is None:
            if call.method in NO_BODY_METHODS:
                return  # listing models, reading or deleting files and caches: free
            raise ApiError(400, f"Gemini endpoint {call.path} is not supported here")
        model, action = match.groups()
        call.model = model
        if action in FREE:
            return
        if action not in GENERATE | EMBED:
            raise ApiError(400, f"Gemini method {action} is not supported here")
        price = require_price(call, gateway.prices.lookup("gemini", model), model)
        call.data = _loads(call.body)
        refuse_unpriced_tools(call.data, HOSTED_TOOLS)
        if action in EMBED:
            tokens = embed_tokens(call.data, call.body)
            call.extra["embed_tokens"] = tokens
            set_hold(call, price, gateway.default_hold, fixed=cost_of(price, Usage(input_tokens=tokens)))
        else:
            set_hold(call, price, gateway.default_hold, 0.0, gateway.config.get("limits.default_max_output_tokens"))

    def answer_usage(self, call: Call, obj) -> Usage | None:
        """Usage of a JSON answer: a JSON-array stream's last usageMetadata (it is cumulative); embeddings estimated."""
        if "embed_tokens" in call.extra:
            return Usage(input_tokens=call.extra["embed_tokens"], model=call.model)
        if isinstance(obj, list):
            found = None
            for chunk in obj:
                found = read_usage(chunk) or found
            return found
        return read_usage(obj)


PROVIDER = Gemini()
