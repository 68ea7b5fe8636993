"""What every provider module provides, and the per-request record they fill in."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from tornado.httputil import HTTPHeaders, parse_body_arguments

from ..errors import ApiError
from ..pricing import Price, cost_of, input_price, output_price, tokens_cost
from ..usage import Usage, read_usage

# Request headers any client may send to any provider (a provider adds its own: Provider.forwarded); everything
# else (Cookie, Origin, Referer, hop-by-hop headers, OpenAI-Organization/Project, the caller's own credentials)
# stays here.
FORWARD_REQUEST_HEADERS = frozenset({
    "accept", "accept-language", "content-type", "user-agent", "idempotency-key", "x-request-id",
    "x-client-request-id",
})
FORWARD_REQUEST_PREFIXES = ("x-stainless-",)  # the official SDKs' platform and retry headers
NO_BODY_METHODS = ("GET", "HEAD", "DELETE", "OPTIONS")
MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
MAX_CHOICES = 128  # more answers than this per call (n, candidateCount) no provider grants; a bigger n holds this many
DEFAULT_MAX_OUTPUT = 32768  # limits.default_max_output_tokens' default (see config.SETTINGS)
MISSING_MODEL = "Pass a JSON body with {model} so we can calculate cost"


@dataclass(slots=True)
class Call:
    """One proxied request, as the provider prepares and prices it."""

    method: str
    path: str  # below the provider prefix, starting with "/"
    query: str
    headers: HTTPHeaders
    body: bytes
    data: Any = None  # the parsed JSON body, when there is one
    model: str = ""
    fallback_models: tuple[str, ...] = ()  # other models the provider may run the call on (OpenRouter's `models`)
    price: Price | None = None
    billable: bool = False
    hold: float = 0.0  # USD held against the budget while the call runs
    fallback_cost: float = 0.0  # USD charged when a successful answer carries no usage
    strip_usage_chunk: bool = False  # the gateway asked for stream usage; hide that chunk
    input_estimate: int = 0  # tokens, from the request size
    extra: dict = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON (parsed once); 400 when it is not valid JSON."""
        if self.data is None:
            try:
                self.data = orjson.loads(self.body or b"null")
            except orjson.JSONDecodeError:
                raise ApiError(400, "Request body is not valid JSON") from None
        return self.data

    def form_field(self, name: str) -> str:
        """A multipart/form-data or urlencoded field of the body ("" if absent)."""
        args: dict = {}
        parse_body_arguments(self.headers.get("Content-Type", ""), self.body, args, {}, self.headers)
        values = args.get(name) or [b""]
        return values[0].decode("utf-8", "replace")

    @property
    def media_type(self) -> str:
        """The body's media type, as the provider will read it: `application/json` of
        `Application/JSON; charset=utf-8` (the call's one Content-Type: ProviderCall refuses two)."""
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    def body_model(self) -> str:
        """The model named in a JSON or multipart body."""
        media = self.media_type
        if media == "application/json" or media.endswith("+json"):
            data = self.json()
            model = data.get("model") if isinstance(data, dict) else None
            return model if isinstance(model, str) else ""
        if media in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return self.form_field("model")
        return ""

    def max_output_tokens(self) -> int:
        """The largest answer (per choice) the request allows, from max_tokens and its spellings (0 if none)."""
        data = self.data
        if not isinstance(data, dict):
            return 0
        most = 0  # the largest of the spellings: a provider may heed another one than the gateway would
        for name in MAX_TOKENS_FIELDS:
            v = data.get(name)
            if v.__class__ is int and v > most:  # bool, a subclass of int, is not a count
                most = v
        cfg = data.get("generationConfig")
        v = cfg.get("maxOutputTokens") if isinstance(cfg, dict) else None
        return v if v.__class__ is int and v > most else most

    def choices(self) -> int:
        """How many answers the request asks for: `n` (OpenAI style) or Gemini's candidateCount, 1 to MAX_CHOICES."""
        data = self.data
        if not isinstance(data, dict):
            return 1
        v = data.get("n")
        if v is None:
            cfg = data.get("generationConfig")
            v = cfg.get("candidateCount") if isinstance(cfg, dict) else None
        return min(v, MAX_CHOICES) if v.__class__ is int and v > 1 else 1


