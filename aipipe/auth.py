"""AI Pipe tokens: HS256 JWTs carrying an email (and optionally a salt), and where requests carry them."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Mapping

import jwt

NATIVE_KEY_PREFIXES = ("sk-", "AIza")
NATIVE_KEY = re.compile(r"(?:sk-|AIza)[A-Za-z0-9_-]+")  # what provider keys are made of
MIN_SECRET_BYTES = 16


class AuthError(Exception):
    """A token problem; the message is safe to show (it never contains the token)."""


@dataclass(slots=True)  # made for every request: a frozen dataclass is several times slower to build
class Identity:
    """Who is calling: an AI Pipe user by email, or a native provider key passed through."""

    email: str | None
    native_key: str | None = None

    @property
    def is_native(self) -> bool:
        return self.native_key is not None


def token_from_headers(headers: Mapping[str, str], names: tuple[str, ...] = ("Authorization",)) -> str:
    """The token from the first of the headers `names` that has one: `Authorization: Bearer t` (any case), a bare
    `Authorization: t`, or a key header such as `x-api-key: t` (each provider names its own: providers.base)."""
    for name in names:
        value = (headers.get(name) or "").strip()
        if value[:7].lower() == "bearer ":
            value = value[7:].strip()
        elif value.lower() == "bearer":
            value = ""
        if value:
            return value
    return ""


def is_native_key(token: str) -> bool:
    """True for provider keys such as sk-... (OpenAI, OpenRouter, Anthropic) or AIza... (Gemini): their prefix,
    then key characters only (so no AI Pipe token rides along after a comma or a space)."""
    return token.startswith(NATIVE_KEY_PREFIXES) and NATIVE_KEY.fullmatch(token) is not None


def mint_token(email: str, secret: str, salt: str | None = None, expires_in: float | None = None) -> str:
    """Sign an AI Pipe token for email."""
    payload: dict = {"email": email}
    if salt:
        payload["salt"] = salt
    if expires_in:
        payload["exp"] = int(time.time() + expires_in)
    return jwt.encode(payload, secret, algorithm="HS256")


class TokenVerifier:
    """Checks tokens against the secret and configured salts, remembering good ones briefly."""

    def __init__(self, secret: str, salts: Mapping[str, str], cache_seconds: float = 60.0, cache_size: int = 20000):
        self.secret = secret
        self.salts = salts
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self._cache: dict[str, tuple[str, float]] = {}  # token -> (email, valid until)

    def verify(self, token: str) -> str:
        """The email inside a valid token; raises AuthError otherwise."""
        if not token:
            raise AuthError("Missing Authorization: Bearer token")
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        email, exp = self._decode(token)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        until = now + self.cache_seconds
        self._cache[token] = (email, min(until, exp) if exp else until)
        return email

    def _decode(self, token: str) -> tuple[str, float | None]:
        try:
            payload = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": []})
        except jwt.ExpiredSignatureError:
            raise AuthError("Bearer token is invalid: it has expired") from None
        except jwt.InvalidTokenError:
            raise AuthError("Bearer token is invalid") from None
        email = payload.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise AuthError("Bearer token is invalid: it carries no email")
        email = email.strip().lower()
        expected = self.salts.get(email)
        if expected and payload.get("salt") != expected:
            raise AuthError("Bearer token is no longer valid")
        exp = payload.get("exp")
        return email, float(exp) if isinstance(exp, (int, float)) else None
