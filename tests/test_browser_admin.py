"""The admin page in a real headless Chromium: it fits a phone and a desktop, and a budget an admin sets on it refuses
the user's next call, on SQLite (one server) and on PostgreSQL (the page on one server, the call through another).

Screenshots go to test-output/admin-*.png."""
from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
import tornado.httpserver
import tornado.testing
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from aipipe.storage import Charge

from .browser_support import CHROMIUM, LiveServers, browser  # noqa: F401 (browser: the shared fixture)
from .conftest import base_config, token
from .fake_upstream import FakeState, make_fake_app
from .helpers import chat
from .server_process import ServerProcess

pytestmark = pytest.mark.browser
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)", allow_module_level=True)
from playwright.sync_api import expect  # noqa: E402

ADMIN = "admin@example.com"
TODAY = datetime.now(timezone.utc).date()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with LiveServers(str(tmp_path_factory.mktemp("browser-admin"))) as servers:
        yield servers


@pytest.fixture
def open_admin(browser, request):
    """open_admin(base_url, width) -> a page signed in as the admin at that width, collecting console errors."""
    pages = []

    def open_at(base_url: str, width: int = 1280, email: str = ADMIN):
        context = browser.new_context(viewport={"width": width, "height": 900})
        context.set_default_timeout(10_000)
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            ("http://127.0.0.1", "http://localhost")) else route.abort())  # nothing but loopback
        page = context.new_page()
        page.problems = []
        page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
        page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.goto(base_url + "/static/app.css")
        page.evaluate("([t, e]) => localStorage.setItem('aipipe', JSON.stringify({token: t, email: e}))",
                      [token(email), email])
        page.goto(base_url + "/admin")
        pages.append(page)
        return page

    failed_before = request.session.testsfailed
    yield open_at
    if request.session.testsfailed > failed_before:
        OUTPUT.mkdir(exist_ok=True)
        for i, page in enumerate(pages):
            page.screenshot(path=str(OUTPUT / f"{request.node.name}-{i}.png"), full_page=True)
    for page in pages:
        page.context.close()


def shoot(page, name: str) -> None:
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)


def overflow(page) -> int:
    """How many pixels the page is wider than the window (0: no sideways scrolling)."""
    return page.evaluate("Math.max(document.documentElement.scrollWidth, document.body.scrollWidth) - window.innerWidth")


async def call_chat(base_url: str, email: str) -> tuple[int, str]:
    """One chat call as the user; (status, message or "")."""
    request = HTTPRequest(base_url + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat()),
                          headers={"Authorization": f"Bearer {token(email)}", "Content-Type": "application/json"},
                          request_timeout=30)
    r = await AsyncHTTPClient(force_instance=True).fetch(request, raise_error=False)
    return r.code, orjson.loads(r.body).get("message", "") if r.code != 200 else ""


def seed_users(live, n: int) -> None:
    """n users with some spend today, written straight to the store (more than one page of the users table)."""
    now = time.time()
    charges = [Charge(email=f"student{i:03d}@school.edu" if i % 3 else f"person{i:03d}@example.com", day=TODAY,
                      cost=0.0007 * (i + 1), provider="openai", model="gpt-4o-mini", input_tokens=10 * i,
                      output_tokens=3 * i, status=200, ts=now - i * 60) for i in range(n)]
    live.run(live.store.settle(charges))


def set_budget_on_page(page, match: str, limit: str, days: str | None = None, period: str | None = None) -> None:
    page.fill("#budget-match", match)
    page.fill("#budget-limit", limit)
    page.select_option("#budget-window", period or "days")
    if days:
        page.fill("#budget-days", days)
    page.click("#budget-form button[type=submit]")


def test_admin_page_fits_a_phone_and_a_desktop_without_console_errors(live, open_admin):
    seed_users(live, 60)
    assert live.run(call_chat(live.url, "caller@example.com"))[0] == 200
    for width in (375, 1280):
        page = open_admin(live.url, width)
        expect(page.locator("#admin")).to_be_visible()
        expect(page.locator("#users-table tbody tr")).to_have_count(25)  # one page of 61 users
        expect(page.locator("#users-count")).to_have_text("1–25 of 61 users")
        expect(page.locator("#budgets-table tbody tr").first).to_be_visible()
        expect(page.locator("#usage-table tbody tr").first).to_be_visible()
        assert overflow(page) <= 0, f"{width} px: {overflow(page)} px too wide"
        shoot(page, f"admin-{width}")

        page.click("#users-next")
        expect(page.locator("#users-count")).to_have_text("26–50 of 61 users")
        page.click("#users-next")
        expect(page.locator("#users-count")).to_have_text("51–61 of 61 users")
        expect(page.locator("#users-next")).to_be_disabled()
        page.click("#users-table button[data-users-sort=email]")
        expect(page.locator("#users-count")).to_have_text("1–25 of 61 users")
        expect(page.locator("#users-table tbody tr").first.locator("td.email")).to_have_text("caller@example.com")
        page.fill("#users-filter", "person000@")
        expect(page.locator("#users-table tbody tr")).to_have_count(1)
        page.click("#users-table .user-open")
        expect(page.locator("#history-email")).to_have_text("person000@example.com")
        expect(page.locator("#history-per-model tbody tr td").first).to_have_text("openai")
        expect(page.locator("#history-per-day tbody tr")).to_have_count(1)
        assert overflow(page) <= 0, f"{width} px with the history open: {overflow(page)} px too wide"
        page.locator("#history").scroll_into_view_if_needed()
        shoot(page, f"admin-history-{width}")
        assert page.problems == []


