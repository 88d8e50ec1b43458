"""The registry's contract scopes, enforced by the framework's AuthPolicy."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt
import pytest

from framework.auth.grants import NameGrants
from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
from framework.auth.policy import AuthPolicy, BearerToken, JwtConfig, JwtVerifier
from framework.client import connect
from framework.errors import PermissionDeniedError
from framework.registry.agent import RegistrationAgent
from framework.registry.sqlite import SqliteStore
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import ECHO, start_echo, start_registry

SECRET = secrets.token_bytes(32)


def _token(scope: str) -> str:
    now = int(time.time())
    claims = {"sub": "ops", "iat": now, "exp": now + 300, "scope": scope}
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1"})


async def test_set_weights_needs_the_admin_scope(tmp_path: Path) -> None:
    """SetWeights without registry:admin is PERMISSION_DENIED and changes nothing."""
    verifier = JwtVerifier(
        KeySet(StaticKeys([VerificationKey.hmac("k1", SECRET)])),
        JwtConfig(issuer=None, audience=None),
    )
    node = await start_registry(SqliteStore(tmp_path / "r.sqlite"), policies=[AuthPolicy(verifier)])
    reader = connect(node.address, policies=[BearerToken(_token("registry:read"))])
    admin = connect(node.address, policies=[BearerToken(_token("registry:read registry:admin"))])
    try:
        request = pb.SetWeightsRequest(service=ECHO, version_weights={"v2": 100})
        with pytest.raises(PermissionDeniedError) as caught:
            await RegistryServiceStub(reader).SetWeights(request)
        assert "registry:admin" in caught.value.message
        assert not (
            await RegistryServiceStub(reader).ListServices(pb.ListServicesRequest())
        ).services
        await RegistryServiceStub(admin).SetWeights(request)
        listed = await RegistryServiceStub(reader).ListServices(pb.ListServicesRequest())
        assert dict(listed.services[0].version_weights) == {"v2": 100}
    finally:
        await reader.close()
        await admin.close()
        await node.stop()


async def test_agent_registers_with_its_token(tmp_path: Path) -> None:
    """An agent whose token has registry:register and a grant for the name registers."""
    verifier = JwtVerifier(
        KeySet(StaticKeys([VerificationKey.hmac("k1", SECRET)])),
        JwtConfig(issuer=None, audience=None),
    )
    node = await start_registry(
        SqliteStore(tmp_path / "r.sqlite"),
        policies=[AuthPolicy(verifier)],
        grants=NameGrants(table={"ops": [ECHO]}),
    )
    instance = await start_echo(None)
    agent = RegistrationAgent(
        node.address, ECHO, policies=[BearerToken(_token("registry:register"))]
    )
    try:
        await agent.on_started(instance.server)
        view = await node.registry.discover(ECHO)
        assert [i.address for i in view.instances] == [instance.address]
    finally:
        await agent.on_draining(instance.server)
        await instance.stop(0)
        await node.stop()
