"""Bearer-token tenancy.

Tokens come from a file (``--tokens-file``, YAML or JSON) and/or the ``SVDQ_TOKENS``
environment variable::

    # tokens file
    tenants:
      team-a: [token-a1, token-a2]
      team-b: [token-b]

    # environment
    SVDQ_TOKENS="team-a=token-a1,team-b=token-b"

Callers send ``authorization: Bearer <token>`` metadata. Without any configured token the
server runs single-tenant: every caller is tenant ``default`` and no token is needed.
Tokens are kept only as SHA-256 digests, and a lookup hashes the presented token first, so
the comparison does not leak a token's prefix through timing.
"""

from __future__ import annotations

import hashlib
import re

from svdq.errors import InvalidInputError

from .config import read_config_file

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
    """

    def __init__(self, tenants: dict[str, list[str]] | None = None) -> None:
        self._by_digest: dict[bytes, str] = {}
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
        if tokens_file:
            loaded = read_config_file(tokens_file, "--tokens-file")
            if not isinstance(loaded, dict) or not isinstance(loaded.get("tenants"), dict):
                raise InvalidInputError(f"--tokens-file {tokens_file} must hold a mapping 'tenants: {{name: [tokens]}}'")
            for tenant, tokens in loaded["tenants"].items():
                tenants.setdefault(tenant, []).extend([tokens] if isinstance(tokens, str) else list(tokens or []))
        for item in (tokens_env or "").split(","):
            if not item.strip():
                continue
            tenant, sep, token = item.strip().partition("=")
            if not sep:
                raise InvalidInputError("SVDQ_TOKENS must be 'tenant=token,tenant=token,...'")
            tenants.setdefault(tenant, []).append(token)
        return cls(tenants)
