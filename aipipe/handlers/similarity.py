"""POST /similarity: embed docs (and topics) in one OpenAI call and answer their cosine similarities."""
from __future__ import annotations

import binascii
import time
from dataclasses import dataclass

import numpy as np
import orjson
from tornado.httputil import HTTPHeaders

from ..errors import ApiError
from ..providers import PROVIDERS
from ..providers.base import Call
from ..relay import Relay
from ..usage import parse_answer
from .base import ApiHandler

DEFAULT_MODEL = "text-embedding-3-small"
ITEMS = 'a non-empty list of strings or {type: "text", value} objects'
UNEXPECTED_SHAPE = "openai answered embeddings in an unexpected shape"


@dataclass(frozen=True)
class SimilarityRequest:
    """A validated /similarity body."""

    docs: list[str]
    topics: list[str] | None
    model: str
    precision: int


def _texts(name: str, value) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{name} must be {ITEMS}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and "type" in item and item["type"] != "text":
            raise ApiError(400, f'{name}[{i}] has type {item["type"]!r}: only "text" is supported')
        text = item.get("value") if isinstance(item, dict) and item.get("type") == "text" else item
        if not isinstance(text, str):
            raise ApiError(400, f'{name}[{i}] must be a string or {{type: "text", value: string}}')
        if not text:
            raise ApiError(400, f"{name}[{i}] is empty")
        out.append(text)
    return out


def parse_request(body: dict, max_items: int, max_chars: int) -> SimilarityRequest:
    """Validate a /similarity body; 400 with a clear message for anything off."""
    docs = _texts("docs", body.get("docs"))
    topics = None if body.get("topics") is None else _texts("topics", body["topics"])
    model = body.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be the name of an embedding model")
    precision = body.get("precision", 5)
    if isinstance(precision, bool) or not isinstance(precision, int) or not 0 <= precision <= 10:
        raise ApiError(400, "precision must be a whole number from 0 to 10")
    texts = docs + (topics or [])
    if len(texts) > max_items:
        raise ApiError(400, f"Too many items: {len(texts)} docs and topics, at most {max_items}")
    chars = sum(map(len, texts))
    if chars > max_chars:
        raise ApiError(400, f"Too much text: {chars} characters, at most {max_chars}")
    return SimilarityRequest(docs, topics, model, precision)


def decode_embeddings(data: list) -> np.ndarray:
    """OpenAI's embeddings `data` (base64 float32 or float lists) as one float64 matrix, rows in input order;
    ValueError (or KeyError, TypeError) when the rows are not numbered 0..n-1 or differ in length."""
    rows = sorted(data, key=lambda d: d["index"])
    if [d["index"] for d in rows] != list(range(len(rows))):
        raise ValueError("embeddings are not numbered 0..n-1")
    if rows and isinstance(rows[0]["embedding"], str):
        raw = [binascii.a2b_base64(d["embedding"]) for d in rows]
        if len({len(r) for r in raw}) != 1:
            raise ValueError("embeddings differ in length")
        return np.frombuffer(b"".join(raw), dtype=np.float32).reshape(len(rows), -1).astype(np.float64)
    return np.asarray([d["embedding"] for d in rows], dtype=np.float64)


def embeddings_matrix(answer: dict, count: int) -> np.ndarray:
    """The `count` embeddings of an answer as a matrix; 502 when it holds none, too few or too many, or any of
    another shape (the call is settled by then: the provider's reported usage is billed either way)."""
    data = answer.get("data")
    if not isinstance(data, list) or not data:
        raise ApiError(502, "openai returned no embeddings")
    if len(data) != count:
        raise ApiError(502, f"openai returned {len(data)} embeddings for {count} texts")
    try:
        matrix = decode_embeddings(data)
    except (KeyError, TypeError, ValueError):  # binascii.Error is a ValueError
        raise ApiError(502, UNEXPECTED_SHAPE) from None
    if matrix.ndim != 2 or matrix.shape[0] != count or not matrix.shape[1] or not np.isfinite(matrix).all():
        raise ApiError(502, UNEXPECTED_SHAPE)  # e.g. numbers or nested lists as rows; NaN would answer null
    return matrix