def refuse_unpriced_tools(data: Any, hosted: tuple[str, ...]) -> None:
    """400 when the body asks for a tool the provider runs and bills per use, beyond tokens, at a price AI Pipe does
    not know (web search, code containers, ...): such a call would be partly free. `hosted` are the tools' type
    prefixes (OpenAI, Anthropic: {"type": ...}) or keys (Gemini: {"google_search": {}})."""
    tools = data.get("tools") if isinstance(data, dict) else None
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        names = [tool["type"]] if isinstance(tool.get("type"), str) else list(tool)
        for name in names:
            if isinstance(name, str) and name.startswith(hosted):
                raise ApiError(400, f"Tool {name} is not supported here: what the provider charges for it is not priced")


def count_asked(value, default: int) -> int:
    """A count a request asks for (web results, searches), rounded up: a positive number, however spelled (100.0
    is 100 to a JSON reader), else the provider's default."""
    if value.__class__ in (int, float) and value > 0:
        return math.ceil(value)
    return default


def require_price(call: Call, price: Price | None, model: str) -> Price:
    """The price, or 400 `Model X pricing unknown` before anything goes upstream."""
    if price is None:
        raise ApiError(400, f"Model {model} pricing unknown")
    call.model, call.price, call.billable = model, price, True
    return price


def set_hold(call: Call, price: Price, default_hold: float, fixed: float = 0.0,
             default_max_output: int = DEFAULT_MAX_OUTPUT) -> None:
    """Hold the most the call can cost, so that admitting it can never let spend pass the limit.

    Input: one token per byte of the body at most (byte-level BPE and SentencePiece with byte
    fallback never make a token of less than a byte). Output: the request's max_tokens, else the
    model's maximum, else default_max_output, per choice, at the dearer of the text and audio output
    prices. `fixed` is a cost known from the request alone (characters to speak, images to draw).
    Input the body does not carry as text (an uploaded audio file, minutes of audio) cannot be
    bounded from the request: such calls hold `default_hold` more.
    """
    text_body = not call.media_type.startswith("multipart/")  # a form's parts are files
    body_bytes = len(call.body) if text_body else 0
    if price.long is not None and body_bytes > price.long_above:  # may be a long prompt, at its own price
        price = price.long
    call.input_estimate = body_bytes // 4  # the usual size of a token: what a call without usage is charged
    asked = call.max_output_tokens()
    choices = call.choices()
    most_out = (asked or price.max_output or default_max_output) * choices
    call.hold = (body_bytes * input_price(price) + most_out * output_price(price)) / 1e6 + price.per_request + fixed
    if price.per_minute or (not text_body and (price.input or price.audio_input)):
        call.hold += default_hold
    # what an answer without usage is charged: the estimate AI Pipe always charged, never above the hold
    estimate = tokens_cost(price, call.input_estimate, asked * choices) + fixed
    if not asked and (price.output or price.input) and not fixed:
        estimate += default_hold
    call.fallback_cost = min(estimate, call.hold)


