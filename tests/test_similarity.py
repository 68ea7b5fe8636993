"""POST /similarity: one embeddings call upstream, cosine similarities back, billed like any embeddings call."""
from __future__ import annotations

import base64
import math

import numpy as np
import orjson
import pytest

from aipipe.handlers.similarity import cosine_similarity, decode_embeddings, measure_similarity

from .conftest import token
from .fake_upstream import OPERATOR_KEYS
from .helpers import message, settled, spent

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

SMALL = 0.02e-6  # text-embedding-3-small, USD per token


def fake_vector(i: int) -> list[float]:
    """What the fake OpenAI answers for the i-th input."""
    return [((i * 7 + k) % 11) / 10 - 0.5 for k in range(8)]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def fake_tokens(texts: list[str]) -> int:
    return sum(max(1, len(t) // 4) for t in texts)


def embedding_requests(upstream) -> list[dict]:
    return [orjson.loads(r["body"]) for r in upstream.state.requests if r["path"] == "/v1/embeddings"]


@pytest.mark.gen_test
async def test_docs_by_topics_in_one_upstream_call_billed_to_the_cent(call, gateway, upstream):
    docs = ["apples and pears", {"type": "text", "value": "rust and go"}, "the weather today"]
    topics = ["fruit", {"type": "text", "value": "programming"}]
    r = await call("/similarity", "POST", json={"docs": docs, "topics": topics}, token=token("sim@example.com"))
    assert r.code == 200
    out = orjson.loads(r.body)
    texts = ["apples and pears", "rust and go", "the weather today", "fruit", "programming"]
    sent = embedding_requests(upstream)
    assert len(sent) == 1 and sent[0]["input"] == texts and sent[0]["model"] == "text-embedding-3-small"
    assert upstream.state.last["headers"]["Authorization"] == f"Bearer {OPERATOR_KEYS['openai']}"
    expected = [[round(cosine(fake_vector(d), fake_vector(3 + t)), 5) for t in range(2)] for d in range(3)]
    assert out["similarity"] == expected
    tokens = fake_tokens(texts)
    assert out["model"] == "text-embedding-3-small"
    assert out["tokens"] == tokens and out["usage"] == {"prompt_tokens": tokens}
    assert float(r.headers["X-AIPipe-Cost"]) == pytest.approx(tokens * SMALL, abs=1e-12)
    assert await spent(gateway, "sim@example.com") == pytest.approx(tokens * SMALL, abs=1e-12)
    row = (await gateway.store.ledger("sim@example.com"))[0]
    assert (row["provider"], row["model"], row["input_tokens"]) == ("openai", "text-embedding-3-small", tokens)


@pytest.mark.gen_test
async def test_without_topics_docs_are_embedded_once_and_compared_with_each_other(call, gateway, upstream):
    docs = ["one document here", "another one", "and a third, longer document"]
    r = await call("/similarity", "POST", json={"docs": docs, "precision": 3}, token=token("self@example.com"))
    assert r.code == 200
    matrix = orjson.loads(r.body)["similarity"]
    sent = embedding_requests(upstream)
    assert len(sent) == 1 and sent[0]["input"] == docs  # not docs + docs: the original paid twice
    assert [matrix[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert all(matrix[i][j] == matrix[j][i] == round(cosine(fake_vector(i), fake_vector(j)), 3)
               for i in range(3) for j in range(3))
    assert await spent(gateway, "self@example.com") == pytest.approx(fake_tokens(docs) * SMALL, abs=1e-12)


@pytest.mark.gen_test
@pytest.mark.parametrize("precision", [0, 1, 10])
async def test_precision_rounds_the_answer(call, gateway, upstream, precision):
    r = await call("/similarity", "POST", json={"docs": ["a", "b"], "topics": ["c"], "precision": precision},
                   token=token("p@example.com"))
    assert r.code == 200
    assert orjson.loads(r.body)["similarity"] == [[round(cosine(fake_vector(i), fake_vector(2)), precision)] for i in range(2)]


@pytest.mark.gen_test
async def test_other_priced_embedding_models_are_billed_at_their_price(call, gateway, upstream):
    r = await call("/similarity", "POST", json={"docs": ["large model please"], "model": "text-embedding-3-large"},
                   token=token("large@example.com"))
    assert r.code == 200 and orjson.loads(r.body)["model"] == "text-embedding-3-large"
    assert await spent(gateway, "large@example.com") == pytest.approx(4 * 0.13e-6, abs=1e-12)


BAD_BODIES = [
    ({}, "docs must be a non-empty list of strings or {type: \"text\", value} objects"),
    ({"docs": []}, "docs must be a non-empty list of strings or {type: \"text\", value} objects"),
    ({"docs": "just a string"}, "docs must be a non-empty list of strings or {type: \"text\", value} objects"),
    ({"docs": ["ok", 3]}, 'docs[1] must be a string or {type: "text", value: string}'),
    ({"docs": [{"value": "no type"}]}, 'docs[0] must be a string or {type: "text", value: string}'),
    ({"docs": [{"type": "text"}]}, 'docs[0] must be a string or {type: "text", value: string}'),
    ({"docs": [{"type": "text", "value": 5}]}, 'docs[0] must be a string or {type: "text", value: string}'),
    ({"docs": [{"type": "image", "value": "http://x/y.png"}]}, "docs[0] has type 'image': only \"text\" is supported"),
    ({"docs": ["fine", ""]}, "docs[1] is empty"),
    ({"docs": ["a"], "topics": []}, "topics must be a non-empty list of strings or {type: \"text\", value} objects"),
    ({"docs": ["a"], "topics": "b"}, "topics must be a non-empty list of strings or {type: \"text\", value} objects"),
    ({"docs": ["a"], "topics": [None]}, 'topics[0] must be a string or {type: "text", value: string}'),
    ({"docs": ["a"], "precision": -1}, "precision must be a whole number from 0 to 10"),
    ({"docs": ["a"], "precision": 11}, "precision must be a whole number from 0 to 10"),
    ({"docs": ["a"], "precision": 2.5}, "precision must be a whole number from 0 to 10"),
    ({"docs": ["a"], "precision": "3"}, "precision must be a whole number from 0 to 10"),
    ({"docs": ["a"], "precision": True}, "precision must be a whole number from 0 to 10"),
    ({"docs": ["a"], "model": 7}, "model must be the name of an embedding model"),
    ({"docs": ["a"], "model": "embed-o-matic"}, "Model embed-o-matic pricing unknown"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("body,expected", BAD_BODIES)
async def test_bad_input_is_400_before_anything_goes_upstream(call, gateway, upstream, body, expected):
    r = await call("/similarity", "POST", json=body, token=token("bad@example.com"))
    assert r.code == 400 and message(r) == expected
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_body_that_is_not_a_json_object_is_400(call, gateway, upstream):
    r = await call("/similarity", "POST", body=b"docs=a", token=token("bad@example.com"))
    assert r.code == 400 and message(r) == "Request body is not valid JSON"
    r = await call("/similarity", "POST", json=["a"], token=token("bad@example.com"))
    assert r.code == 400 and message(r) == "Request body must be a JSON object"


@pytest.mark.gen_test
async def test_item_and_character_limits_are_configurable(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(similarity={"max_items": 3, "max_chars": 20}))
    t = token("lim@example.com")
    r = await call(url + "/similarity", "POST", json={"docs": ["a", "b"], "topics": ["c", "d"]}, token=t)
    assert r.code == 400 and message(r) == "Too many items: 4 docs and topics, at most 3"
    r = await call(url + "/similarity", "POST", json={"docs": ["x" * 15, "y" * 6]}, token=t)
    assert r.code == 400 and message(r) == "Too much text: 21 characters, at most 20"
    r = await call(url + "/similarity", "POST", json={"docs": ["x" * 14, "y" * 6]}, token=t)
    assert r.code == 200
    assert len(upstream.state.requests) == 1


@pytest.mark.gen_test
async def test_default_item_limit_is_2048(call, gateway, upstream):
    r = await call("/similarity", "POST", json={"docs": ["a"] * 2049}, token=token("many@example.com"))
    assert r.code == 400 and message(r) == "Too many items: 2049 docs and topics, at most 2048"


@pytest.mark.gen_test
async def test_missing_token_and_exhausted_budget_are_refused(call, gateway, upstream):
    r = await call("/similarity", "POST", json={"docs": ["a"]})
    assert r.code == 401
    r = await call("/similarity", "POST", json={"docs": ["a"]}, token=token("blocked@example.com"))
    assert r.code == 429 and message(r).startswith("Usage $0 / $0")
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_upstream_errors_pass_through_with_their_status_and_cost_nothing(call, gateway, upstream):
    upstream.state.status = 500
    r = await call("/similarity", "POST", json={"docs": ["a", "b"]}, token=token("err@example.com"))
    assert r.code == 500 and message(r) == "The server had an error while processing your request."
    assert await spent(gateway, "err@example.com") == 0
    await settled(gateway)
    assert await gateway.ledger.store.open_holds("err@example.com", 0) == 0


@pytest.mark.gen_test
async def test_operator_key_refused_upstream_is_502_without_details(call, gateway, upstream):
    upstream.state.status = 401
    r = await call("/similarity", "POST", json={"docs": ["a"]}, token=token("key@example.com"))
    assert r.code == 502 and message(r) == "provider credentials misconfigured"


@pytest.mark.gen_test
async def test_native_openai_key_passes_through_untracked(call, gateway, upstream):
    r = await call("/similarity", "POST", json={"docs": ["a", "b"]}, headers={"Authorization": "Bearer sk-user-native-key"})
    assert r.code == 200 and len(orjson.loads(r.body)["similarity"]) == 2
    assert upstream.state.last["headers"]["Authorization"] == "Bearer sk-user-native-key"
    await settled(gateway)
    assert await gateway.store.ledger() == []


def test_base64_embeddings_decode_like_float_lists():
    vectors = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    as_b64 = [{"index": i, "embedding": base64.b64encode(v.tobytes()).decode()} for i, v in enumerate(vectors)]
    as_floats = [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
    assert np.array_equal(decode_embeddings(as_b64[::-1]), decode_embeddings(as_floats))  # rows by index
    assert np.array_equal(decode_embeddings(as_b64), vectors.astype(np.float64))


def test_zero_vector_is_zero_similar_not_nan():
    m = cosine_similarity(np.array([[0.0, 0.0], [3.0, 4.0]]), None, 5)
    assert m.tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_thousand_by_thousand_by_1536_is_fast():
    seconds = min(measure_similarity(1000, 1000, 1536) for _ in range(2))
    print(f"\n/similarity 1000 docs x 1000 topics x 1536 dims: {seconds * 1000:.0f} ms of server CPU")
    assert seconds < 5  # loose on a shared CI box; typically ~0.2-0.3 s


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype=np.float32).tobytes()).decode()


NO_EMBEDDINGS = "openai returned no embeddings"
SHAPE = "openai answered embeddings in an unexpected shape"


@pytest.mark.gen_test
@pytest.mark.parametrize("edit, expected", [
    (lambda a: {**a, "data": []}, NO_EMBEDDINGS),
    (lambda a: {k: v for k, v in a.items() if k != "data"}, NO_EMBEDDINGS),
    (lambda a: {**a, "data": None}, NO_EMBEDDINGS),
    (lambda a: {**a, "data": {"0": [1.0]}}, NO_EMBEDDINGS),
    (lambda a: {**a, "data": a["data"][:1]}, "openai returned 1 embeddings for 3 texts"),
    (lambda a: {**a, "data": a["data"] * 2}, "openai returned 6 embeddings for 3 texts"),
    (lambda a: {**a, "data": [{**d, "index": 0} for d in a["data"]]}, SHAPE),  # every row claims to be the first
    (lambda a: {**a, "data": [{**d, "index": str(d["index"])} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [{"index": d["index"]} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [1, 2, 3]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": d["embedding"][:i + 1]} for i, d in enumerate(a["data"])]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": []} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": 0.5} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": [[0.5]]} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": ["x"]} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": b64([1.0] * (d["index"] + 1))} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": "not base64!"} for d in a["data"]]}, SHAPE),
    (lambda a: {**a, "data": [{**d, "embedding": b64([float("nan"), 1.0])} for d in a["data"]]}, SHAPE),
])
async def test_embeddings_answer_without_usable_embeddings_is_502_and_still_billed(call, gateway, upstream, edit, expected):
    upstream.state.embeddings_edit = edit
    docs = ["apples and pears", "rust and go", "the weather"]
    r = await call("/similarity", "POST", json={"docs": docs}, token=token("empty@example.com"))
    assert r.code == 502 and message(r) == expected
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert await spent(gateway, "empty@example.com") == pytest.approx(fake_tokens(docs) * SMALL, abs=1e-15)
    upstream.state.embeddings_edit = None
    r = await call("/similarity", "POST", json={"docs": docs}, token=token("empty@example.com"))
    assert r.code == 200  # the server goes on serving