def cosine_similarity(docs: np.ndarray, topics: np.ndarray | None, precision: int) -> np.ndarray:
    """docs x topics (or docs x docs) cosine similarities: normalise once, one matrix product, rounded."""
    def unit(m: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        return m / np.where(norms == 0, 1.0, norms)  # a zero vector is 0-similar to everything, not NaN
    d = unit(docs)
    t = d if topics is None else unit(topics)
    return np.round(d @ t.T, precision)


def measure_similarity(n_docs: int = 1000, n_topics: int = 1000, dims: int = 1536, precision: int = 5) -> float:
    """Seconds the server spends on an embeddings answer of that size: decode, normalise, multiply, round, serialise."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_docs + n_topics, dims)).astype(np.float32)
    body = orjson.dumps({"data": [{"index": i, "embedding": binascii.b2a_base64(v.tobytes(), newline=False).decode()}
                                  for i, v in enumerate(vectors)]})
    started = time.perf_counter()
    matrix = decode_embeddings(orjson.loads(body)["data"])
    result = cosine_similarity(matrix[:n_docs], matrix[n_docs:], precision)
    orjson.dumps({"similarity": result}, option=orjson.OPT_SERIALIZE_NUMPY)
    return time.perf_counter() - started


class EmbeddingsCall(Relay):
    """The relay's client side for /similarity: the provider's answer is kept here, not sent on."""

    def __init__(self, gateway) -> None:
        self.gw, self.chunks = gateway, []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def answer(self) -> dict:
        """The embeddings answer as JSON; the provider's own error (with its status) when it refused the call."""
        answer = parse_answer(b"".join(self.chunks) or b"null")
        status = self.outcome.status
        if not 200 <= status < 300:
            error = answer.get("error") if isinstance(answer, dict) else None
            text = error.get("message") if isinstance(error, dict) else None
            raise ApiError(status, text if isinstance(text, str) else f"openai answered {status}")
        if not isinstance(answer, dict):
            raise ApiError(502, UNEXPECTED_SHAPE)
        return answer


class SimilarityHandler(ApiHandler):
    """Embeds docs and topics in one upstream call, billed like any embeddings call."""

    route_class = "similarity"  # for metrics
    token_before_body = True  # a body is refused before it is read when the token is missing or bad

    async def post(self) -> None:
        identity = self.gw.identify(self.request.headers)
        config = self.gw.config
        req = parse_request(self.json_body(), config.get("similarity.max_items"), config.get("similarity.max_chars"))
        # base64 float32 is what OpenAI stores: a quarter of the bytes of JSON floats and far faster to read
        payload = {"model": req.model, "input": req.docs + (req.topics or []), "encoding_format": "base64"}
        call = Call(method="POST", path="/v1/embeddings", query="", body=orjson.dumps(payload),
                    headers=HTTPHeaders({"Content-Type": "application/json"}))
        embedding = EmbeddingsCall(self.gw)
        await embedding.relay(identity, PROVIDERS["openai"], call)  # priced, admitted and settled like any call
        answer = embedding.answer()
        n_docs = len(req.docs)
        matrix = embeddings_matrix(answer, len(payload["input"]))
        similarity = cosine_similarity(matrix[:n_docs], None if req.topics is None else matrix[n_docs:], req.precision)
        usage = embedding.outcome.usage
        tokens = usage.input_tokens if usage is not None else call.input_estimate
        self.set_header("Content-Type", "application/json")
        self.set_header("X-AIPipe-Cost", f"{embedding.outcome.cost:.10f}".rstrip("0").rstrip(".") or "0")
        self.finish(orjson.dumps({"model": req.model, "similarity": similarity, "tokens": tokens,
                                  "usage": {"prompt_tokens": tokens}}, option=orjson.OPT_SERIALIZE_NUMPY))