def streamed_estimate(call: Call, output_bytes: int) -> float:
    """Cost guessed from what was streamed, for answers that ended without usage (at most the call's hold)."""
    if call.price is None:
        return call.fallback_cost
    guess = tokens_cost(call.price, call.input_estimate, output_bytes // 4)
    return min(max(guess, call.fallback_cost), call.hold)


class Provider:
    """Everything about one provider: its route, configuration, credentials, headers, pricing and usage.

    The rest of the gateway reads these through the provider table (aipipe.providers.PROVIDERS), so adding one is
    adding a module and its prices. (/similarity is OpenAI's embeddings by design, and the playground names the
    chat formats its page speaks.)"""

    route = ""  # the URL segment: /<route>/... is this provider's
    name = ""  # its [providers.<name>] section, price-table and ledger name
    label = ""  # its name for people (pages, logs)
    default_base_url = ""
    key_env = ""  # the environment variable holding the operator's key
    prefix = ""  # URL path prefix below the provider's base_url
    forwarded: frozenset[str] = frozenset()  # request headers (lower-case) sent on beyond FORWARD_REQUEST_HEADERS
    default_headers: dict[str, str] = {}  # sent upstream when the caller sent none
    token_headers: tuple[str, ...] = ("Authorization",)  # where callers may put their AI Pipe token, in order
    # GET paths listing what is stored on the operator's account (files, batches, ...), which every user of the
    # gateway shares: listing them would show one user's objects (and their ids, to read or delete) to all
    shared_listings: re.Pattern | None = None

    def __init__(self) -> None:
        self._forwarding: dict[str, bool] = {}  # request header names (as Tornado spells them) seen -> forwarded?

    def lists_shared_objects(self, call: Call) -> bool:
        """Whether call lists objects stored on the operator's account (only admins may: see shared_listings)."""
        listings = self.shared_listings
        return listings is not None and call.method in ("GET", "HEAD") and listings.fullmatch(call.path) is not None

    def target_url(self, base_url: str, call: Call) -> str:
        """The upstream URL for call."""
        url = base_url + self.prefix + call.path
        return f"{url}?{call.query}" if call.query else url

    def auth_headers(self, key: str) -> dict[str, str]:
        """Headers that carry the operator's (or a native) key upstream."""
        return {"Authorization": f"Bearer {key}"}

    def is_forwarded(self, name: str) -> bool:
        """Whether a request header goes on to the provider (remembered for the first 4,096 names of up to 64
        characters: clients choose header names, so the memory stays bounded)."""
        forward = self._forwarding.get(name)
        if forward is None:
            lower = name.lower()
            forward = (lower in FORWARD_REQUEST_HEADERS or lower in self.forwarded
                       or lower.startswith(FORWARD_REQUEST_PREFIXES))
            if len(self._forwarding) < 4096 and len(name) <= 64:
                self._forwarding[name] = forward
        return forward

    def forward_headers(self, call: Call, key: str) -> dict[str, str]:
        """The allow-listed request headers (the last value of one sent twice), the defaults the caller left
        out, and the key."""
        headers, out, known = call.headers, {}, self._forwarding
        for name in headers:
            forward = known.get(name)
            if forward is None:
                forward = self.is_forwarded(name)
            if forward:
                out[name] = headers.get_list(name)[-1]
        for name, value in self.default_headers.items():
            if name not in headers:
                out[name] = value
        out.update(self.auth_headers(key))
        return out

    async def prepare(self, call: Call, gateway) -> None:
        """Validate, price and possibly rewrite call; raise ApiError to refuse it."""
        raise NotImplementedError

    def rejects_operator_key(self, status: int, body: bytes) -> bool:
        """Whether an error answer means the operator's key itself was refused (beyond 401/403)."""
        return False

    def answer_usage(self, call: Call, obj: Any) -> Usage | None:
        """Usage from a parsed JSON answer (None when it reports none)."""
        return read_usage(obj)

    def event_usage(self, obj: Any) -> Usage | None:
        """Usage reported by one event of a stream, its data parsed (None when it reports none)."""
        return read_usage(obj)

    # Whether a stream reports its usage in parts, over several events (see combine_usage); when not, the last
    # event reporting usage has it all, and the relay reads no other.
    usage_in_parts = False

    def combine_usage(self, earlier: Usage | None, later: Usage) -> Usage:
        """The usage of a stream so far, given what an earlier event reported and what a later one does."""
        return later

    def cost(self, call: Call, usage: Usage) -> float:
        """USD for usage reported by the provider."""
        return cost_of(call.price, usage) if call.price else 0.0
