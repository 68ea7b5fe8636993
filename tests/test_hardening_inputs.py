"""Bad input at /proxy, /login, /token, /usage, /admin/* and /similarity: always a 4xx with a JSON message and
CORS headers (an HTML page at /login, which is a page), never a 500, and the server goes on serving."""
from __future__ import annotations

import json

import orjson
import pytest
import tornado.httpserver
import tornado.testing
from tornado.httpclient import HTTPRequest

from .conftest import SECRET, token
from .fake_google import CLIENT_ID, make_certs_app

USER = token("user@example.com")
ADMIN = token("admin@example.com")
TODAY = "2025-01-02"


@pytest.fixture
def gateway(io_loop, make_gateway):
    """A gateway whose /token verifies against a loopback stand-in for Google's certificates."""
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(make_certs_app({"fetches": 0}))
    server.add_sockets([sock])
    certs = f"http://127.0.0.1:{port}/oauth2/v1/certs"
    yield io_loop.run_sync(lambda: make_gateway(auth={"google_client_id": CLIENT_ID, "google_certs_url": certs}))
    server.stop()


@pytest.fixture
def raw(http_client, base_url):
    """fetch(path, method, body, headers) with bytes passed as they are; never raises on status."""
    async def fetch(path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        request = HTTPRequest(base_url + path, method=method, body=body, headers=headers or {},
                              allow_nonstandard_methods=True, request_timeout=30)
        return await http_client.fetch(request, raise_error=False)
    return fetch


def assert_json_4xx(r, status: int | None = None) -> str:
    """r is a 4xx JSON error with CORS headers; its message."""
    assert 400 <= r.code < 500, (r.code, r.body[:200])
    if status is not None:
        assert r.code == status, (r.code, r.body[:200])
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    message = orjson.loads(r.body)["message"]
    assert isinstance(message, str) and message
    return message


async def assert_still_serving(raw) -> None:
    r = await raw("/usage", headers={"Authorization": f"Bearer {USER}"})
    assert r.code == 200 and orjson.loads(r.body)["email"] == "user@example.com"


def auth(tok: str = USER) -> dict:
    return {"Authorization": f"Bearer {tok}"}


JSON = {"Content-Type": "application/json"}

METHODS_NOT_ALLOWED = [
    ("/usage", "POST", 405), ("/usage", "PUT", 405), ("/usage", "DELETE", 405), ("/usage", "PATCH", 405),
    ("/token", "PUT", 405), ("/token", "DELETE", 405), ("/token", "PATCH", 405),
    ("/similarity", "GET", 405), ("/similarity", "PUT", 405), ("/similarity", "DELETE", 405),
    ("/admin/usage", "POST", 405), ("/admin/token", "DELETE", 405), ("/admin/cost", "GET", 405),
    ("/admin/cost", "PUT", 405), ("/proxy/http://127.0.0.1:9/", "PROPFIND", 405), ("/usage", "PROPFIND", 405),
    ("/similarity", "TRACE", 405), ("/admin/usage", "CONNECT", 405),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("path, method, status", METHODS_NOT_ALLOWED)
async def test_methods_not_allowed_are_json_4xx(raw, gateway, path, method, status):
    r = await raw(path, method, headers=auth(ADMIN))
    assert_json_4xx(r, status)
    await assert_still_serving(raw)


BAD_QUERIES = [
    ("/usage?days=%FF", USER), ("/usage?email=%FF", USER), ("/usage?by=%FF", USER), ("/usage?days=1&days=x", USER),
    ("/usage?days=" + "9" * 5000, USER), ("/usage?days=" + "0" * 100 + "5", USER), ("/usage?email=" + "a" * 20000, USER),
    ("/usage?email=other@example.com&email=x", USER), ("/usage?days=1e3", USER), ("/usage?days=1_0", USER),
    ("/usage?days=%2B5", USER), ("/usage?days=%E2%91%A0", USER), ("/usage?days=%EF%BC%95", USER),  # ①, fullwidth 5
    ("/admin/usage?limit=%FF", ADMIN), ("/admin/usage?limit=-1", ADMIN), ("/admin/usage?limit=" + "9" * 5000, ADMIN),
    ("/admin/usage?offset=1&offset=x", ADMIN), ("/admin/usage?from=2025-02-30", ADMIN),
    ("/admin/usage?from=%FF", ADMIN), ("/admin/usage?to=" + "2" * 10000, ADMIN), ("/admin/usage?email=nope", ADMIN),
    ("/admin/usage?email=%FF", ADMIN), ("/admin/token?email=%FF", ADMIN), ("/admin/token?email=" + "a" * 10000, ADMIN),
    ("/admin/token?email=a%40b%0aX", ADMIN), ("/token?credential=%FF", USER), ("/token?credential=" + "x" * 30000, USER),
    ("/token?credential=a&credential=%FF", USER), ("/token?credential=a.b.c", USER), ("/token?credential=%00", USER),
    ("/proxy/http%3A%2F%2F%FF", USER), ("/proxy/%FF", USER), ("/proxy/http://[::1/", USER),
    ("/proxy/http://127.0.0.1:%FF/", USER), ("/proxy/http://:80/", USER), ("/proxy/http:///x", USER),
    ("/proxy/http%3A%2F%2F127.0.0.1%2F%0d%0aHost%3A%20x", USER), ("/proxy/http://" + "a" * 300 + "/", USER),
    ("/similarity?x=%FF", USER),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("path, tok", BAD_QUERIES, ids=range(len(BAD_QUERIES)))
async def test_bad_query_arguments_are_json_4xx(raw, gateway, path, tok):
    method = "POST" if path.startswith("/similarity") else "GET"
    r = await raw(path, method, body=b"{}" if method == "POST" else None, headers={**auth(tok), **JSON})
    message = assert_json_4xx(r)
    assert tok not in message and "a" * 100 not in message  # never quoted back, whatever its length
    await assert_still_serving(raw)


BAD_BODIES = [
    b"", b"not json", b"[1, 2]", b'"a string"', b"null", b"123", b"{", b'{"a": 1}{', b"\xff\xfe{}",
    b"[" * 5000 + b"]" * 5000, b'{"a": ' * 2000 + b"1" + b"}" * 2000, b'{"a": 1e400}', b'{"a": NaN}',
    b'{"\xff": 1}', b'{"docs": "\xc3\x28"}',
]
BODY_ROUTES = ["/similarity", "/admin/cost", "/token"]


@pytest.mark.gen_test
@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
async def test_bad_json_bodies_are_json_4xx(raw, gateway, upstream, path, body):
    r = await raw(path, "POST", body=body, headers={**auth(ADMIN), **JSON})
    assert_json_4xx(r)
    assert upstream.state.requests == []
    await assert_still_serving(raw)


WRONG_TYPES = [
    ("/similarity", {"docs": "a"}), ("/similarity", {"docs": [1]}), ("/similarity", {"docs": [None]}),
    ("/similarity", {"docs": [["a"]]}), ("/similarity", {"docs": [{"type": "text", "value": 5}]}),
    ("/similarity", {"docs": [{"type": "image", "value": "x"}]}), ("/similarity", {"docs": [{"type": ["text"]}]}),
    ("/similarity", {"docs": [{}]}), ("/similarity", {"docs": ["a"], "topics": "b"}),
    ("/similarity", {"docs": ["a"], "topics": []}), ("/similarity", {"docs": ["a"], "model": 5}),
    ("/similarity", {"docs": ["a"], "model": ""}), ("/similarity", {"docs": ["a"], "precision": "5"}),
    ("/similarity", {"docs": ["a"], "precision": True}), ("/similarity", {"docs": ["a"], "precision": 1.5}),
    ("/similarity", {"docs": ["a"], "precision": 2**63}), ("/similarity", {"docs": ["a"], "model": "no-such-model"}),
    ("/similarity", {}), ("/similarity", {"docs": []}), ("/similarity", {"docs": [""]}),
    ("/admin/cost", {"email": 5, "date": TODAY, "cost": 1}), ("/admin/cost", {"email": ["a@b.c"], "date": TODAY, "cost": 1}),
    ("/admin/cost", {"email": "a@b.c", "date": 20250102, "cost": 1}), ("/admin/cost", {"email": "a@b.c", "date": TODAY, "cost": None}),
    ("/admin/cost", {"email": "a@b.c", "date": TODAY, "cost": True}), ("/admin/cost", {"email": "a@b.c", "date": TODAY, "cost": {}}),
    ("/admin/cost", {"email": "a@b.c", "date": "0000-01-01", "cost": 1}), ("/admin/cost", {"email": "a@b.c", "date": TODAY, "cost": 10**30}),
    ("/admin/cost", {"email": "a@b.c", "date": "２０２５-01-01", "cost": 1}), ("/admin/cost", {"email": "a@b.c", "date": TODAY, "cost": -0.01}),
    ("/token", {"credential": 5}), ("/token", {"credential": ["x"]}), ("/token", {"credential": None}),
    ("/token", {"credential": {"a": 1}}), ("/token", {"credential": ""}), ("/token", {"credential": "a.b.c"}),
    ("/token", {"credential": "x" * 100000}), ("/token", {}),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("path, body", WRONG_TYPES, ids=range(len(WRONG_TYPES)))
async def test_wrong_types_are_json_4xx(raw, gateway, upstream, path, body):
    data = json.dumps(body).encode()  # orjson cannot write an integer past 64 bits
    r = await raw(path, "POST", body=data, headers={**auth(ADMIN), **JSON})
    assert_json_4xx(r)
    assert upstream.state.requests == []
    await assert_still_serving(raw)


@pytest.mark.gen_test
@pytest.mark.parametrize("body, content_type", [
    (b"credential=%FF", "application/x-www-form-urlencoded"), (b"credential=a&credential=b", "application/x-www-form-urlencoded"),
    (b"\xff\xfe", "application/x-www-form-urlencoded"), (b"credential", "application/x-www-form-urlencoded"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x"), (b"credential=a", "multipart/form-data"),
    (b"credential=a", "text/plain"), (b'{"credential": 1}', "application/json; charset=latin-1"),
])
async def test_bad_token_forms_are_json_4xx(raw, gateway, body, content_type):
    r = await raw("/token", "POST", body=body, headers={"Content-Type": content_type})
    assert_json_4xx(r)
    await assert_still_serving(raw)


GARBLED = [
    "", "Bearer", "Bearer ", "Bearer a.b.c", "Basic dXNlcjpwYXNz", "Bearer " + USER + "x", "Bearer " + USER[:-4],
    "Bearer " + USER + " extra", "Bearer " + token("user@example.com", secret=SECRET[::-1]), "Bearer " + "e" * 10000,
    "Bearer eyJhbGciOiJub25lIn0.eyJlbWFpbCI6InJvb3RAZXhhbXBsZS5jb20ifQ.", "Bearer \xe9\xe8", "Token " + USER,
    "bearer " + token("user@example.com", expires_in=-60),
]
NATIVE = ["Bearer sk-user-native-key", "Bearer AIza-native"]  # provider keys: refused where only a user will do
TOKEN_ROUTES = [("/usage", "GET"), ("/admin/usage", "GET"), ("/admin/token", "GET"), ("/admin/cost", "POST")]


@pytest.mark.gen_test
@pytest.mark.parametrize("path, method", TOKEN_ROUTES + [("/similarity", "POST")])
@pytest.mark.parametrize("header", GARBLED, ids=range(len(GARBLED)))
async def test_missing_and_garbled_tokens_are_json_401(raw, gateway, upstream, path, method, header):
    headers = {"Authorization": header} if header else {}
    r = await raw(path, method, body=b'{"docs": ["a"]}' if method == "POST" else None, headers={**headers, **JSON})
    message = assert_json_4xx(r, 401)
    assert USER not in message and header[7:] not in message or not header[7:]
    assert upstream.state.requests == []
    await assert_still_serving(raw)


@pytest.mark.gen_test
@pytest.mark.parametrize("path, method", TOKEN_ROUTES)
@pytest.mark.parametrize("header", NATIVE)
async def test_provider_keys_are_json_401_where_a_user_is_needed(raw, gateway, upstream, path, method, header):
    r = await raw(path, method, body=b"{}" if method == "POST" else None, headers={"Authorization": header, **JSON})
    assert assert_json_4xx(r, 401) == "Provider keys cannot be used here: use an AI Pipe token"
    await assert_still_serving(raw)


@pytest.mark.gen_test
async def test_proxy_requiring_a_token_refuses_garbled_ones_with_json_401(make_gateway, serve, raw, http_client):
    url = serve(await make_gateway(proxy={"require_token": True}))
    for header in GARBLED + NATIVE:
        headers = {"Authorization": header} if header else {}
        r = await http_client.fetch(HTTPRequest(f"{url}/proxy/http://127.0.0.1:9/", headers=headers), raise_error=False)
        assert_json_4xx(r, 401)
    await assert_still_serving(raw)


@pytest.mark.gen_test
@pytest.mark.parametrize("query", [
    "redirect=https://[::1/", "redirect=http://[::1", "redirect=https%3A%2F%2F%5B%3A%3A1%2F", "redirect=http://[zz]/",
    "redirect=http://a%EF%BC%83b@evil.example/", "redirect=%FF", "redirect=http://x:%FF/", "redirect=" + "h" * 10000,
    "redirect=http://" + "a" * 5000 + ".com/", "redirect=javascript:alert(1)&redirect=http://[::1/",
])
async def test_login_with_a_malformed_redirect_is_its_400_page(raw, gateway, query):
    r = await raw("/login?" + query)
    assert r.code == 400, r.body[:300]
    assert r.headers["Content-Type"].startswith("text/html")  # /login is a page: its errors are pages
    assert "Internal server error" not in r.body.decode()
    await assert_still_serving(raw)


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PROPFIND"])
async def test_login_with_another_method_is_405_page(raw, gateway, method):
    r = await raw("/login", method)
    assert r.code == 405 and r.headers["Content-Type"].startswith("text/html")
    await assert_still_serving(raw)
