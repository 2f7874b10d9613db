"""Who may call `cgil serve`'s admin endpoints: the token check and what counts as a proxied request.

Torch-free and free of the server's other concerns, so that the rule is read in one place:
a request that carries any credential is judged by it alone (a wrong one is refused, from loopback
too); only a request with no credential at all may pass as a direct loopback peer, and never one
that names an original client through a proxy header.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Optional

from fastapi import Request


def is_loopback(host: Optional[str]) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# headers by which proxies and CDNs name the original client (RFC 7239, de facto, Akamai/Cloudflare, Fastly,
# GCP/Rackspace); a request with any of them was proxied, whatever the proxy's own address
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-client-ip", "true-client-ip",
                      "cf-connecting-ip", "fastly-client-ip", "x-cluster-client-ip")


def forwarded(request: Request) -> bool:
    """The request came through a proxy (it names an original client)."""
    return any(h in request.headers for h in FORWARDING_HEADERS)


CREDENTIAL_HEADERS = ("authorization", "x-admin-token")


def right_token(header: str, value: str, token: Optional[str]) -> bool:
    """`Authorization: Bearer TOKEN` or `X-Admin-Token: TOKEN`, compared in constant time."""
    if header == "authorization":
        scheme, _, value = value.strip().partition(" ")
        if scheme.lower() != "bearer":  # Basic, Token, Digest ...: a credential, never the admin token
            return False
    value = value.strip()
    return bool(token) and bool(value) and hmac.compare_digest(value.encode(), token.encode())


def admin_authorised(request: Request, token: Optional[str], loopback_admin: bool) -> bool:
    """Every credential header that is present must carry the right token: `Authorization` of any scheme
    (Basic, Token, an empty Bearer) and `X-Admin-Token`, even empty. Only a request with neither header may
    be let in as a direct (not proxied) loopback peer: a wrong credential from loopback is a client that
    meant to authenticate and failed, not one the operator allowed without a token."""
    given = [(h, v) for h in CREDENTIAL_HEADERS for v in request.headers.getlist(h)]
    if given:
        return all(right_token(h, v, token) for h, v in given)
    peer = request.client.host if request.client else None
    return loopback_admin and is_loopback(peer) and not forwarded(request)
