"""End to end in a real headless Chromium: app hand-off, playground streaming, dashboard, admin, error messages."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from urllib.parse import quote

import jwt
import pytest

from .browser_support import CHROMIUM, HOSTILE_SCRIPT, browser, live, open_page, signed_in, wait_for  # noqa: F401
from .conftest import SECRET, token
from .fake_upstream import REPLY

pytestmark = pytest.mark.browser
# What the fake upstream streams: REPLY cut into 5 interleaved pieces, sent in order
STREAMED = "".join(REPLY[i::5] for i in range(5))

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)", allow_module_level=True)
from playwright.sync_api import expect  # noqa: E402


def logged_replies(page) -> list:
    """Watch the page's console for the README snippet's console.log(response) of a chat completion."""
    replies = []

    def on_console(message):
        if message.args:
            value = message.args[0].json_value()
            if isinstance(value, dict) and "choices" in value:
                replies.append(value)
    page.on("console", on_console)
    return replies


def spent(live, email: str) -> float:
    rows = live.run(live.store.daily_usage(email, datetime.now(timezone.utc).date()))
    return sum(cost for _, cost in rows)


def test_app_on_another_origin_gets_token_only_after_consent_and_its_call_is_billed(live, open_page):
    page = open_page("ada@example.com")
    replies = logged_replies(page)
    app = live.app_url("127.0.0.1", "/game/index.html?level=3&lang=en#board")
    page.goto(app)
    page.wait_for_url(live.url + "/login?redirect=**")
    page.click("#fake-google-signin")
    expect(page.locator("#consent-origin")).to_have_text(f"http://127.0.0.1:{live.app_port}")
    expect(page.locator("#consent-origin")).to_be_visible()
    assert not any("aipipe_token" in uri for uri in live.app_requests)  # nothing handed over yet
    page.click("#consent-allow")
    expect(page).to_have_url(app)  # back on the app; its own query and fragment kept, ours removed
    assert any("aipipe_token=" in uri and "level=3&lang=en" in uri for uri in live.app_requests)
    wait_for(page, lambda: replies)
    assert replies[0]["choices"][0]["message"]["content"] == REPLY
    profile = page.evaluate("JSON.parse(localStorage.getItem('aipipe'))")
    assert profile["email"] == "ada@example.com"
    assert jwt.decode(profile["token"], SECRET, algorithms=["HS256"])["email"] == "ada@example.com"

    wait_for(page, lambda: spent(live, "ada@example.com") > 0)
    page.goto(live.url + "/dashboard")
    expect(page.locator("#spent")).to_have_text("$0.000123")  # the fake OpenRouter's usage.cost for that call
    expect(page.locator("#limit")).to_have_text("$1.00")
    expect(page.locator("#left")).to_have_text("$0.999877")
    row = page.locator("#models tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator("td")).to_have_text(["openrouter", "openai/gpt-4o-mini", "1", "12", "7", "$0.000123"])
    today = datetime.now(timezone.utc).date().isoformat()
    expect(page.locator(f'#chart rect[data-date="{today}"] title')).to_have_text(f"{today}: $0.000123")
    expect(page.locator("#chart rect.bar")).to_have_count(7)
    expect(page.locator("#token")).to_have_value(profile["token"])
    assert page.errors == []


def test_allow_listed_app_gets_token_at_once_and_keeps_it(live, open_page):
    page = open_page("bob@example.com")
    replies = logged_replies(page)
    app = live.app_url("localhost", "/?x=1")
    page.goto(app)
    page.wait_for_url(live.url + "/login?redirect=**")
    page.click("#fake-google-signin")
    expect(page).to_have_url(app)  # no consent screen for http://localhost:*
    wait_for(page, lambda: replies)
    visits = len(live.app_requests)
    page.reload()  # the stored token is used: no trip to /login
    wait_for(page, lambda: len(replies) == 2)
    expect(page).to_have_url(app)
    assert len(live.app_requests) == visits + 1


def test_login_shows_token_and_usage_and_a_refused_site_gets_nothing(live, open_page):
    page = open_page("carol@example.com")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    page.goto(live.url + "/login?redirect=" + quote("https://evil.example.com/steal", safe=""))
    page.click("#fake-google-signin")
    expect(page.locator("#consent-origin")).to_have_text("https://evil.example.com")
    page.click("#consent-deny")
    expect(page.locator("#profile-email")).to_have_text("carol@example.com")
    assert page.url.startswith(live.url + "/login")
    expect(page.locator("#profile-usage")).to_have_text("Used $0.00 of $1.00 in 7 days; $1.00 left.")
    expect(page.locator("#who")).to_have_text("carol@example.com")
    page.click("#copy-token")
    expect(page.locator("#copy-token")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.locator("#profile-token").input_value()
    assert jwt.decode(copied, SECRET, algorithms=["HS256"])["email"] == "carol@example.com"


def test_get_profile_reads_the_url_once_and_then_remembers(live, open_page):
    page = open_page()
    page.goto(live.app_url("localhost", "/blank.html"))
    module = live.url + "/aipipe.js"
    profile = "async (url) => (await import(url)).getProfile()"
    assert page.evaluate(profile, module) == {"token": None, "email": None}
    page.goto(live.app_url("localhost", "/blank.html?a=1&aipipe_token=tok.en&b=x%20y&aipipe_email=e%40x.com#h"))
    assert page.evaluate(profile, module) == {"token": "tok.en", "email": "e@x.com"}
    assert page.url == live.app_url("localhost", "/blank.html?a=1&b=x%20y#h")
    page.goto(live.app_url("localhost", "/blank.html"))
    assert page.evaluate(profile, module) == {"token": "tok.en", "email": "e@x.com"}


def test_playground_sends_signed_out_visitor_to_login_and_streams_the_answer(live, open_page):
    page = open_page("player@example.com")
    page.goto(live.url + "/playground?from=test")
    page.wait_for_url(live.url + "/login?redirect=**")
    page.click("#fake-google-signin")
    expect(page).to_have_url(live.url + "/playground?from=test")  # same origin: no consent
    page.select_option("#provider", "openrouter")
    expect(page.locator("#model")).to_have_value("openai/gpt-4o-mini")
    expect(page.locator("#models-openrouter option")).to_have_count(3)  # OpenRouter's live list, rendered by the server
    page.fill("#prompt", "Say hello")
    page.evaluate("""() => {
        window.snapshots = [];
        const log = document.getElementById('conversation');
        new MutationObserver(() => snapshots.push(log.querySelector('.assistant .text')?.textContent))
            .observe(log, {childList: true, characterData: true, subtree: true});
    }""")
    live.fake.event_delay = 0.4  # wide enough apart that even a slow renderer shows pieces before the end
    try:
        page.click("#send")
        expect(page.locator(".turn.assistant .text")).to_have_text(STREAMED)
    finally:
        live.fake.event_delay = 0.0
    snapshots = [s for s in page.evaluate("snapshots") if s]
    # Arrived piece by piece: every snapshot a longer-or-equal prefix of the answer, and some shown before the end
    assert all(STREAMED.startswith(s) for s in snapshots), snapshots
    assert [len(s) for s in snapshots] == sorted(len(s) for s in snapshots), snapshots
    assert len({s for s in snapshots if s != STREAMED}) >= 2 and snapshots[-1] == STREAMED, snapshots
    expect(page.locator(".turn.assistant .cost")).to_have_text("Cost $0.000123")
    expect(page.locator("#usage")).to_have_text("Used $0.000123 of $1.00 in 7 days; $0.999877 left.")
    assert live.fake.requests[-1]["path"] == "/api/v1/chat/completions"
    assert page.errors == []


def test_admin_sets_a_cost_and_the_table_shows_it(live, open_page):
    page = open_page("admin@example.com")
    page.goto(live.url + "/admin")
    page.wait_for_url(live.url + "/login?redirect=**")
    page.click("#fake-google-signin")
    expect(page).to_have_url(live.url + "/admin")
    expect(page.locator("#admin")).to_be_visible()
    today = datetime.now(timezone.utc).date().isoformat()
    expect(page.locator("#cost-date")).to_have_value(today)
    page.fill("#cost-email", "grader@example.com")
    page.fill("#cost-value", "0.42")
    page.click("#cost-form button[type=submit]")
    expect(page.locator("#cost-result")).to_have_text(f"Cost for grader@example.com on {today} set to 0.42")
    page.fill("#filter", "grader")
    expect(page.locator("#usage-table tbody tr td")).to_have_text(["grader@example.com", today, "$0.42"])
    page.fill("#filter", "")
    page.click("button[data-sort=cost]")
    costs = page.locator("#usage-table tbody td.num").all_text_contents()
    assert len(costs) >= 2 and [float(c[1:]) for c in costs] == sorted(float(c[1:]) for c in costs)
    page.fill("#token-email", "Student@Example.com")
    page.click("#token-form button[type=submit]")
    minted = page.locator("#minted-token")
    expect(minted).to_be_visible()
    assert jwt.decode(minted.input_value(), SECRET, algorithms=["HS256"])["email"] == "student@example.com"


def test_non_admin_sees_403_on_the_admin_page(live, open_page):
    page = open_page()
    signed_in(page, live, "nobody@example.com")
    page.goto(live.url + "/admin")
    expect(page.locator("#alert")).to_have_text("403 Forbidden: Admin access required.")
    expect(page.locator("#admin")).to_be_hidden()


def test_errors_read_as_sentences(live, open_page):
    page = open_page()
    signed_in(page, live, "late@example.com", token("late@example.com", expires_in=-60))
    page.goto(live.url + "/dashboard")
    expect(page.locator("#alert")).to_contain_text("Your sign-in has expired")
    expect(page.locator("#alert a")).to_have_text("Sign in again")

    signed_in(page, live, "blocked@example.com")  # a zero budget refuses every call
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    page.fill("#prompt", "hi")
    page.click("#send")
    expect(page.locator("#alert")).to_contain_text("Limit reached: Usage $0")
    expect(page.locator("#prompt")).to_have_value("hi")  # nothing was sent: the message is back to try again
    expect(page.locator(".turn")).to_have_count(0)

    signed_in(page, live, "poor@example.com")  # $0.0001 a day: less than the most a call could cost
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    expect(page.locator("#model")).to_have_value("openai/gpt-4o-mini")
    page.fill("#prompt", "hi")
    page.click("#send")
    expect(page.locator("#alert")).to_contain_text(
        "Limit reached: Usage $0 / $0.0001 in 1 days; this call could cost up to $")

    signed_in(page, live, "unlucky@example.com")
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    expect(page.locator("#model")).to_have_value("openai/gpt-4o-mini")
    page.fill("#prompt", "hi")
    live.fake.status = 503
    try:
        page.click("#send")
        expect(page.locator("#alert")).to_contain_text("The model provider or AI Pipe's store is not answering right now")
    finally:
        live.fake.status = 200
    expect(page.locator("#alert")).to_contain_text("The server had an error while processing your request")


def test_page_fetched_through_proxy_cannot_read_the_token_on_our_origin(live, open_page):
    page = open_page()
    tok = token("victim@example.com")
    signed_in(page, live, "victim@example.com", tok)
    # The same script, run on a page of the gateway's origin, reads the token and reports it
    page.evaluate(HOSTILE_SCRIPT.replace("REPORT", live.app_url("127.0.0.1", "/report")))
    wait_for(page, lambda: live.reports)
    assert tok in live.reports.pop()

    for kind, shown_as in (("html", "text/html"), ("plain", "text/plain"), ("untyped", "text/plain")):
        # an inline script's image holds back the load event that goto waits for, so a report would be in by now
        page.goto(live.url + "/proxy/" + live.app_url("127.0.0.1", f"/hostile/{kind}"))
        assert page.evaluate("document.contentType") == shown_as  # nosniff: text is never read as HTML
        assert page.evaluate("document.querySelectorAll('h1').length") == (1 if kind == "html" else 0)
        assert not page.title().startswith("read:"), kind
        assert live.reports == [], kind
    page.goto(live.url + "/static/app.css")
    assert tok in page.evaluate("localStorage.getItem('aipipe')")  # nothing the proxied pages sent cleared it
