"""/token: a Google Sign-In credential in, an AI Pipe token out."""
from __future__ import annotations

import logging
import re
import time
from typing import Any

import google.auth.exceptions
import google.auth.transport
import jwt as pyjwt
import orjson
from google.oauth2 import id_token

from ..auth import mint_token
from ..errors import ApiError
from ..singleflight import SingleFlight
from ..upstream import describe, header
from .base import ApiHandler

log = logging.getLogger("aipipe.token")
ISSUERS = ("accounts.google.com", "https://accounts.google.com")
CLOCK_SKEW = 10  # seconds of clock difference tolerated on iat/exp
REFETCH_SECONDS = 60.0  # least time between refetches when a credential names an unknown key
DEFAULT_MAX_AGE, LONGEST_MAX_AGE = 3600.0, 86400.0
# google-auth's messages (some include the credential itself) mapped to reasons that are safe to show
REASONS = (
    ("expired", "Google credential has expired: sign in again"),
    ("too early", "Google credential is not valid yet: check the computer's clock"),
    ("audience", "Google credential was issued for a different client id"),
    ("signature", "Google credential signature could not be verified"),
    ("key id", "Google credential was signed by an unknown key"),
)


class _Answer:
    """The shape google-auth expects from a transport response."""

    def __init__(self, data: bytes):
        self.status, self.headers, self.data = 200, {}, data


class _Prefetched(google.auth.transport.Request):
    """A google-auth transport that answers from certificates already fetched asynchronously."""

    def __init__(self, data: bytes):
        self.data = data

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        return _Answer(self.data)


class GoogleCerts:
    """Google's signing certificates, fetched without blocking and kept for their Cache-Control max-age."""

    def __init__(self, url: str, http):
        self.url, self.http = url, http
        self.data: bytes | None = None
        self.expires = self.fetched = float("-inf")
        self._refresh = SingleFlight(self._fetch)  # one fetch serves every sign-in waiting on it

    async def get(self, refresh: bool = False) -> bytes:
        """The certificates JSON; refresh=True refetches unless that happened within the last minute."""
        now = time.monotonic()
        if self.data is None or now > self.expires or (refresh and now - self.fetched > REFETCH_SECONDS):
            await self._refresh.run()
        if self.data is None:
            raise ApiError(503, "Could not fetch Google's signing keys, try again shortly")
        return self.data

    async def _fetch(self) -> None:
        self.fetched = time.monotonic()
        try:
            answer = await self.http.fetch("GET", self.url, timeout=10)
            if isinstance(answer, BaseException):
                raise RuntimeError(describe(answer))
            if answer.status != 200:
                raise RuntimeError(f"answered {answer.status}")
            orjson.loads(answer.body)
        except Exception as e:
            log.warning("could not fetch Google certificates from %s: %s", self.url, e)
            return
        match = re.search(r"max-age=(\d+)", header(answer.headers, "cache-control"))
        max_age = min(float(match.group(1)), LONGEST_MAX_AGE) if match else DEFAULT_MAX_AGE
        self.data, self.expires = answer.body, time.monotonic() + max_age


def reason_for(error: Exception) -> str:
    """A short, credential-free reason for a google-auth verification failure."""
    text = str(error).lower()
    for needle, reason in REASONS:
        if needle in text:
            return reason
    return "Google credential is malformed or invalid"


class TokenHandler(ApiHandler):
    """GET /token?credential=... or POST /token with {"credential": ...} (JSON or form)."""

    route_class = "token"  # for metrics

    def initialize(self, gateway, certs: GoogleCerts) -> None:
        super().initialize(gateway)
        self.certs = certs

    async def get(self) -> None:
        await self._exchange(self.get_query_argument("credential", ""))

    async def post(self) -> None:
        if "json" in self.request.headers.get("Content-Type", ""):
            credential = self.json_body().get("credential", "")
        else:
            credential = self.get_body_argument("credential", "")
        await self._exchange(credential)

    async def _exchange(self, credential: Any) -> None:
        if not isinstance(credential, str) or not credential.strip():
            raise ApiError(401, "Missing credential: sign in with Google and send its credential")
        config = self.gw.config
        client_id = config.get("auth.google_client_id")
        if not client_id or not config.secret:
            raise ApiError(503, "Google sign-in is not configured on this server")
        claims = await self._verify(credential.strip(), client_id)
        if claims.get("iss") not in ISSUERS:
            raise ApiError(401, "Google credential was not issued by Google")
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise ApiError(401, "Google credential carries no email")
        if claims.get("email_verified") not in (True, "true"):
            raise ApiError(401, "Google account email is not verified")
        email = email.strip().lower()
        hd = claims.get("hd")
        log.info("signed in with Google: %s%s", email, f" (Workspace domain {hd})" if hd else "")
        body = {"token": mint_token(email, config.secret, config.salt_for(email)), "email": email,
                "name": claims.get("name"), "picture": claims.get("picture")}
        if hd:
            body["hd"] = hd
        self.send_json(body)

    async def _verify(self, credential: str, client_id: str, refresh: bool = False) -> dict:
        certs = await self.certs.get(refresh=refresh)
        try:
            return id_token.verify_token(credential, _Prefetched(certs), audience=client_id,
                                         certs_url=self.certs.url, clock_skew_in_seconds=CLOCK_SKEW)
        except (ValueError, google.auth.exceptions.GoogleAuthError, pyjwt.PyJWTError) as e:
            if not refresh and "key id" in str(e).lower():
                return await self._verify(credential, client_id, refresh=True)  # Google rotates its keys
            raise ApiError(401, reason_for(e)) from None
        except Exception as e:  # whatever else a hostile credential trips is still the credential's fault
            log.warning("unexpected error verifying a Google credential: %s", type(e).__name__)
            raise ApiError(401, "Google credential is malformed or invalid") from None


def token_routes(gateway) -> list:
    """The /token route with its certificate cache."""
    certs = GoogleCerts(gateway.config.get("auth.google_certs_url"), gateway.upstream)
    return [(r"/token/?", TokenHandler, {"gateway": gateway, "certs": certs})]