def test_an_admin_sets_a_budget_on_the_page_and_the_users_next_call_is_refused(live, open_admin):
    user = "pupil@example.com"
    assert live.run(call_chat(live.url, user)) == (200, "")
    live.run(live.gateway.set_cost(user, TODAY, 0.5))
    page = open_admin(live.url)
    expect(page.locator("#admin")).to_be_visible()
    set_budget_on_page(page, user, "0.25", days="7")
    expect(page.locator("#budget-result")).to_have_text(f"Budget for {user} set to $0.25 in 7 days")
    rule = page.locator(f'#budgets-table tr[data-match="{user}"]')
    expect(rule.locator("td")).to_have_count(6)
    expect(rule.locator("td").nth(4)).to_contain_text(f"set by {ADMIN}")
    assert live.run(call_chat(live.url, user)) == (429, "Usage $0.5 / $0.25 in 7 days")  # no restart
    first = page.locator("#audit-table tbody tr").first.locator("td")
    expect(first.nth(1)).to_have_text(ADMIN)
    expect(first.nth(2)).to_have_text("budget set")
    expect(first.nth(3)).to_have_text(user)
    expect(first.nth(4)).to_have_text("$0.25 in 7 days (new)")
    user_row = page.locator("#users-table tbody tr", has_text=user)
    expect(user_row.locator("td").nth(2)).to_have_text("$0.25")
    expect(user_row.locator("td").nth(4)).to_have_text("200%")  # $0.5 of $0.25
    shoot(page, "admin-budget-set-sqlite")

    rule.locator("button.remove").click()
    expect(page.locator("#budget-result")).to_have_text(f"Budget rule for {user} removed")
    expect(rule).to_have_count(0)
    assert live.run(call_chat(live.url, user)) == (200, "")  # the file's "*": $1 in 7 days
    expect(page.locator("#audit-table tbody tr").first.locator("td").nth(2)).to_have_text("budget removed")
    page.fill("#budget-match", "not an email")
    page.fill("#budget-limit", "1")
    page.click("#budget-form button[type=submit]")
    expect(page.locator("#alert")).to_contain_text('match must be an email address, "@domain" or "*"')
    assert [p for p in page.problems if "400" not in p] == []  # the refused POST is the only console line


class Background:
    """An event loop on its own thread (Playwright's sync API owns the main one) running the fake provider."""

    def __init__(self):
        self.fake = FakeState()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-upstream", daemon=True)

    def __enter__(self) -> "Background":
        self._thread.start()

        async def listen():
            sock, port = tornado.testing.bind_unused_port()
            self.server = tornado.httpserver.HTTPServer(make_fake_app(self.fake))
            self.server.add_sockets([sock])
            return f"http://127.0.0.1:{port}"
        self.upstream = self.run(listen())
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def test_on_postgres_a_budget_set_on_one_servers_page_refuses_the_next_call_through_another(
        open_admin, tmp_path, request):
    if request.config.getoption("--sqlite-only"):
        pytest.skip("Postgres test skipped by --sqlite-only (never in CI)")
    from .pg import _admin, schema_url

    schema, user = f"b_{uuid.uuid4().hex[:12]}", "twin@example.com"
    with Background() as bg:  # tests/pg.py's own loop cannot run beside Playwright's: the schema is made on bg's
        bg.run(_admin(f"CREATE SCHEMA {schema}"))
        url, servers = schema_url(schema), []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(ServerProcess(str(tmp_path / name), base_config(bg.upstream, url)))
        try:
            for server in servers:
                server.start()
            for server in servers:
                bg.run(server.ready())
            a, b = (s.url for s in servers)
            assert bg.run(call_chat(b, user)) == (200, "")
            page = open_admin(a)
            expect(page.locator("#admin")).to_be_visible()
            page.fill("#cost-email", user)
            page.fill("#cost-value", "0.5")
            page.click("#cost-form button[type=submit]")
            expect(page.locator("#cost-result")).to_contain_text(f"Cost for {user}")
            set_budget_on_page(page, user, "0.25", period="week")
            expect(page.locator("#budget-result")).to_have_text(f"Budget for {user} set to $0.25 this week")
            status, said = bg.run(call_chat(b, user))
            assert (status, said) == (429, "Usage $0.5 / $0.25 this week")  # through the other server
            shoot(page, "admin-budget-set-postgres-a")

            other = open_admin(b, 375)  # the other server's page shows the rule and the audit
            expect(other.locator(f'#budgets-table tr[data-match="{user}"] td').nth(4)).to_contain_text(
                f"set by {ADMIN}")
            changes = other.locator("#audit-table tbody tr")
            expect(changes.nth(0).locator("td").nth(2)).to_have_text("budget set")
            expect(changes.nth(1).locator("td").nth(2)).to_have_text("cost set")
            assert overflow(other) <= 0
            shoot(other, "admin-budget-set-postgres-b-375")
            assert page.problems == [] and other.problems == []
        finally:
            for server in servers:
                server.kill()
            bg.run(_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
