"""TLS and mutual TLS with certificates made at test time: the right certificates connect,
plaintext, an unknown CA and a missing client certificate do not."""

import subprocess
import sys

import grpc
import pytest
import torch
from svdq_client import AsyncKVCacheClient, KVCacheClient, Profile, UnavailableError

pytestmark = pytest.mark.integration

PROFILE = Profile("tls", 1, 1, 16)


def _credentials(tls, client=False):
    return grpc.ssl_channel_credentials(
        tls["ca.pem"].read_bytes(),
        tls["client.key"].read_bytes() if client else None,
        tls["client.pem"].read_bytes() if client else None,
    )


def test_server_tls(tmp_path, tls_material):
    from conftest import ServerProcess

    server = ServerProcess(tmp_path, ["--tls-cert", str(tls_material["server.pem"]),
                                      "--tls-key", str(tls_material["server.key"])],
                           credentials=_credentials(tls_material)).start()
    try:
        with KVCacheClient(server.address, root_certificates=tls_material["ca.pem"], timeout=20) as client:
            client.register_profile(PROFILE)
            client.upload("secret", "tls", torch.randn(1, 20, 1, 16).half(), torch.randn(1, 20, 1, 16).half())
            assert client.describe("secret").num_tokens == 20
        for wrong in ({}, {"root_certificates": tls_material["rogue.pem"]}):
            with pytest.raises(UnavailableError), KVCacheClient(server.address, retries=0, timeout=5, **wrong) as bad:
                bad.server_info()
        probe = subprocess.run([sys.executable, "-m", "svdq_server.health_probe", "--address", server.address,
                                "--tls-ca", str(tls_material["ca.pem"])], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
    finally:
        assert server.stop() == 0


async def test_mutual_tls(tmp_path, tls_material):
    from conftest import ServerProcess

    server = ServerProcess(tmp_path, ["--tls-cert", str(tls_material["server.pem"]),
                                      "--tls-key", str(tls_material["server.key"]),
                                      "--tls-client-ca", str(tls_material["ca.pem"])],
                           credentials=_credentials(tls_material, client=True)).start()
    try:
        async with AsyncKVCacheClient(server.address, root_certificates=tls_material["ca.pem"],
                                      client_certificate=tls_material["client.pem"],
                                      client_key=tls_material["client.key"], timeout=20) as client:
            assert (await client.server_info()).device == "cpu"
        async with AsyncKVCacheClient(server.address, root_certificates=tls_material["ca.pem"], retries=0,
                                      timeout=5) as anonymous:
            with pytest.raises(UnavailableError):
                await anonymous.server_info()
        async with AsyncKVCacheClient(server.address, root_certificates=tls_material["ca.pem"],
                                      client_certificate=tls_material["rogue.pem"],
                                      client_key=tls_material["rogue.key"], retries=0, timeout=5) as rogue:
            with pytest.raises(UnavailableError):
                await rogue.server_info()
    finally:
        assert server.stop() == 0
