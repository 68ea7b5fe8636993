"""/proxy/<URL>: relays to public targets, streams back with CORS, and never opens a door into private networks."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import orjson
import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from tornado.iostream import StreamClosedError
from tornado.netutil import DefaultLoopResolver, OverrideResolver, Resolver
from tornado.simple_httpclient import HTTPStreamClosedError

from aipipe import netguard

from .conftest import token
from .helpers import message


HOSTILE_PAGE = b"<!doctype html><script>document.title = localStorage.getItem('aipipe')</script>"
HOSTILE_HEADERS = {
    "Content-Type": "text/html", "Content-Security-Policy": "default-src * 'unsafe-inline'",
    "X-Content-Type-Options": "sniff", "Clear-Site-Data": '"*"', "Strict-Transport-Security": "max-age=63072000",
    "Alt-Svc": 'h3=":443"', "NEL": '{"report_to": "t", "max_age": 86400}', "Report-To": '{"group": "t"}',
    "Refresh": "0; url=https://evil.example/", "Service-Worker-Allowed": "/", "X-Target": "kept",
}


class TargetHandler(tornado.web.RequestHandler):
    """An ordinary web server on loopback playing the public site the caller wants."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

    def initialize(self, seen: list, first_chunk_arrived: asyncio.Event) -> None:
        self.seen, self.first_chunk_arrived = seen, first_chunk_arrived

    def prepare(self) -> None:
        self.seen.append({"method": self.request.method, "path": self.request.path, "query": self.request.query,
                          "headers": {k.lower(): v for k, v in self.request.headers.get_all()}, "body": self.request.body})

    async def any(self, what: str) -> None:
        n = int(self.get_query_argument("n", "0"))
        if what == "echo":
            self.set_header("Content-Type", "application/json")
            self.finish(orjson.dumps(self.seen[-1] | {"body": self.request.body.decode()}))
        elif what == "cookie":
            self.set_header("Set-Cookie", "session=stolen; Path=/")
            self.set_header("Access-Control-Allow-Origin", "https://evil.example")
            self.set_header("X-Target", "yes")
            self.finish("cookie jar")
        elif what == "sized":  # with Content-Length
            self.finish(b"x" * n)
        elif what == "drip":  # chunked, one flush per 1000 bytes, a pause after the first
            try:
                for i in range(0, n, 1000):
                    self.write(b"y" * min(1000, n - i))
                    await self.flush()
                    await asyncio.sleep(0.3 if i == 0 else 0.001)
                self.finish()
            except StreamClosedError:
                pass  # the proxy hung up on us (max_bytes)
        elif what == "held":  # chunked: one chunk, then the rest only once the caller says the first chunk arrived
            self.seen[-1]["chunks_sent"] = 1
            self.write(b"y" * 1000)
            await self.flush()
            try:  # a hang guard: a relay that holds the first chunk back gets the rest after this, and the test fails
                await asyncio.wait_for(self.first_chunk_arrived.wait(), 15)
            except asyncio.TimeoutError:
                pass
            self.seen[-1]["chunks_sent"] = 2
            self.finish(b"y" * 2000)
        elif what == "slow":
            await asyncio.sleep(float(self.get_query_argument("s")))
            self.finish("late")
        elif what == "redirect":
            self.redirect(self.get_query_argument("to"), status=int(self.get_query_argument("code", "302")))
        elif what == "missing":
            self.set_status(404)
            self.finish("no such page")
        elif what == "hostile":  # a page that would loosen the policy of the origin serving it
            for name, value in HOSTILE_HEADERS.items():
                self.set_header(name, value)
            self.finish(HOSTILE_PAGE)
        elif what in ("spaced", "accented"):  # Location headers as some servers send them, unencoded
            self.set_status(302)
            self.set_header("Location", "/echo?q=a b" if what == "spaced" else "/echo?q=\u00e9")
            self.finish()
        elif what == "untyped":
            self.clear_header("Content-Type")
            self.finish(HOSTILE_PAGE)

    get = head = post = put = patch = delete = any


