"""Which addresses /proxy may reach, and a resolver that refuses the rest before any connection is made.

The check runs on the addresses the HTTP client is about to connect to (it connects to what the
resolver returns), so a name that resolves to a public address for a check and to a private one
for the connection (DNS rebinding) has no second lookup to exploit.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Any

from tornado.netutil import DefaultLoopResolver, Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CGNAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598; neither "private" nor global to Python
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: reaches the IPv4 address in its last 32 bits


class BlockedAddress(Exception):
    """A target that resolves to an address /proxy must not reach; the message says which and why."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches: IPv4-mapped, NAT64 or 6to4 (None otherwise)."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ip is off limits ("loopback", "private", ...), or None for a public address."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        return blocked_reason(inner)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"  # 169.254.169.254 is the cloud metadata service
    if ip in CGNAT:
        return "carrier-grade NAT"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "special-purpose"  # e.g. documentation ranges: not reachable on the internet
    return None


def check_address(host: str, address: str) -> None:
    """Raise BlockedAddress when `address` (what `host` resolved to) is not public."""
    ip = ipaddress.ip_address(address)
    reason = blocked_reason(ip)
    if reason is None:
        return
    try:
        literal = ipaddress.ip_address(host.strip("[]")) == ip
    except ValueError:
        literal = False
    where = f"{ip} is" if literal else f"{host} resolves to {ip}, which is"
    raise BlockedAddress(f"Refusing to proxy: {where} a {reason} address")


def system_resolver() -> Resolver:
    """The resolver names are looked up with (tests swap in an OverrideResolver)."""
    return DefaultLoopResolver()


class GuardedResolver(Resolver):
    """Resolves through another resolver and refuses when any address it returns is not public."""

    def initialize(self, resolver: Resolver) -> None:
        self.resolver = resolver

    def close(self) -> None:
        self.resolver.close()

    async def resolve(self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        addresses = await self.resolver.resolve(host, port, family)
        for _family, sockaddr in addresses:
            check_address(host, sockaddr[0])
        return addresses
