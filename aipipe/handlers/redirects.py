"""Where /login may send a token: http(s) only, allow-listed origins at once, any other origin after consent."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
ENTRY = re.compile(r"(https?)://([^/:@\[\]]+|\[[0-9a-fA-F:.]+\])(?::(\d+|\*))?/?")
UNENCODED = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
MAX_LENGTH = 4096


class RedirectError(ValueError):
    """A redirect target that may not receive a token; the message says why."""


@dataclass(frozen=True)
class Handoff:
    """A checked redirect: the URL to send the token to, its origin, and whether to ask the user first."""

    url: str
    origin: str
    consent: bool


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == DEFAULT_PORTS[self.scheme] else f":{self.port}")


def redirect_from_query(query: str, decoded: str | None) -> str | None:
    """The app URL in /login's query: apps following the README pass it unencoded, so `&...` belongs to it."""
    match = re.search(r"(?:^|&)redirect=", query)
    if not match:
        return None
    raw = query[match.end():]
    return raw if UNENCODED.match(raw) else decoded


def _host(hostname: str | None) -> str:
    if not hostname:
        raise RedirectError("The address has no host name")
    if ":" in hostname:
        try:
            return str(ipaddress.IPv6Address(hostname))
        except ValueError:
            raise RedirectError("The address has an invalid host name") from None
    try:
        # Show and compare the punycode form so look-alike Unicode names cannot pose as known ones
        host = hostname.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise RedirectError("The address has an invalid host name") from None
    if not HOST.fullmatch(host):
        raise RedirectError("The address has an invalid host name")
    return host


def parse_target(target: str) -> tuple[Origin, str]:
    """The origin and normalised URL of an absolute http(s) URL; RedirectError for anything else."""
    if len(target) > MAX_LENGTH:
        raise RedirectError("The address is too long")
    # Browsers drop tabs and newlines and read \ as /, which turns harmless-looking text into other URLs
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in target) or "\\" in target:
        raise RedirectError("The address contains spaces, control characters or backslashes")
    scheme = target.split(":", 1)[0].lower() if ":" in target else ""
    if scheme not in DEFAULT_PORTS:
        raise RedirectError("Only http:// and https:// addresses can receive a token")
    if not target[len(scheme) + 1:].startswith("//"):
        raise RedirectError("The address must start with http:// or https://")
    try:
        parts = urlsplit(target)
    except ValueError:  # an unclosed [IPv6 literal, or a host NFKC would turn into other characters
        raise RedirectError("The address is not a valid URL") from None
    if "@" in parts.netloc:
        raise RedirectError("Addresses with a user name or password are not allowed")
    try:
        port = parts.port
    except ValueError:
        raise RedirectError("The address has an invalid port") from None
    host = _host(parts.hostname)
    origin = Origin(scheme, host, port or DEFAULT_PORTS[scheme])
    url = urlunsplit((scheme, str(origin).split("://", 1)[1], parts.path or "/", parts.query, parts.fragment))
    return origin, url


def _entry_matches(entry: str, origin: Origin) -> bool:
    match = ENTRY.fullmatch(entry.strip().lower())
    if not match:
        return False
    scheme, host, port = match.groups()
    if scheme != origin.scheme or host.strip("[]") != origin.host:
        return False
    if port == "*":
        return True
    return (int(port) if port else DEFAULT_PORTS[scheme]) == origin.port


def check_redirect(target: str, own_origin: str, allowed: list[str] | tuple[str, ...]) -> Handoff:
    """Decide whether (and how) a token may go to target; raises RedirectError when it may not."""
    own, _ = parse_target(own_origin.rstrip("/") + "/")
    if target.startswith("/") and not target.startswith("//"):
        target = str(own) + target  # a path on this server
    origin, url = parse_target(target)
    trusted = origin == own or any(_entry_matches(entry, origin) for entry in allowed)
    return Handoff(url=url, origin=str(origin), consent=not trusted)