class Target:
    def __init__(self, port: int, seen: list, first_chunk_arrived: asyncio.Event):
        self.port, self.seen, self.first_chunk_arrived = port, seen, first_chunk_arrived
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
def target(io_loop):
    seen: list = []
    first_chunk_arrived = asyncio.Event()
    handler_args = {"seen": seen, "first_chunk_arrived": first_chunk_arrived}
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/(\w+)", TargetHandler, handler_args)]))
    server.add_sockets([sock])
    yield Target(port, seen, first_chunk_arrived)
    server.stop()


@pytest.fixture
def gateway(io_loop, make_gateway):
    """Most tests talk to the loopback target, so the default app here allows private targets."""
    return io_loop.run_sync(lambda: make_gateway(proxy={"allow_private": True}))


@pytest.fixture
def guarded(io_loop, make_gateway, serve):
    """Base URL of a server with the default, guarded /proxy."""
    return serve(io_loop.run_sync(make_gateway))


@pytest.fixture
def names(monkeypatch):
    """Host names the proxy resolves as the test says (a local resolver override, no DNS)."""
    mapping: dict = {}
    monkeypatch.setattr(netguard, "system_resolver", lambda: OverrideResolver(resolver=DefaultLoopResolver(), mapping=mapping))
    return mapping


@pytest.fixture
def loopback_is_public(monkeypatch):
    """Let 127.0.0.1 pass the guard, so the loopback target can play a public site that redirects."""
    real = netguard.blocked_reason
    monkeypatch.setattr(netguard, "blocked_reason", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))


@pytest.mark.gen_test
async def test_get_is_relayed_with_cors_and_x_proxy_url(call, target):
    url = f"{target.url}/echo?a=1&b=two"
    r = await call("/proxy/" + url)
    assert r.code == 200
    seen = orjson.loads(r.body)
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/echo", "a=1&b=two")
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["X-Proxy-URL"] == url
    assert "X-Proxy-URL" in r.headers["Access-Control-Expose-Headers"]


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_any_method_and_its_body_are_forwarded(call, target, method):
    r = await call(f"/proxy/{target.url}/echo", method, body=b"payload \xe2\x9c\x93", headers={"Content-Type": "text/plain"})
    assert r.code == 200
    seen = target.seen[-1]
    assert (seen["method"], seen["body"], seen["headers"]["content-type"]) == (method, b"payload \xe2\x9c\x93", "text/plain")


@pytest.mark.gen_test
async def test_head_is_forwarded(call, target):
    r = await call(f"/proxy/{target.url}/sized?n=10", "HEAD")
    assert r.code == 200 and r.body == b"" and target.seen[-1]["method"] == "HEAD"


@pytest.mark.gen_test
async def test_percent_encoded_target_is_accepted(call, target):
    r = await call(f"/proxy/http%3A%2F%2F127.0.0.1%3A{target.port}%2Fecho%3Fq%3D1")
    assert r.code == 200 and target.seen[-1]["query"] == "q=1"


@pytest.mark.gen_test
async def test_credentials_and_hop_by_hop_headers_never_reach_the_target(call, target):
    t = token("me@example.com")
    headers = {"Cookie": "aipipe=secret", "x-goog-api-key": "AIza-secret", "x-api-key": t,
               "Proxy-Authorization": "Basic eA==",
               "Connection": "X-Private-Hop", "X-Private-Hop": "1", "TE": "trailers", "X-Wanted": "kept",
               "Accept": "text/html"}
    r = await call(f"/proxy/{target.url}/echo", token=t, headers=headers)
    assert r.code == 200
    got = target.seen[-1]["headers"]
    for name in ("authorization", "cookie", "x-goog-api-key", "x-api-key", "proxy-authorization", "x-private-hop",
                 "te"):
        assert name not in got
    assert got["x-wanted"] == "kept" and got["accept"] == "text/html"
    assert t not in repr(got)


