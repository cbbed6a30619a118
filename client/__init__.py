"""svdq_client: Python clients of the svdq service (sync and asyncio) and the transformers
integration (:mod:`svdq_client.hf`). See docs/service.md."""

from svdq.attention import SparsityConfig as Sparsity

from .aio import AsyncKVCacheClient
from .client import KVCacheClient
from .errors import (
    AuthenticationError,
    ConflictError,
    DeadlineExceededError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
)
from .types import (
    AttendResult,
    AttendStats,
    BlobStats,
    CompressResult,
    FetchResult,
    Profile,
    SequenceInfo,
    ServerInfo,
)

__all__ = [
    "AsyncKVCacheClient",
    "AttendResult",
    "AttendStats",
    "AuthenticationError",
    "BlobStats",
    "CompressResult",
    "ConflictError",
    "DeadlineExceededError",
    "FetchResult",
    "InvalidInputError",
    "KVCacheClient",
    "NotFoundError",
    "PermissionDeniedError",
    "Profile",
    "ResourceExhaustedError",
    "SequenceInfo",
    "ServerInfo",
    "ServiceError",
    "Sparsity",
    "UnavailableError",
]
