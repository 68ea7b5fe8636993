"""Server-side behaviour of the pages: where /login may send tokens, CSP, escaping, static files with CORS."""
from __future__ import annotations

import html
import logging
import re
from urllib.parse import quote

import orjson
import pytest

from aipipe.handlers.pages import per_million
from aipipe.handlers.redirects import RedirectError, check_redirect, redirect_from_query

from .fake_google import CLIENT_ID

ALLOWED = ["http://localhost:*", "https://app.example.com", "http://[::1]:3000"]
OWN = "http://127.0.0.1:8787"


@pytest.fixture
def gateway(io_loop, make_gateway, request):
    """The gateway the pages are served from; parametrise it indirectly with more of make_gateway's arguments."""
    more = getattr(request, "param", {})
    return io_loop.run_sync(lambda: make_gateway(auth={"google_client_id": CLIENT_ID, "redirect_origins": ALLOWED},
                                                 **more))


def login_data(response) -> dict:
    """The hand-off decision /login rendered into its page."""
    text = response.body.decode()
    tag = re.search(r'<div id="login"[^>]*>', text).group(0)
    return {k: html.unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', tag)}


@pytest.mark.parametrize("target", [
    "javascript:alert(document.domain)",
    "JavaScript:alert(1)",
    "java\tscript:alert(1)",
    " javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox",
    "file:///etc/passwd",
    "//evil.example.com/steal",
    "///evil.example.com",
    "http:evil.example.com",
    "http:/evil.example.com",
    "http:///evil.example.com",
    "https:\\\\evil.example.com",
    "http://localhost:3000\\@evil.example.com",
    "http://user:pass@localhost:3000/",
    "http://localhost:3000@evil.example.com/",
    "https://app.example.com%2f@evil.example.com/",
    "http://%65vil.example.com/",
    "http://evil.example.com:99999/",
    "http://evil.example.com:port/",
    "http://ev<il>.com/",
    "http:// evil.example.com/",
    "http://evil.example.com/\n",
    "ftp://app.example.com/",
    "evil.example.com",
    "",
])
def test_unsafe_redirects_are_refused(target):
    with pytest.raises(RedirectError):
        check_redirect(target, OWN, ALLOWED)


@pytest.mark.parametrize("target, url, origin, consent", [
    ("http://localhost:5173/app?x=1#top", "http://localhost:5173/app?x=1#top", "http://localhost:5173", False),
    ("http://LOCALHOST:3000", "http://localhost:3000/", "http://localhost:3000", False),
    ("http://localhost/", "http://localhost/", "http://localhost", False),
    ("https://app.example.com/a/b?q=%20#h", "https://app.example.com/a/b?q=%20#h", "https://app.example.com", False),
    ("https://app.example.com:443/", "https://app.example.com/", "https://app.example.com", False),
    ("http://[::1]:3000/x", "http://[::1]:3000/x", "http://[::1]:3000", False),
    ("https://localhost:5173/", "https://localhost:5173/", "https://localhost:5173", True),  # http only in the list
    ("http://localhost.evil.com:3000/", "http://localhost.evil.com:3000/", "http://localhost.evil.com:3000", True),
    ("https://app.example.com:8443/", "https://app.example.com:8443/", "https://app.example.com:8443", True),
    ("http://app.example.com/", "http://app.example.com/", "http://app.example.com", True),
    ("https://evil.example.com/x", "https://evil.example.com/x", "https://evil.example.com", True),
    ("https://xn--pple-43d.com/", "https://xn--pple-43d.com/", "https://xn--pple-43d.com", True),
    ("https://аpple.com/", "https://xn--pple-43d.com/", "https://xn--pple-43d.com", True),  # Cyrillic а shown as punycode
    ("http://127.0.0.1:8787/dashboard", "http://127.0.0.1:8787/dashboard", "http://127.0.0.1:8787", False),
    ("/playground?x=1", "http://127.0.0.1:8787/playground?x=1", "http://127.0.0.1:8787", False),
    ("http://127.0.0.1:8788/", "http://127.0.0.1:8788/", "http://127.0.0.1:8788", True),
])
def test_redirect_decisions(target, url, origin, consent):
    handoff = check_redirect(target, OWN, ALLOWED)
    assert (handoff.url, handoff.origin, handoff.consent) == (url, origin, consent)


def test_nothing_is_trusted_without_an_allow_list():
    assert check_redirect("http://localhost:3000/", OWN, []).consent
    assert not check_redirect("http://127.0.0.1:8787/", OWN, []).consent


def test_redirect_from_query_keeps_an_unencoded_app_url_whole():
    # The README's snippet does `login?redirect=${window.location.href}` without encoding it
    raw = "redirect=http://localhost:3000/app?x=1&y=a%20b"
    assert redirect_from_query(raw, "http://localhost:3000/app?x=1") == "http://localhost:3000/app?x=1&y=a%20b"
    encoded = "redirect=" + quote("http://localhost:3000/app?x=1&y=2", safe="")
    assert redirect_from_query(encoded, "http://localhost:3000/app?x=1&y=2") == "http://localhost:3000/app?x=1&y=2"
    assert redirect_from_query("x=1", None) is None


@pytest.mark.gen_test
async def test_login_page_has_google_client_id_csp_and_no_framing(call):
    response = await call("/login")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self' https://accounts.google.com/gsi/client;" in csp
    assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    data = login_data(response)
    assert data["client-id"] == CLIENT_ID and data["redirect"] == ""


@pytest.mark.gen_test
async def test_allow_listed_redirect_gets_token_without_consent(call):
    response = await call("/login?redirect=" + quote("http://localhost:5173/app?x=1&y=2#frag", safe=""))
    assert response.code == 200
    assert login_data(response) == {"client-id": CLIENT_ID, "redirect": "http://localhost:5173/app?x=1&y=2#frag", "consent": "0"}
    assert 'id="consent"' not in response.body.decode()


@pytest.mark.gen_test
async def test_readme_style_unencoded_redirect_keeps_the_apps_query(call):
    response = await call("/login?redirect=http://localhost:5173/app?x=1&y=2")
    assert login_data(response)["redirect"] == "http://localhost:5173/app?x=1&y=2"


@pytest.mark.gen_test
async def test_other_origin_gets_a_consent_screen_naming_it(call):
    response = await call("/login?redirect=" + quote("https://evil.example.com/steal?x=1", safe=""))
    assert response.code == 200
    data = login_data(response)
    assert data["consent"] == "1" and data["redirect"] == "https://evil.example.com/steal?x=1"
    page = response.body.decode()
    assert re.search(r'<p class="origin" id="consent-origin">https://evil.example.com</p>', page)
    assert 'id="consent-allow"' in page


@pytest.mark.gen_test
async def test_same_origin_redirect_needs_no_consent(call, base_url):
    response = await call("/login?redirect=" + quote(base_url + "/playground?model=x", safe=""))
    assert login_data(response)["consent"] == "0"
    relative = await call("/login?redirect=%2Fdashboard")
    assert login_data(relative) == {"client-id": CLIENT_ID, "redirect": base_url + "/dashboard", "consent": "0"}


@pytest.mark.gen_test
@pytest.mark.parametrize("target", ["javascript:alert(1)", "//evil.example.com", "data:text/html,hi",
                                    "http://localhost:3000@evil.example.com/"])
async def test_login_refuses_unsafe_redirect_with_400_and_no_handoff(call, target):
    response = await call("/login?redirect=" + quote(target, safe=""))
    assert response.code == 400
    page = response.body.decode()
    assert login_data(response)["redirect"] == ""
    assert "not allowed" in page and 'id="consent"' not in page
    assert "evil.example.com" not in page and "javascript:" not in page


@pytest.mark.gen_test
async def test_redirect_markup_is_escaped(call):
    evil = 'https://evil.example.com/"><script>alert(1)</script>'
    response = await call("/login?redirect=" + quote(evil, safe=""))
    page = response.body.decode()
    assert "<script>alert(1)" not in page
    assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert login_data(response)["redirect"] == evil


@pytest.mark.gen_test
async def test_home_page_fills_in_this_servers_url_escaped(call, base_url):
    response = await call("/")
    page = response.body.decode()
    assert response.code == 200
    assert f'import {{ getProfile }} from "{base_url}/aipipe.js";' in html.unescape(page)
    assert f"{base_url}/login?redirect=${{window.location.href}}" in page
    hostile = await call("/", headers={"Host": 'x"><script>alert(1)</script>'})
    assert "<script>alert(1)" not in hostile.body.decode()


@pytest.mark.gen_test
@pytest.mark.parametrize("path, marker", [("/playground", 'id="chat-form"'), ("/dashboard", 'id="chart"'),
                                          ("/admin", 'id="usage-table"'), ("/", "<h1>AI Pipe</h1>")])
async def test_pages_render_with_csp(call, path, marker):
    response = await call(path)
    assert response.code == 200 and marker in response.body.decode()
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "accounts.google.com" not in csp


def route_rows(page: str) -> list[str]:
    """The data-route of each row of the home page's route list."""
    return re.findall(r'<div data-route="([^"]+)">', page)


def datalist(page: str, route: str) -> dict[str, str]:
    """The playground's model list for a provider route: model -> its price label."""
    block = re.search(rf'<datalist id="models-{route}">(.*?)</datalist>', page, re.S).group(1)
    return dict(re.findall(r'<option value="([^"]+)" label="([^"]+)">', block))


@pytest.mark.gen_test
async def test_home_lists_every_configured_provider_and_route(call):
    page = (await call("/")).body.decode()
    assert route_rows(page) == ["openai", "openrouter", "geminiv1beta", "anthropic", "similarity", "proxy"]
    assert "Anthropic&#39;s Messages API" in page  # what each provider's module says it offers
    said = " ".join(page.split())
    assert ("(<code>/geminiv1beta/</code> also takes <code>x-goog-api-key</code>; "
            "<code>/anthropic/</code> also takes <code>x-api-key</code>)") in said


@pytest.mark.gen_test
@pytest.mark.parametrize("gateway", [{"env": {"ANTHROPIC_API_KEY": "", "OPENAI_API_KEY": ""},
                                      "proxy": {"enabled": False}}], indirect=True)
async def test_home_and_playground_leave_out_what_is_not_configured(gateway, call):
    home = (await call("/")).body.decode()
    assert route_rows(home) == ["openrouter", "geminiv1beta"]  # /similarity needs OpenAI; /proxy is off
    playground = (await call("/playground")).body.decode()
    assert re.findall(r'<option value="([^"]+)" data-format', playground) == ["openrouter", "geminiv1beta"]


@pytest.mark.gen_test
async def test_playground_offers_each_providers_priced_chat_models(call):
    response = await call("/playground")
    page = response.body.decode()
    assert response.code == 200
    assert re.findall(r'<option value="([^"]+)" data-format="([^"]+)" data-start="([^"]+)">', page) == [
        ("openai", "openai", "gpt-4o-mini"), ("openrouter", "openrouter", "openai/gpt-4o-mini"),
        ("geminiv1beta", "gemini", "gemini-2.5-flash"), ("anthropic", "anthropic", "claude-haiku-4-5")]
    openai = datalist(page, "openai")
    assert openai["gpt-4o-mini"] == "$0.15 in, $0.60 out per 1M tokens"
    assert not {"text-embedding-3-small", "whisper-1", "tts-1", "gpt-4o-mini-tts", "dall-e-3", "gpt-image-1",
                "omni-moderation-latest", "gpt-4o-transcribe"} & set(openai)
    gemini = datalist(page, "geminiv1beta")
    assert "gemini-2.5-pro" in gemini and not any("embedding" in m or ">" in m for m in gemini)
    assert datalist(page, "openrouter") == {  # OpenRouter's live list, as the fake lists it
        "openai/gpt-4o-mini": "$0.15 in, $0.60 out per 1M tokens",
        "anthropic/claude-sonnet-4": "$3.00 in, $15.00 out per 1M tokens",
        "meta-llama/llama-3.3-70b-instruct:free": "free"}
    assert "claude-haiku-4-5" in datalist(page, "anthropic")
    assert (await call("/playground", "HEAD")).code == 200


def test_prices_read_the_way_people_write_them():
    assert [per_million(v) for v in (0.15, 2.5, 0.075, 15, 0.0375, 0)] == [
        "$0.15", "$2.50", "$0.075", "$15.00", "$0.0375", "$0.00"]


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/", "/login", "/login?redirect=javascript:x", "/dashboard"])
async def test_head_requests_answer_without_a_body(call, path):
    response = await call(path, "HEAD")
    assert response.code in (200, 400) and response.body == b""
    assert "Content-Security-Policy" in response.headers


@pytest.mark.gen_test
async def test_aipipe_js_is_importable_cross_origin(call):
    response = await call("/aipipe.js", headers={"Origin": "https://app.example.com"})
    assert response.code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Content-Type"].startswith("text/javascript")
    assert b"export function getProfile()" in response.body


@pytest.mark.gen_test
@pytest.mark.parametrize("path, ctype", [("/static/app.js", "text/javascript"), ("/static/app.css", "text/css"),
                                         ("/static/favicon.svg", "image/svg+xml")])
async def test_static_files_carry_cors_and_their_type(call, path, ctype):
    response = await call(path)
    assert response.code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Content-Type"].startswith(ctype)


@pytest.mark.gen_test
async def test_page_errors_are_html_and_api_errors_stay_json(call):
    page = await call("/login", "POST")
    assert page.code == 405 and page.headers["Content-Type"].startswith("text/html")
    api = await call("/usage")
    assert api.code == 401 and "Missing" in orjson.loads(api.body)["message"]
    assert (await call("/static/nope.js")).code == 404


@pytest.mark.gen_test
async def test_a_page_argument_that_is_not_utf8_is_a_400_page_without_it(call, caplog):
    with caplog.at_level(logging.INFO):
        r = await call("/login?redirect=https://app.example/%ff%fe-private")
    assert r.code == 400 and r.headers["Content-Type"].startswith("text/html")
    assert b"Invalid unicode in redirect" in r.body and b"private" not in r.body
    assert "private" not in caplog.text


@pytest.mark.gen_test
async def test_no_answer_names_the_server_software(call):
    for path in ("/login", "/usage", "/aipipe.js", "/static/nope.js", "/nope"):
        r = await call(path)
        assert "Server" not in r.headers, path