@pytest.mark.gen_test
async def test_target_cookies_and_cors_policy_are_not_relayed(call, target):
    r = await call(f"/proxy/{target.url}/cookie")
    assert r.code == 200 and r.body == b"cookie jar" and r.headers["X-Target"] == "yes"
    assert "Set-Cookie" not in r.headers
    assert r.headers.get_list("Access-Control-Allow-Origin") == ["*"]


def assert_sandboxed(r) -> None:
    """The answer can run no script on our origin, and is never sniffed into a type it does not declare."""
    assert r.headers.get_list("Content-Security-Policy") == ["sandbox; default-src 'none'; base-uri 'none'; form-action 'none'"]
    assert r.headers.get_list("X-Content-Type-Options") == ["nosniff"]


@pytest.mark.gen_test
async def test_proxied_page_is_sandboxed_and_cannot_loosen_our_origin_policy(call, target):
    r = await call(f"/proxy/{target.url}/hostile")
    assert r.code == 200 and r.body == HOSTILE_PAGE and r.headers["Content-Type"] == "text/html"
    assert_sandboxed(r)
    for name in HOSTILE_HEADERS.keys() - {"Content-Type", "X-Target", "Content-Security-Policy", "X-Content-Type-Options"}:
        assert name not in r.headers, name
    assert r.headers["X-Target"] == "kept"


@pytest.mark.gen_test
async def test_untyped_answer_is_not_labelled_html(call, target):
    r = await call(f"/proxy/{target.url}/untyped")
    assert r.code == 200 and r.body == HOSTILE_PAGE
    assert "Content-Type" not in r.headers
    assert_sandboxed(r)


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["ftp://example.com/", "http://127.0.0.1:99999999/", "http%3A%2F%2Fa%2F%0d%0aX%3A1"])
async def test_error_answers_are_sandboxed_too(call, path):
    r = await call("/proxy/" + path)
    assert r.code == 400 and r.headers["Content-Type"] == "application/json"
    assert_sandboxed(r)


@pytest.mark.gen_test
async def test_blocked_target_answer_is_sandboxed(call, guarded):
    r = await call(f"{guarded}/proxy/http://127.0.0.1/")
    assert r.code == 403
    assert_sandboxed(r)


@pytest.mark.gen_test
@pytest.mark.parametrize("encoded", ["%0d%0aX-Evil%3A%201", "%0aX", "%0d", "%20HTTP/1.0", "%09", "%00", "%7f"])
async def test_decoded_control_characters_and_spaces_are_400(call, target, encoded):
    r = await call(f"/proxy/http%3A%2F%2F127.0.0.1%3A{target.port}%2Fecho{encoded}")
    assert r.code == 400 and message(r) == "URL must not contain spaces or control characters"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert target.seen == []


@pytest.mark.gen_test
async def test_decoded_non_ascii_is_sent_percent_encoded(call, target):
    r = await call(f"/proxy/http%3A%2F%2F127.0.0.1%3A{target.port}%2Fecho%3Fq%3D%E2%9C%93")
    assert r.code == 200 and target.seen[-1]["query"] == "q=%E2%9C%93"
    assert r.headers["X-Proxy-URL"] == f"http://127.0.0.1:{target.port}/echo?q=%E2%9C%93"


@pytest.mark.gen_test
async def test_redirect_to_a_location_with_a_space_is_502_and_non_ascii_is_encoded(call, target):
    r = await call(f"/proxy/{target.url}/spaced")
    assert r.code == 502 and message(r) == "Target redirected to a URL with spaces or control characters"
    assert [s["path"] for s in target.seen] == ["/spaced"]
    r = await call(f"/proxy/{target.url}/accented")
    assert r.code == 200 and target.seen[-1]["query"] == "q=%E9"  # the byte Tornado sent é as (Latin-1)


@pytest.mark.gen_test
async def test_target_errors_pass_through_as_they_are(call, target):
    r = await call(f"/proxy/{target.url}/missing")
    assert r.code == 404 and r.body == b"no such page"


