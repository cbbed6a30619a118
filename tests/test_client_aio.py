"""The asyncio client against the shared server process: round trip and many concurrent calls."""

import asyncio
import uuid

import pytest
import torch
from conftest import TENANT_TOKENS
from svdq_client import AsyncKVCacheClient, ConflictError, NotFoundError, Profile

from svdq import CodecConfig

pytestmark = pytest.mark.integration


async def test_async_round_trip_and_concurrent_calls(shared_server):
    profile = Profile(f"aio-{uuid.uuid4().hex[:6]}", 2, 1, 32, codec=CodecConfig(method="kivi", bits=4, group_size=16))
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 48, 1, 32, generator=generator).half()
    values = torch.randn(2, 48, 1, 32, generator=generator).half()
    async with AsyncKVCacheClient(shared_server.address, token=TENANT_TOKENS["team-b"], chunk_bytes=2048,
                                  timeout=60) as client:
        await client.register_profile(profile)
        names = [f"aio-{uuid.uuid4().hex[:8]}" for _ in range(6)]
        infos = await asyncio.gather(*(client.upload(name, profile.name, keys[:, :40], values[:, :40])
                                       for name in names))
        assert {info.num_tokens for info in infos} == {40}
        counts = await asyncio.gather(*(client.append(name, keys[:, 40:], values[:, 40:]) for name in names))
        assert counts == [48] * 6
        with pytest.raises(ConflictError, match="out-of-order append"):
            await client.append(names[0], keys[:, 40:41], values[:, 40:41], expected_tokens=40)
        results = await asyncio.gather(*(client.attend(torch.randn(4, 2, 32), [(name, layer) for layer in (0, 1, 0, 1)])
                                         for name in names))
        assert all(result.output.shape == (4, 2, 32) and result.lse.shape == (4, 2) for result in results)
        fetched = await client.fetch(names[0], dtype=torch.float32)
        assert fetched.keys.dtype == torch.float32 and torch.equal(fetched.values, values.float())
        assert (fetched.keys - keys.float()).abs().max() < 0.25  # kivi 4-bit
        await asyncio.gather(*(client.delete(name) for name in names))
        with pytest.raises(NotFoundError):
            await client.describe(names[0])
