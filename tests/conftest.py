"""Fixtures: a fake upstream, a store per backend, a gateway app, and tokens."""
from __future__ import annotations

import os
import uuid

import pytest
import tornado.httpserver
import tornado.testing
from tornado.httpclient import HTTPRequest

from aipipe.auth import mint_token
from aipipe.config import build_config
from aipipe.gateway import Gateway
from aipipe.server import make_app
from aipipe.storage import open_store

from .fake_upstream import OPERATOR_KEYS, FakeState, make_fake_app

SECRET = "test-secret-0123456789abcdef-not-for-production"
ENV = {
    "AIPIPE_SECRET": SECRET,
    "OPENAI_API_KEY": OPERATOR_KEYS["openai"],
    "OPENROUTER_API_KEY": OPERATOR_KEYS["openrouter"],
    "GEMINI_API_KEY": "AIza-test-gemini-operator",
    "ANTHROPIC_API_KEY": "sk-ant-test-operator",
    "ADMIN_EMAILS": "root@example.com, boss@example.com",
}
POSTGRES_URL = os.environ.get("AIPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_addoption(parser):
    parser.addoption("--sqlite-only", action="store_true", help="skip the Postgres parametrisation (local runs only)")


class Upstream:
    """A running fake provider server."""

    def __init__(self, state: FakeState, port: int, server=None):
        self.state, self.port, self.server = state, port, server
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
def upstream(io_loop):
    state = FakeState()
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(make_fake_app(state))
    server.add_sockets([sock])
    yield Upstream(state, port, server)
    server.stop()


def base_config(upstream_url: str, storage_url: str) -> dict:
    """The TOML-shaped config the tests run with."""
    return {
        "storage": {"url": storage_url},
        "auth": {"admins": ["admin@example.com"]},
        "budget": {
            "*": {"limit": 1.0, "days": 7},
            "blocked@example.com": {"limit": 0, "days": 1},
            "@school.edu": {"limit": 0.5, "days": 30},
            "poor@example.com": {"limit": 0.0001, "days": 1},
            "monthly@example.com": {"limit": 2.0, "period": "month"},
        },
        "salt": {"salted@example.com": "pepper-1"},
        "providers": {
            "openai": {"base_url": upstream_url},
            "openrouter": {"base_url": upstream_url + "/api"},
            "gemini": {"base_url": upstream_url},
            "anthropic": {"base_url": upstream_url + "/anthropic-api"},
        },
        "limits": {"max_concurrent_per_user": 8},
    }


def backends(config) -> list[str]:
    return ["sqlite"] if config.getoption("--sqlite-only") else ["sqlite", "postgres"]


# How a test module marked `every_gateway` runs its gateways: each store with each admission it can have.
GATEWAY_MODES = ("sqlite-memory", "sqlite-store", "postgres-store")


def pytest_generate_tests(metafunc):
    if "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", backends(metafunc.config))
    elif metafunc.definition.get_closest_marker("every_gateway") and "make_gateway" in metafunc.fixturenames:
        modes = [m for m in GATEWAY_MODES if m.split("-")[0] in backends(metafunc.config)]
        metafunc.parametrize("gateway_mode", modes, indirect=True)


@pytest.fixture
def gateway_mode(request) -> str:
    """The store and admission of the test's gateways: "sqlite-memory" unless the module is marked every_gateway."""
    return getattr(request, "param", "sqlite-memory")


@pytest.fixture
def store_url(request, tmp_path):
    """A fresh, empty database URL: a SQLite file, or a Postgres schema of its own."""
    if "store_kind" in request.fixturenames:
        kind = request.getfixturevalue("store_kind")
    else:
        kind = request.getfixturevalue("gateway_mode").split("-")[0]
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/aipipe.db"
    from .pg import fresh_postgres_url  # provided by the Postgres backend's tests

    return fresh_postgres_url(request, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def make_gateway(io_loop, upstream, store_url, gateway_mode):
    """`await make_gateway(env=..., **sections)` -> a started Gateway; sections are merged into the config."""
    made = []
    mode = gateway_mode

    async def make(env: dict | None = None, **sections) -> Gateway:
        # A lone server keeps an SQLite file's budgets in memory and locks the file, so each gateway
        # of a test gets a file of its own unless the test names one.
        url = store_url if not made or not store_url.startswith("sqlite") else store_url.replace(".db", f"-{len(made)}.db")
        data = base_config(upstream.url, url)
        if mode.endswith("-store"):
            data["storage"]["admission"] = "store"
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
        config = build_config(data, {**ENV, **(env or {})})
        store = await open_store(config.get("storage.url"))
        gw = Gateway(config, store)
        made.append(gw)  # closed at teardown even if start() refuses
        await gw.start()
        return gw

    yield make

    async def stop():
        for gw in made:
            await gw.close()
            await gw.store.close()
    io_loop.run_sync(stop)


@pytest.fixture
def gateway(io_loop, make_gateway):
    return io_loop.run_sync(make_gateway)


@pytest.fixture
def app(gateway):
    return make_app(gateway)


def token(email: str, salt: str | None = None, secret: str = SECRET, **kw) -> str:
    """An AI Pipe token as /login would mint it."""
    return mint_token(email, secret, salt, **kw)


@pytest.fixture
def call(http_client, base_url):
    """fetch(path or URL, method=..., json=..., body=..., token=..., headers=...) -> response, never raising on status."""
    import orjson

    async def fetch(path, method="GET", json=None, body=None, token=None, headers=None, **kw):
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if json is not None:
            body = orjson.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        url = path if path.startswith("http") else base_url + path
        req = HTTPRequest(url, method=method, headers=headers, body=body,
                          allow_nonstandard_methods=True, request_timeout=30, **kw)
        return await http_client.fetch(req, raise_error=False)
    return fetch


@pytest.fixture
def serve(io_loop):
    """serve(gateway) -> base URL of another server for that gateway (for tests needing a second config)."""
    servers = []

    def start(gw: Gateway) -> str:
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(make_app(gw))
        server.add_sockets([sock])
        servers.append(server)
        return f"http://127.0.0.1:{port}"
    yield start
    for server in servers:
        server.stop()