@pytest.mark.gen_test
async def test_answer_is_streamed_as_it_arrives(call, target):
    sent_when_received: list[int] = []  # for each chunk the caller got, how many the target had sent by then

    def received(chunk: bytes) -> None:
        sent_when_received.append(target.seen[-1]["chunks_sent"])
        target.first_chunk_arrived.set()  # only now does the target send the rest

    r = await call(f"/proxy/{target.url}/held", streaming_callback=received)
    assert r.code == 200
    assert sent_when_received[0] == 1  # the first bytes reached the caller before the target sent the rest
    assert sent_when_received[-1] == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["ftp://example.com/file", "example.com/page", "", "javascript:alert(1)", "file:///etc/passwd"])
async def test_url_must_begin_with_http(call, path):
    r = await call("/proxy/" + path)
    assert r.code == 400 and message(r) == "URL must begin with http"
    assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.gen_test
async def test_bad_port_is_400(call):
    r = await call("/proxy/http://127.0.0.1:99999999/")
    assert r.code == 400 and message(r) == "URL has an invalid port"


@pytest.mark.gen_test
async def test_redirects_are_followed_up_to_five_hops(call, target):
    url = f"{target.url}/echo?end=1"
    for _ in range(5):
        url = f"{target.url}/redirect?to={tornado.escape.url_escape(url)}"
    r = await call("/proxy/" + url)
    assert r.code == 200 and orjson.loads(r.body)["query"] == "end=1"
    r = await call("/proxy/" + f"{target.url}/redirect?to={tornado.escape.url_escape(url)}")
    assert r.code == 502 and message(r) == "Too many redirects (more than 5)"


@pytest.mark.gen_test
async def test_303_turns_post_into_get_and_307_keeps_it(call, target):
    echo = tornado.escape.url_escape(f"{target.url}/echo")
    r = await call(f"/proxy/{target.url}/redirect?code=303&to={echo}", "POST", body=b"form")
    assert orjson.loads(r.body)["method"] == "GET" and target.seen[-1]["body"] == b""
    r = await call(f"/proxy/{target.url}/redirect?code=307&to={echo}", "POST", body=b"form")
    assert orjson.loads(r.body)["method"] == "POST" and target.seen[-1]["body"] == b"form"


@pytest.mark.gen_test
async def test_redirect_to_a_relative_location_stays_on_the_target(call, target):
    r = await call(f"/proxy/{target.url}/redirect?to=/echo%3Fx%3D2")
    assert r.code == 200 and orjson.loads(r.body)["query"] == "x=2"


