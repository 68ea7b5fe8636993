"""/token: Google Sign-In credentials (signed by a test key, verified by google-auth) become AI Pipe tokens."""
from __future__ import annotations

import logging
import time
from urllib.parse import urlencode

import jwt
import orjson
import pytest
import tornado.httpserver
import tornado.testing

from aipipe.server import make_app

from .conftest import SECRET
from .fake_google import CLIENT_ID, credential, make_certs_app, signing_key


@pytest.fixture
def google(io_loop):
    """A loopback certificate endpoint standing in for https://www.googleapis.com/oauth2/v1/certs."""
    state = {"fetches": 0}
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(make_certs_app(state))
    server.add_sockets([sock])
    state["url"] = f"http://127.0.0.1:{port}/oauth2/v1/certs"
    yield state
    server.stop()


@pytest.fixture
def gateway(io_loop, make_gateway, google):
    return io_loop.run_sync(lambda: make_gateway(auth={"google_client_id": CLIENT_ID, "google_certs_url": google["url"]}))


def body(response) -> dict:
    return orjson.loads(response.body)


async def post_credential(call, cred):
    return await call("/token", "POST", json={"credential": cred})


def assert_refused(response, *words):
    assert response.code == 401, response.body
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    message = body(response)["message"]
    for word in words:
        assert word in message.lower()
    return message


@pytest.mark.gen_test
async def test_signed_in_user_gets_a_working_token_with_profile(call):
    response = await post_credential(call, credential("Ada@Example.com", name="Ada", picture="https://x/ada.png"))
    assert response.code == 200, response.body
    data = body(response)
    assert (data["email"], data["name"], data["picture"]) == ("ada@example.com", "Ada", "https://x/ada.png")
    assert "hd" not in data
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    usage = await call("/usage", token=data["token"])
    assert usage.code == 200 and body(usage)["email"] == "ada@example.com"


@pytest.mark.gen_test
async def test_get_with_credential_in_query_works_like_the_original(call):
    response = await call("/token?" + urlencode({"credential": credential("get@example.com")}))
    assert response.code == 200
    assert jwt.decode(body(response)["token"], SECRET, algorithms=["HS256"])["email"] == "get@example.com"


@pytest.mark.gen_test
async def test_a_failure_on_a_credential_in_the_query_logs_the_path_without_it(call, monkeypatch, caplog):
    async def broken(self, credential):
        raise RuntimeError("bug while exchanging")

    cred = credential("query@example.com")
    monkeypatch.setattr("aipipe.handlers.token.TokenHandler._exchange", broken)
    with caplog.at_level(logging.WARNING):
        response = await call("/token?" + urlencode({"credential": cred}))
    assert response.code == 500 and body(response) == {"message": "Internal server error"}
    logged = [rec for rec in caplog.records if rec.exc_info and rec.exc_info[0] is RuntimeError]
    assert logged and "GET /token (" in logged[0].getMessage()
    assert cred[:40] not in caplog.text


@pytest.mark.gen_test
async def test_a_credential_that_is_not_utf8_is_400_without_being_quoted(call, caplog):
    with caplog.at_level(logging.INFO):
        response = await call("/token?credential=eyJhbGciOi%ff%fe-not-utf8")
    assert response.code == 400 and body(response) == {"message": "Invalid unicode in credential"}
    assert "eyJhbGciOi" not in caplog.text


@pytest.mark.gen_test
async def test_post_as_form_like_google_redirect_mode(call):
    form = urlencode({"credential": credential("form@example.com"), "g_csrf_token": "x"})
    response = await call("/token", "POST", body=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.code == 200 and body(response)["email"] == "form@example.com"


@pytest.mark.gen_test
async def test_salted_email_gets_salt_in_token_and_it_is_accepted(call):
    data = body(await post_credential(call, credential("salted@example.com")))
    assert jwt.decode(data["token"], SECRET, algorithms=["HS256"])["salt"] == "pepper-1"
    assert (await call("/usage", token=data["token"])).code == 200


@pytest.mark.gen_test
async def test_workspace_domain_is_reported(call):
    data = body(await post_credential(call, credential("t@school.edu", hd="school.edu")))
    assert data["hd"] == "school.edu"


@pytest.mark.gen_test
@pytest.mark.parametrize("request_body", [{}, {"credential": ""}, {"credential": 42}])
async def test_missing_credential_is_401(call, request_body):
    assert_refused(await call("/token", "POST", json=request_body), "credential")


@pytest.mark.gen_test
async def test_get_without_credential_is_401(call):
    assert_refused(await call("/token"), "missing credential")


@pytest.mark.gen_test
@pytest.mark.parametrize("cred", ["not-a-jwt", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.e30.AAAA", "x" * 5000])
async def test_malformed_credential_is_401_never_500(call, cred):
    message = assert_refused(await post_credential(call, cred), "google credential")
    assert cred[:20] not in message


@pytest.mark.gen_test
async def test_wrong_audience_is_401(call):
    assert_refused(await post_credential(call, credential(aud="someone-else.apps.googleusercontent.com")),
                   "different client")


@pytest.mark.gen_test
@pytest.mark.parametrize("issuer", ["https://evil.example.com", None])
async def test_wrong_issuer_is_401(call, issuer):
    assert_refused(await post_credential(call, credential(iss=issuer)), "not issued by google")


@pytest.mark.gen_test
async def test_google_issuer_without_scheme_is_accepted(call):
    assert (await post_credential(call, credential(iss="accounts.google.com"))).code == 200


@pytest.mark.gen_test
async def test_expired_credential_is_401(call):
    now = int(time.time())
    assert_refused(await post_credential(call, credential(iat=now - 7200, exp=now - 3600)), "expired")


@pytest.mark.gen_test
@pytest.mark.parametrize("verified", [False, "false", None])
async def test_unverified_email_is_401(call, verified):
    assert_refused(await post_credential(call, credential(email_verified=verified)), "not verified")


@pytest.mark.gen_test
async def test_credential_signed_by_another_key_is_401(call):
    forged = credential("admin@example.com", key=signing_key("attacker"))
    assert_refused(await post_credential(call, forged), "signature")


@pytest.mark.gen_test
async def test_unknown_key_id_is_401_after_one_refetch(call, google):
    assert (await post_credential(call, credential())).code == 200
    fetched = google["fetches"]
    assert_refused(await post_credential(call, credential(kid="rotated-away")), "unknown key")
    assert google["fetches"] == fetched  # a refetch was done less than a minute ago: not again


@pytest.mark.gen_test
async def test_certificates_are_fetched_once_and_cached(call, google):
    for i in range(3):
        assert (await post_credential(call, credential(f"u{i}@example.com"))).code == 200
    assert google["fetches"] == 1


@pytest.mark.gen_test
async def test_google_keys_unreachable_is_503_not_500(call, google):
    google["down"] = True
    response = await post_credential(call, credential())
    assert response.code == 503
    assert "signing keys" in body(response)["message"]


@pytest.mark.gen_test
async def test_server_without_google_client_id_says_so(make_gateway, http_client):
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(make_app(await make_gateway(auth={"google_client_id": ""})))
    server.add_sockets([sock])
    try:
        response = await http_client.fetch(f"http://127.0.0.1:{port}/token", method="POST", raise_error=False,
                                           headers={"Content-Type": "application/json"},
                                           body=orjson.dumps({"credential": credential()}))
    finally:
        server.stop()
    assert response.code == 503
    assert "not configured" in body(response)["message"]


@pytest.mark.gen_test
async def test_preflight_allows_cross_origin_post(call):
    response = await call("/token", "OPTIONS", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "content-type"})
    assert response.code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
