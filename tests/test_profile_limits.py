"""--max-profile-bytes bounds the shared bases a tenant holds in all: its registered profiles
and the profiles arriving on its streams in progress, so neither many profiles nor many
parallel streams can hold more than the limit."""

import pytest
import torch
from svdq_client.types import Profile, basis_bytes, profile_pieces
from svdq_server.engine import Engine, EngineConfig

from svdq import CodecConfig, fit_basis
from svdq.errors import ResourceExhaustedError

LAYERS, HEADS, DIM = 2, 2, 32
ONE = LAYERS * basis_bytes(HEADS * DIM)  # the key bases of one profile below
LIMIT = 3 * ONE


def profile(name: str, seed: int = 0) -> Profile:
    generator = torch.Generator().manual_seed(seed)
    bases = tuple(fit_basis(torch.randn(200, HEADS * DIM, generator=generator)) for _ in range(LAYERS))
    return Profile(name, LAYERS, HEADS, DIM, codec=CodecConfig(bits_per_element=2.0), bases=bases)


@pytest.fixture
def engine():
    return Engine(EngineConfig(device="cpu", max_profile_bytes=LIMIT))


def test_a_tenants_profiles_together_stay_within_the_limit_and_other_tenants_are_not_charged(engine):
    for index in range(3):
        engine.register_profile(profile(f"p{index}", index), tenant="a")
    with pytest.raises(ResourceExhaustedError, match=rf"profile 'p3' has {ONE} bytes of shared bases held in memory "
                       rf"\(float32\); this tenant's other profiles hold {3 * ONE} and its profile streams in "
                       rf"progress 0, and the server holds at most {LIMIT} bytes of bases per tenant"):
        engine.register_profile(profile("p3", 3), tenant="a")
    assert [known.name for known in engine.list_profiles("a")] == ["p0", "p1", "p2"]
    # replacing a profile counts the new bases instead of the old ones
    engine.register_profile(profile("p0", 9), replace=True, tenant="a")
    assert engine.get_profile("p0", "a").same_as(profile("p0", 9))
    # another tenant has its own limit; the operator's profiles are not bounded
    engine.register_profile(profile("p3", 3), tenant="b")
    for index in range(4):
        engine.register_profile(profile(f"operator-{index}", index))


def test_parallel_profile_streams_cannot_pass_the_limit_together(engine):
    first, second = (list(profile_pieces(profile(name, seed))) for seed, name in enumerate(("one", "two")))
    engine.register_profile(profile("held"), tenant="a")
    with engine.profile_stream("a") as one:
        one.add(first[0])  # declares ONE bytes: held ONE + arriving ONE
        with engine.profile_stream("a") as two:
            two.add(second[0])  # 3 * ONE: the limit, reached but not passed
            with engine.profile_stream("a") as three:
                with pytest.raises(ResourceExhaustedError, match=rf"this tenant's other profiles hold {ONE} and "
                                   rf"its profile streams in progress {2 * ONE}"):
                    three.add(list(profile_pieces(profile("three", 5)))[0])
            for piece in second[1:]:
                two.add(piece)
            # a stream's own declared bytes are not counted twice when it registers
            engine.register_profile(two.result(), tenant="a", streamed_bytes=two.declared_bytes)
        for piece in first[1:]:
            one.add(piece)
        engine.register_profile(one.result(), tenant="a", streamed_bytes=one.declared_bytes)
    assert [known.name for known in engine.list_profiles("a")] == ["held", "one", "two"]
    # every stream ended: nothing stays reserved, and a failed stream released its bytes too
    assert engine._streamed_bases == {}
    with pytest.raises(ResourceExhaustedError):
        engine.register_profile(profile("four", 4), tenant="a")


def test_a_stream_that_fails_releases_what_it_declared(engine):
    pieces = list(profile_pieces(profile("big")))
    with pytest.raises(RuntimeError):
        with engine.profile_stream("a") as stream:
            stream.add(pieces[0])
            assert engine._streamed_bases == {"a": ONE}
            raise RuntimeError("the client went away")
    assert engine._streamed_bases == {}