BLOCKED_LITERALS = [
    ("127.0.0.1", "127.0.0.1", "loopback"),
    ("10.0.0.1", "10.0.0.1", "private"),
    ("172.16.5.4", "172.16.5.4", "private"),
    ("192.168.1.1", "192.168.1.1", "private"),
    ("169.254.169.254", "169.254.169.254", "link-local"),
    ("100.64.0.1", "100.64.0.1", "carrier-grade NAT"),
    ("224.0.0.1", "224.0.0.1", "multicast"),
    ("240.0.0.1", "240.0.0.1", "reserved"),
    ("0.0.0.0", "0.0.0.0", "unspecified"),
    ("[::1]", "::1", "loopback"),
    ("[::]", "::", "unspecified"),
    ("[fe80::1]", "fe80::1", "link-local"),
    ("[fc00::1]", "fc00::1", "private"),
    ("[fd12:3456::1]", "fd12:3456::1", "private"),
    ("[ff02::1]", "ff02::1", "multicast"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1", "loopback"),
    ("[::ffff:169.254.169.254]", "::ffff:a9fe:a9fe", "link-local"),
    ("[::ffff:10.0.0.1]", "::ffff:a00:1", "private"),
    ("[64:ff9b::a00:1]", "64:ff9b::a00:1", "private"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("host,ip,reason", BLOCKED_LITERALS)
async def test_blocked_ranges_by_literal_address_are_403(call, guarded, host, ip, reason):
    r = await call(f"{guarded}/proxy/http://{host}:8080/x")
    assert r.code == 403
    assert message(r) == f"Refusing to proxy: {ip} is a {reason} address"
    assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.gen_test
@pytest.mark.parametrize("host,ip,reason", [
    ("127.1", "127.0.0.1", "loopback"),  # short and decimal spellings resolve to loopback too
    ("2130706433", "127.0.0.1", "loopback"),
])
async def test_odd_spellings_of_loopback_are_403(call, guarded, host, ip, reason):
    r = await call(f"{guarded}/proxy/http://{host}/")
    assert r.code == 403 and message(r) == f"Refusing to proxy: {host} resolves to {ip}, which is a {reason} address"


@pytest.mark.gen_test
@pytest.mark.parametrize("ip,reason", [
    ("127.0.0.5", "loopback"), ("10.20.30.40", "private"), ("172.31.255.1", "private"), ("192.168.0.10", "private"),
    ("169.254.169.254", "link-local"), ("100.127.0.1", "carrier-grade NAT"), ("239.1.2.3", "multicast"),
    ("250.0.0.1", "reserved"), ("0.0.0.0", "unspecified"), ("::1", "loopback"), ("fe80::abcd", "link-local"),
    ("fd00:ec2::254", "private"), ("ff05::2", "multicast"), ("::ffff:192.168.0.1", "private"),
])
async def test_blocked_ranges_by_host_name_are_403(call, guarded, names, ip, reason):
    names["inside.test"] = ip
    r = await call(f"{guarded}/proxy/http://inside.test/")
    assert r.code == 403
    shown = str(ipaddress.ip_address(ip))
    assert message(r) == f"Refusing to proxy: inside.test resolves to {shown}, which is a {reason} address"


@pytest.mark.gen_test
async def test_guard_refuses_before_connecting(call, guarded, target):
    r = await call(f"{guarded}/proxy/{target.url}/echo")
    assert r.code == 403 and "loopback" in message(r)
    assert target.seen == []  # the live server on loopback was never contacted


@pytest.mark.gen_test
async def test_allow_private_lets_the_proxy_reach_the_local_network(call, guarded, target):
    assert (await call(f"{guarded}/proxy/{target.url}/echo")).code == 403
    assert (await call(f"/proxy/{target.url}/echo")).code == 200  # this app has allow_private = true


@pytest.mark.gen_test
@pytest.mark.parametrize("location", ["http://10.0.0.1/admin", "http://internal.test:{port}/echo",
                                      "http://[::1]:{port}/echo", "http://169.254.169.254/latest/meta-data/"])
async def test_redirect_to_a_private_address_is_refused(call, guarded, target, names, loopback_is_public, location):
    names["public.test"] = "127.0.0.1"
    names["internal.test"] = "192.168.1.20"
    to = tornado.escape.url_escape(location.format(port=target.port))
    r = await call(f"{guarded}/proxy/http://public.test:{target.port}/redirect?to={to}")
    assert r.code == 403 and message(r).startswith("Refusing to proxy: ")
    assert [s["path"] for s in target.seen] == ["/redirect"]  # the first hop was fine, the second never left


class Rebinding(Resolver):
    """DNS that answers a public address first and a private one after: the rebinding trick."""

    def initialize(self, answers: list[str]) -> None:
        self.answers, self.calls = answers, 0

    async def resolve(self, host, port, family=socket.AF_UNSPEC):
        ip = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [(socket.AF_INET, (ip, port))]


@pytest.mark.gen_test
async def test_the_checked_address_is_the_connected_address(call, guarded, target, monkeypatch, loopback_is_public):
    dns = Rebinding(answers=["127.0.0.1", "10.9.9.9"])
    monkeypatch.setattr(netguard, "system_resolver", lambda: dns)
    r = await call(f"{guarded}/proxy/http://rebind.test:{target.port}/echo")
    assert r.code == 200 and dns.calls == 1  # one lookup: no second answer to swap in between check and connect
    dns.answers = ["10.9.9.9"]
    r = await call(f"{guarded}/proxy/http://rebind.test:{target.port}/echo")
    assert r.code == 403 and "10.9.9.9" in message(r)


@pytest.mark.gen_test
async def test_max_bytes_caps_the_answer(make_gateway, serve, call, target):
    url = serve(await make_gateway(proxy={"allow_private": True, "max_bytes": 2500}))
    r = await call(f"{url}/proxy/{target.url}/sized?n=2500")
    assert r.code == 200 and len(r.body) == 2500
    r = await call(f"{url}/proxy/{target.url}/sized?n=2501")  # Content-Length says so up front
    assert r.code == 502 and message(r) == "Response larger than 2500 bytes"
    r = await call(f"{url}/proxy/{target.url}/sized?n=9999", "HEAD")  # a HEAD answer carries no body to cap
    assert r.code == 200
    with pytest.raises(HTTPStreamClosedError):  # found out mid-stream: the caller sees the answer cut short
        await call(f"{url}/proxy/{target.url}/drip?n=5000")


@pytest.mark.gen_test
async def test_chunked_answer_over_the_cap_before_anything_was_sent_is_502(make_gateway, serve, call, target):
    url = serve(await make_gateway(proxy={"allow_private": True, "max_bytes": 500}))
    r = await call(f"{url}/proxy/{target.url}/drip?n=3000")  # first chunk alone (1000 bytes) is over
    assert r.code == 502 and message(r) == "Response larger than 500 bytes"


@pytest.mark.gen_test
async def test_slow_target_is_504(make_gateway, serve, call, target):
    url = serve(await make_gateway(proxy={"allow_private": True, "timeout": 0.3}))
    started = time.monotonic()
    r = await call(f"{url}/proxy/{target.url}/slow?s=10")
    assert r.code == 504 and message(r) == "127.0.0.1 did not answer within 0.3 s"
    assert time.monotonic() - started < 10  # answered without waiting for the target


@pytest.mark.gen_test
async def test_unreachable_target_is_502_with_the_reason(call):
    sock, port = tornado.testing.bind_unused_port()
    sock.close()  # nothing listens there now
    r = await call(f"/proxy/http://127.0.0.1:{port}/")
    assert r.code == 502 and message(r).startswith("Could not reach 127.0.0.1: ") and "refused" in message(r).lower()


@pytest.mark.gen_test
async def test_disabled_route_is_404(make_gateway, serve, call, target):
    url = serve(await make_gateway(proxy={"enabled": False, "allow_private": True}))
    r = await call(f"{url}/proxy/{target.url}/echo")
    assert r.code == 404 and message(r) == "/proxy is turned off on this server"
    assert target.seen == []


@pytest.mark.gen_test
async def test_require_token_demands_an_ai_pipe_token(make_gateway, serve, call, target):
    url = serve(await make_gateway(proxy={"require_token": True, "allow_private": True}))
    r = await call(f"{url}/proxy/{target.url}/echo")
    assert r.code == 401 and message(r) == "Missing Authorization: Bearer token"
    r = await call(f"{url}/proxy/{target.url}/echo", headers={"Authorization": "Bearer sk-user-native-key"})
    assert r.code == 401
    assert target.seen == []
    r = await call(f"{url}/proxy/{target.url}/echo", token=token("me@example.com"))
    assert r.code == 200 and "authorization" not in target.seen[-1]["headers"]


@pytest.mark.gen_test
async def test_preflight_is_answered_here(call, target):
    r = await call(f"/proxy/{target.url}/echo", "OPTIONS", headers={"Access-Control-Request-Headers": "X-Custom"})
    assert r.code == 200 and r.headers["Access-Control-Allow-Headers"] == "X-Custom"
    assert target.seen == []


@pytest.mark.parametrize("address,reason", [
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("192.0.2.7", "private"), ("2001:db8::1", "private"), ("2002:c0a8:101::", "private"),
    ("::7f00:1", "reserved"), ("255.255.255.255", "reserved"), ("fe80::1%eth0", "link-local"),
])
def test_blocked_reason_table(address, reason):
    assert netguard.blocked_reason(ipaddress.ip_address(address)) == reason
