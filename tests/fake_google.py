"""A stand-in for Google Sign-In: a test RSA key signs ID tokens, and its certificate is served like Google's v1 certs."""
from __future__ import annotations

import datetime
import time
from functools import lru_cache

import jwt
import orjson
import tornado.web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

CLIENT_ID = "1234567890-test.apps.googleusercontent.com"
KID = "test-key-1"


@lru_cache(maxsize=None)
def signing_key(name: str = "google"):
    """An RSA private key (one per name, made once per test run)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def certificate_pem(key) -> str:
    """A self-signed X.509 certificate for key, PEM encoded: the format of googleapis.com/oauth2/v1/certs."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-google")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def credential(email: str = "user@example.com", *, key=None, kid: str = KID, **claims) -> str:
    """A Google ID token as Sign-In would hand the page; claims override the defaults (None removes one)."""
    now = int(time.time())
    payload = {"iss": "https://accounts.google.com", "azp": CLIENT_ID, "aud": CLIENT_ID, "sub": "1078",
               "email": email, "email_verified": True, "name": "Test User", "picture": "https://example.com/p.png",
               "iat": now, "exp": now + 3600}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key or signing_key(), algorithm="RS256", headers={"kid": kid})


class CertsHandler(tornado.web.RequestHandler):
    """GET: {kid: certificate PEM}, counting fetches; state["down"] answers 500."""

    def initialize(self, state: dict) -> None:
        self.state = state

    def get(self) -> None:
        self.state["fetches"] += 1
        if self.state.get("down"):
            self.set_status(500)
            self.finish("certificate service down")
            return
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "public, max-age=19000, must-revalidate, no-transform")
        self.finish(orjson.dumps({KID: certificate_pem(signing_key())}))


def make_certs_app(state: dict) -> tornado.web.Application:
    """An app serving /oauth2/v1/certs."""
    return tornado.web.Application([(r"/oauth2/v1/certs", CertsHandler, {"state": state})])
