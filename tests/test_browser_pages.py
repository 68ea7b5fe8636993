"""The pages people use every day, in a real headless Chromium: they fit a phone and a laptop, the header shows
Admin only to admins, and the playground holds a conversation with every configured provider, stops a stream,
shows what each answer cost and writes the request as code that runs."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from urllib.parse import quote

import orjson
import pytest

from .browser_support import CHROMIUM, browser, live, open_page, screenshot, signed_in  # noqa: F401
from aipipe.providers import PROVIDERS

from .conftest import token
from .fake_anthropic import ANTHROPIC_REPLY
from .fake_gemini import GEMINI_REPLY
from .fake_upstream import REPLY

pytestmark = pytest.mark.browser
STREAMED = "".join(REPLY[i::5] for i in range(5))  # what the fake's chat stream adds up to
CLAUDE_STREAMED = "".join(ANTHROPIC_REPLY[i::5] for i in range(5))
WIDTHS = (375, 1280)

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)", allow_module_level=True)
from playwright.sync_api import expect  # noqa: E402


def fits(page) -> None:
    """Nothing on the page is wider than the window: no sideways scrolling."""
    scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll <= inner, f"{page.url} is {scroll} px wide in a {inner} px window"


def chats(live, provider: str) -> list[dict]:
    """The JSON bodies of the chat requests the fake provider received, oldest first."""
    paths = {"openrouter": "/api/v1/chat/completions", "openai": "/v1/chat/completions"}
    return [orjson.loads(r["body"]) for r in live.fake.requests
            if r["provider"] == provider and r["method"] == "POST" and (provider == "gemini" or r["path"] == paths[provider])]


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


@pytest.mark.parametrize("width", WIDTHS)
def test_pages_fit_the_window_without_console_errors(live, open_page, width):
    page = open_page(width=width)
    signed_in(page, live, f"a.rather.long.address.{width}@example.com")
    # One answer first, so the playground shows a conversation and its code and the dashboard a bar and a table row
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    send(page, "Hello there, with a question long enough to wrap on a phone's screen")
    expect(page.locator(".turn.assistant .cost")).to_have_text("Cost $0.000123")
    page.click("#code-box summary")
    expect(page.locator("#code")).to_contain_text("curl")
    fits(page)
    screenshot(page, f"playground-{width}")
    for path, name, ready in (("/", "home", "#routes"), ("/login", "login", "#profile-usage:not(:empty)"),
                              ("/dashboard", "dashboard", "#models tbody tr")):
        page.goto(live.url + path)
        expect(page.locator(ready).first).to_be_visible()
        fits(page)
        screenshot(page, f"{name}-{width}")
    if width < 500:  # the chart is drawn at the box's width: its labels stay 12 px on a phone
        size = page.evaluate("getComputedStyle(document.querySelector('#chart text')).fontSize")
        box = page.evaluate("[document.querySelector('#chart svg').getBoundingClientRect().width,"
                            " +document.querySelector('#chart svg').getAttribute('width')]")
        assert size == "12px" and abs(box[0] - box[1]) < 1
    assert page.errors == [] and page.console_errors == []


@pytest.mark.parametrize("width", WIDTHS)
def test_signed_out_pages_fit_the_window(live, open_page, width):
    page = open_page(width=width)
    for path, name, ready in (("/", "home-signed-out", "#routes"), ("/login", "login-signed-out", "#fake-google-signin")):
        page.goto(live.url + path)
        expect(page.locator(ready)).to_be_visible()
        expect(page.locator("#signin")).to_be_visible()
        fits(page)
        screenshot(page, f"{name}-{width}")
    assert page.errors == [] and page.console_errors == []
    page.goto(live.url + "/login?redirect=" + quote("https://a-rather-long-name-for-an-app.example.com/play", safe=""))
    page.click("#fake-google-signin")
    expect(page.locator("#consent-allow")).to_be_visible()
    fits(page)
    screenshot(page, f"consent-{width}")
    page.goto(live.url + "/login?redirect=javascript:alert(1)")  # the 400 page
    expect(page.locator("#redirect-error")).to_be_visible()
    fits(page)


# For each page: every form control's accessible name must come from a label, aria-label or aria-labelledby, and
# the text samples must meet WCAG AA contrast (4.5:1) against the background they sit on.
ACCESSIBILITY = """(samples) => {
  const unlabelled = [...document.querySelectorAll("input, select, textarea")]
    .filter((el) => el.type !== "hidden" && !el.labels.length && !el.getAttribute("aria-label")
                    && !el.getAttribute("aria-labelledby"))
    .map((el) => el.id || el.outerHTML);
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const luminance = ([r, g, b]) => [r, g, b].map((v) => v / 255)
    .map((v) => (v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4))
    .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const weak = [];
  for (const selector of samples) {
    for (const el of document.querySelectorAll(selector)) {
      if (!el.getClientRects().length) continue;
      const style = getComputedStyle(el);
      const [a, b] = [luminance(rgb(style.color ?? style.fill).slice(0, 3)), luminance(background(el))];
      const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
      if (ratio < 4.5) weak.push(`${selector} ${ratio.toFixed(2)}`);
    }
  }
  return { unlabelled, weak };
}"""
TEXT_SAMPLES = ["body", "a", ".muted", ".hint", ".who", "button", "button.primary", ".turn .speaker", ".turn .cost",
                ".stats dt", "summary", "label", "th", "td", "code", ".alert"]


def test_controls_have_labels_and_text_has_contrast(live, open_page):
    page = open_page()
    signed_in(page, live, "reader@example.com")
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    send(page, "Hi")
    expect(page.locator(".turn.assistant .cost")).to_have_text("Cost $0.000123")
    for path in ("/playground", "/", "/login", "/dashboard"):
        if path != "/playground":
            page.goto(live.url + path)
            page.wait_for_load_state("networkidle")
        found = page.evaluate(ACCESSIBILITY, TEXT_SAMPLES)
        assert found == {"unlabelled": [], "weak": []}, path
    page.evaluate("document.querySelectorAll('.muted').forEach((m) => (m.style.color = '#aaa'))")  # it sees weak contrast
    assert page.evaluate(ACCESSIBILITY, TEXT_SAMPLES)["weak"]


def test_keyboard_reaches_everything_in_order_and_sends_and_stops(live, open_page):
    page = open_page()
    signed_in(page, live, "keys@example.com")
    page.goto(live.url + "/playground")
    page.keyboard.press("Tab")
    expect(page.locator(".skip")).to_be_focused()
    expect(page.locator(".skip")).to_be_in_viewport()
    page.keyboard.press("Enter")
    focused = []
    for _ in range(12):  # from the top of the page to "Show code"
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        if focused[-1] == "Show code":
            break
    assert focused == ["provider", "model", "System prompt, temperature, max tokens", "system", "temperature",
                       "max-tokens", "prompt", "send", "new-chat", "Show code"]
    page.select_option("#provider", "openrouter")
    page.fill("#prompt", "Typed, sent with Ctrl+Enter")
    live.fake.event_delay = 0.4
    try:
        page.press("#prompt", "Control+Enter")
        expect(page.locator(".turn.assistant .text")).not_to_be_empty()
        page.keyboard.press("Escape")
        expect(page.locator(".turn.assistant .cost")).to_have_text("Stopped. Cost $0.000123", timeout=20_000)
    finally:
        live.fake.event_delay = 0.0
    expect(page.locator("#conversation")).to_have_attribute("aria-busy", "false")


def test_admin_link_shows_only_to_admins(live, open_page):
    page = open_page()
    signed_in(page, live, "admin@example.com")
    page.goto(live.url + "/dashboard")
    expect(page.locator("#admin-link")).to_be_visible()
    page.click("#admin-link")
    expect(page.locator("#admin")).to_be_visible()

    signed_in(page, live, "student@example.com")
    page.goto(live.url + "/dashboard")
    expect(page.locator("#spent")).to_have_text("$0.00")
    page.wait_for_load_state("networkidle")  # the header's own /usage has answered too
    expect(page.locator("#admin-link")).to_be_hidden()


def test_home_lists_the_routes_this_server_offers(live, open_page):
    page = open_page()
    page.goto(live.url + "/")
    configured = [route for route, p in PROVIDERS.items() if live.gateway.config.providers[p.name].api_key]
    assert {"openai", "openrouter", "geminiv1beta", "anthropic"} <= set(configured)  # every key is set in the tests
    routes = page.locator("#routes [data-route]")
    expect(routes).to_have_count(len(configured) + 2)
    assert [r.get_attribute("data-route") for r in routes.all()] == configured + ["similarity", "proxy"]
    expect(page.locator('[data-route="geminiv1beta"] dt')).to_have_text(f"{live.url}/geminiv1beta/…")
    expect(page.locator('[data-route="anthropic"] dd')).to_contain_text("Anthropic's Messages API")


def test_conversation_sends_earlier_turns_system_prompt_and_settings(live, open_page):
    page = open_page()
    signed_in(page, live, "talker@example.com")
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    page.fill("#system", "Answer in one line.")
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "200")
    send(page, "What is 2 + 2?")
    expect(page.locator(".turn.assistant .cost")).to_have_text("Cost $0.000123")
    page.fill("#prompt", "And 3 + 3?")
    page.press("#prompt", "Control+Enter")
    expect(page.locator(".turn.assistant .cost")).to_have_text(["Cost $0.000123", "Cost $0.000123"])
    first, second = chats(live, "openrouter")[-2:]
    assert first["messages"] == [{"role": "system", "content": "Answer in one line."},
                                 {"role": "user", "content": "What is 2 + 2?"}]
    assert second["messages"] == first["messages"] + [{"role": "assistant", "content": STREAMED},
                                                      {"role": "user", "content": "And 3 + 3?"}]
    assert (second["model"], second["temperature"], second["max_tokens"], second["stream"]) == (
        "openai/gpt-4o-mini", 0.3, 200, True)
    expect(page.locator("#usage")).to_have_text("Used $0.000246 of $1.00 in 7 days; $0.999754 left.")

    page.click("#new-chat")
    expect(page.locator(".turn")).to_have_count(0)
    send(page, "Fresh start")
    expect(page.locator(".turn.assistant .cost")).to_have_text("Cost $0.000123")
    assert chats(live, "openrouter")[-1]["messages"] == [{"role": "system", "content": "Answer in one line."},
                                                         {"role": "user", "content": "Fresh start"}]
    page.reload()  # the provider, model and settings are remembered
    expect(page.locator("#provider")).to_have_value("openrouter")
    expect(page.locator("#system")).to_have_value("Answer in one line.")
    expect(page.locator("#max-tokens")).to_have_value("200")
    assert page.errors == []


def test_stop_ends_the_stream_in_the_browser_and_the_call_is_still_billed(live, open_page):
    page = open_page()
    signed_in(page, live, "stopper@example.com")
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    live.fake.event_delay = 0.4  # about three seconds for the whole answer
    try:
        send(page, "Tell me a long story")
        answer = page.locator(".turn.assistant .text")
        expect(answer).not_to_be_empty()  # the first pieces are in
        expect(page.locator("#send")).to_be_disabled()
        page.click("#stop")
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator("#send")).to_be_enabled()
        # the server reads the provider's answer to its usage after the page left, and charges it
        expect(page.locator(".turn.assistant .cost")).to_have_text("Stopped. Cost $0.000123", timeout=20_000)
    finally:
        live.fake.event_delay = 0.0
    shown = answer.text_content()
    assert shown and STREAMED.startswith(shown) and shown != STREAMED  # nothing arrived after Stop
    expect(page.locator("#usage")).to_have_text("Used $0.000123 of $1.00 in 7 days; $0.999877 left.")
    assert page.errors == []


def test_gemini_conversation_streams_with_its_own_wire_format(live, open_page):
    page = open_page()
    signed_in(page, live, "gemini.user@example.com")
    page.goto(live.url + "/playground")
    page.select_option("#provider", "geminiv1beta")
    expect(page.locator("#model")).to_have_value("gemini-2.5-flash")
    page.fill("#system", "Be kind.")
    send(page, "Hi")
    expect(page.locator(".turn.assistant .text")).to_have_text(GEMINI_REPLY)
    expect(page.locator(".turn.assistant .cost")).to_have_text("Cost $0.0000211")  # 12 in at $0.30/M + 7 out at $2.50/M
    send(page, "Again")
    expect(page.locator(".turn.assistant .cost")).to_have_count(2)
    expect(page.locator(".turn.assistant .cost").nth(1)).to_have_text("Cost $0.0000211")
    request = [r for r in live.fake.requests if r["provider"] == "gemini"][-1]
    assert (request["path"], request["query"]) == ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "alt=sse")
    assert orjson.loads(request["body"]) == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}, {"role": "model", "parts": [{"text": GEMINI_REPLY}]},
                     {"role": "user", "parts": [{"text": "Again"}]}],
        "systemInstruction": {"parts": [{"text": "Be kind."}]},
        "generationConfig": {"maxOutputTokens": 1024},
    }
    assert page.errors == []


def test_anthropic_conversation_streams_named_events(live, open_page):
    page = open_page()
    signed_in(page, live, "claude.user@example.com")
    page.goto(live.url + "/playground")
    page.select_option("#provider", "anthropic")
    expect(page.locator("#model")).to_have_value("claude-haiku-4-5")
    page.fill("#system", "Be brief.")
    page.fill("#temperature", "0")
    send(page, "Hi")
    expect(page.locator(".turn.assistant .text")).to_have_text(CLAUDE_STREAMED)
    expect(page.locator(".turn.assistant .cost")).to_have_text("Cost $0.000047")  # 12 in at $1/M + 7 out at $5/M
    send(page, "Again")
    expect(page.locator(".turn.assistant .cost")).to_have_count(2)
    expect(page.locator(".turn.assistant .cost").nth(1)).to_have_text("Cost $0.000047")
    request = [r for r in live.fake.requests if r["provider"] == "anthropic"][-1]
    assert request["path"] == "/anthropic-api/v1/messages" and request["headers"]["Anthropic-Version"] == "2023-06-01"
    assert orjson.loads(request["body"]) == {
        "model": "claude-haiku-4-5", "max_tokens": 1024, "system": "Be brief.", "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": CLAUDE_STREAMED},
                     {"role": "user", "content": "Again"}],
    }
    page.click("#code-box summary")
    page.fill("#prompt", "Third")
    python = code_for(page, "python")
    assert f'anthropic.Anthropic(base_url="{live.url}/anthropic", api_key="' in python
    assert "print(response.content[0].text)" in python
    curl = code_for(page, "curl")
    assert '-H "anthropic-version: 2023-06-01"' in curl and '-H "x-api-key: ' in curl
    if shutil.which("bash") and shutil.which("curl"):
        answer = orjson.loads(subprocess.run(["bash", "-c", curl], capture_output=True, check=True).stdout)
        assert answer["content"][0]["text"] == ANTHROPIC_REPLY
    assert page.errors == []


def code_for(page, language: str) -> str:
    page.click(f'[data-lang="{language}"]')
    expect(page.locator(f'[data-lang="{language}"]')).to_have_attribute("aria-pressed", "true")
    return page.locator("#code").text_content()


def test_show_code_writes_the_request_as_curl_python_and_javascript_that_run(live, open_page):
    email = "coder@example.com"
    tok = token(email)
    page = open_page()
    signed_in(page, live, email, tok)
    page.goto(live.url + "/playground")
    page.select_option("#provider", "openrouter")
    page.fill("#system", "It's short.")  # a quote, which the shell snippet must escape
    page.fill("#prompt", "What is 2 + 2?")
    page.click("#code-box summary")
    curl = code_for(page, "curl")
    assert f"Authorization: Bearer {tok}" in curl and f"{live.url}/openrouter/v1/chat/completions" in curl
    python = code_for(page, "python")
    assert f'OpenAI(base_url="{live.url}/openrouter/v1", api_key="{tok}")' in python
    javascript = code_for(page, "js")
    assert f'import {{ getProfile }} from "{live.url}/aipipe.js";' in javascript
    before = len(chats(live, "openrouter"))

    if shutil.which("bash") and shutil.which("curl"):
        answer = orjson.loads(subprocess.run(["bash", "-c", curl], capture_output=True, check=True).stdout)
        assert answer["choices"][0]["message"]["content"] == REPLY
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(python, {})  # noqa: S102 - the snippet as a user would paste it, against the loopback gateway
    assert printed.getvalue() == REPLY + "\n"

    live.app_pages["/snippet.html"] = javascript  # the JavaScript as an app's page, handed the token by /login
    app = page.context.new_page()
    with app.expect_console_message(lambda message: message.type == "log") as logged:
        app.goto(live.app_url("localhost", f"/snippet.html?aipipe_token={tok}&aipipe_email={email}"))
    assert logged.value.text == REPLY
    sent = chats(live, "openrouter")[before:]
    expected = [{"role": "system", "content": "It's short."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert len(sent) >= 2 and all(body["messages"] == expected and "stream" not in body for body in sent)


def test_show_code_for_gemini_runs_with_requests(live, open_page):
    tok = token("coder2@example.com")
    page = open_page()
    signed_in(page, live, "coder2@example.com", tok)
    page.goto(live.url + "/playground")
    page.select_option("#provider", "geminiv1beta")
    page.fill("#prompt", "Hi")
    page.click("#code-box summary")
    curl = code_for(page, "curl")
    assert f"x-goog-api-key: {tok}" in curl and ":generateContent" in curl
    python = code_for(page, "python")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(python, {})  # noqa: S102
    assert printed.getvalue() == GEMINI_REPLY + "\n"
    if shutil.which("bash") and shutil.which("curl"):
        answer = orjson.loads(subprocess.run(["bash", "-c", curl], capture_output=True, check=True).stdout)
        assert answer["candidates"][0]["content"]["parts"][0]["text"] == GEMINI_REPLY
    assert "console.log(response.candidates[0].content.parts[0].text);" in code_for(page, "js")
