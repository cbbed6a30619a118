"""Bearer-token tenancy.

Tokens come from a file (``--tokens-file``, YAML or JSON) and/or the ``SVDQ_TOKENS``
environment variable::

    # tokens file: a tenant maps to its tokens, or to its tokens and a byte quota
    tenants:
      team-a: [token-a1, token-a2]
      team-b: {tokens: [token-b], quota_bytes: 8GiB}

    # environment
    SVDQ_TOKENS="team-a=token-a1,team-b=token-b"

Callers send ``authorization: Bearer <token>`` metadata. Without any configured token the
server runs single-tenant: every caller is tenant ``default`` and no token is needed.
Tokens are kept only as SHA-256 digests, and a lookup hashes the presented token first, so
the comparison does not leak a token's prefix through timing.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Mapping

from svdq.errors import InvalidInputError

from .config import parse_bytes, read_config_file

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)  # fullmatch: "$" passes a trailing newline
MIN_TOKEN_LENGTH = 16


class AuthenticationError(Exception):
    """Missing or unknown bearer token (maps to UNAUTHENTICATED)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthenticator:
    """Maps bearer tokens to tenants.

    Args:
        tenants: tenant name -> list of its tokens; empty means single-tenant without auth.
        quotas: tenant name -> its stored-byte quota (tenants not named have the server's
            default, ``--tenant-quota-bytes``).
    """

    def __init__(self, tenants: dict[str, list[str]] | None = None, quotas: Mapping[str, int] | None = None) -> None:
        self._by_digest: dict[bytes, str] = {}
        self.quotas = dict(quotas or {})
        unknown = sorted(set(self.quotas) - set(tenants or {}))
        if unknown:
            raise InvalidInputError(f"quotas given for tenants without tokens: {unknown}")
        for tenant, tokens in (tenants or {}).items():
            if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
                raise InvalidInputError(f"tenant names must be 1-64 letters, digits, '._-'; got {tenant!r}")
            if isinstance(tokens, str):
                tokens = [tokens]
            for token in tokens:
                if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                    raise InvalidInputError(
                        f"tokens of tenant {tenant!r} must be strings of at least {MIN_TOKEN_LENGTH} characters"
                    )
                digest = _digest(token)
                if self._by_digest.get(digest, tenant) != tenant:
                    raise InvalidInputError(f"one token is configured for two tenants ({tenant!r} and "
                                            f"{self._by_digest[digest]!r})")
                self._by_digest[digest] = tenant

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    @property
    def tenants(self) -> list[str]:
        return sorted(set(self._by_digest.values()))

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of an ``authorization`` metadata value; AuthenticationError if none matches."""
        if not self.enabled:
            return DEFAULT_TENANT
        if not authorization:
            raise AuthenticationError("missing bearer token: send metadata 'authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("authorization metadata must be 'Bearer <token>'")
        token = token.strip()
        tenant = self._by_digest.get(_digest(token))
        if tenant is None:
            if token.lower().startswith("bearer "):
                raise AuthenticationError("invalid bearer token: the token itself starts with 'Bearer ' (sent as "
                                          "'Bearer Bearer <token>'?); send 'authorization: Bearer <token>' with the "
                                          "token alone")
            raise AuthenticationError("invalid bearer token")
        return tenant

    @classmethod
    def from_sources(cls, tokens_file: str | None, tokens_env: str | None) -> TokenAuthenticator:
        """Merge the tokens file and the ``SVDQ_TOKENS`` value (either may be absent)."""
        tenants: dict[str, list[str]] = {}
        quotas: dict[str, int] = {}
        if tokens_file:
            loaded = read_config_file(tokens_file, "--tokens-file")
            if not isinstance(loaded, dict) or not isinstance(loaded.get("tenants"), dict):
                raise InvalidInputError(f"--tokens-file {tokens_file} must hold a mapping 'tenants: {{name: [tokens]}}'")
            for tenant, entry in loaded["tenants"].items():
                tokens, quota = _tenant_entry(tenant, entry, tokens_file)
                tenants.setdefault(tenant, []).extend(tokens)
                if quota is not None:
                    quotas[tenant] = quota
        for item in (tokens_env or "").split(","):
            if not item.strip():
                continue
            tenant, sep, token = item.strip().partition("=")
            if not sep:
                raise InvalidInputError("SVDQ_TOKENS must be 'tenant=token,tenant=token,...'")
            tenants.setdefault(tenant, []).append(token)
        return cls(tenants, quotas)


def _tenant_entry(tenant, entry, tokens_file: str) -> tuple[list, int | None]:
    """(tokens, quota or None) of one tenant of the tokens file: a token, a list of tokens,
    or ``{tokens: [...], quota_bytes: 1GiB}``."""
    if isinstance(entry, str):
        return [entry], None
    if not isinstance(entry, dict):
        return list(entry or []), None
    unknown = sorted(set(entry) - {"tokens", "quota_bytes"})
    if unknown:
        raise InvalidInputError(f"--tokens-file {tokens_file}: tenant {tenant!r} has unknown fields {unknown}; "
                                "allowed: tokens, quota_bytes")
    tokens = entry.get("tokens") or []
    quota = entry.get("quota_bytes")
    if quota is not None:
        try:
            quota = parse_bytes(quota)
        except argparse.ArgumentTypeError as exc:
            raise InvalidInputError(f"--tokens-file {tokens_file}: quota_bytes of tenant {tenant!r}: {exc}") from None
        if quota <= 0:
            raise InvalidInputError(f"--tokens-file {tokens_file}: quota_bytes of tenant {tenant!r} must be > 0")
    return [tokens] if isinstance(tokens, str) else list(tokens), quota
