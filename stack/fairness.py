"""Shares of the gate's scarce things between clients, as plain bookkeeping (no sockets; stack/gate.py
enforces): who a client is, request bodies held in memory, connections, and a request rate.

A client is its address; an IPv6 host owns a whole /64, so there the /64 is the client. Clients are also
grouped by network (IPv4 /24, IPv6 /48): a few addresses of one network together get a group's share, never
the whole. One attacker with many addresses in one network therefore takes at most a group's share, and one
address at most a client's share; a user in another network keeps the rest.
"""
from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass

V4_GROUP, V6_CLIENT, V6_GROUP = 24, 64, 48


def client_of(address: str) -> tuple[str, str]:
    """-> (client key, group key): '192.0.2.7' -> ('192.0.2.7', '192.0.2.0/24'); an IPv6 address -> its /64
    and /48; an IPv4-mapped IPv6 address as the IPv4 one; anything unparsable stands for itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address, address
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return str(ip), str(ipaddress.ip_network(f"{ip}/{V4_GROUP}", strict=False))
    return (str(ipaddress.ip_network(f"{ip}/{V6_CLIENT}", strict=False)),
            str(ipaddress.ip_network(f"{ip}/{V6_GROUP}", strict=False)))


class Shares:
    """Units (bytes, connections) held at once: at most `total` in all, `per_client` by one client and
    `per_group` by one network. take() refuses with the name of the limit that would be passed."""

    def __init__(self, total: int, per_client: int, per_group: int):
        self.total, self.per_client, self.per_group = total, per_client, per_group
        self.used = 0
        self.held: dict[str, int] = {}

    def over(self, client: str, group: str, n: int) -> str | None:
        if self.held.get(client, 0) + n > self.per_client:
            return "client"
        if self.held.get(group, 0) + n > self.per_group:
            return "group"
        if self.used + n > self.total:
            return "total"
        return None

    def take(self, client: str, group: str, n: int) -> str | None:
        limit = self.over(client, group, n)
        if limit is None:
            self.add(client, group, n)
        return limit

    def add(self, client: str, group: str, n: int) -> None:
        """Count units unconditionally (a connection is counted when it arrives, then judged)."""
        self.used += n
        for key in {client, group}:
            self.held[key] = self.held.get(key, 0) + n

    def give(self, client: str, group: str, n: int) -> None:
        self.used -= n
        for key in {client, group}:
            left = self.held.get(key, 0) - n
            if left > 0:
                self.held[key] = left
            else:
                self.held.pop(key, None)


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimit:
    """A token bucket per client: `rate` requests per second on average, bursts of `burst`. allow() -> 0.0
    when the request may go, else the seconds until it could (what Retry-After says). At most MAX_CLIENTS
    buckets are kept, least recently used forgotten first, in O(1): many addresses (IPv6) cannot make the
    bookkeeping itself slow."""

    MAX_CLIENTS = 100_000

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, client: str) -> float:
        now = self.clock()
        b = self.buckets.get(client)
        if b is None:
            if len(self.buckets) >= self.MAX_CLIENTS:
                self.buckets.popitem(last=False)
            b = self.buckets[client] = _Bucket(float(self.burst), now)
        else:
            self.buckets.move_to_end(client)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate
