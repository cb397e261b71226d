"""Bearer tokens and TLS through real servers on 127.0.0.1: who gets served, who is refused and
with which status, and that health and reflection stay open for probes and grpcurl."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.certs import Certs, have_openssl, make_certs
from support.graph_builder import node_of

from plinth.clients import AsyncClient, Client, PlinthError
from plinth.clients.client import TLS
from plinth.clients.v1 import node_service_pb2 as ns
from plinth.clients.v1 import node_service_pb2_grpc as ns_grpc
from plinth.server.app import PlinthServer, is_loopback
from plinth.server.config import Auth, Config, ConfigError

TOKEN = "plinth-test-token-7f3a9c"
FILE_TOKEN = "file-token-91c2e4"
TOKEN_FILE = f"# deploy tokens, one a line\n\n  {FILE_TOKEN}  \n\n# retired-token\n"


def config(models_dir: Path, data_dir: Path, host: str = "127.0.0.1", **auth: object) -> Config:
    return Config(models_dir=models_dir, data_dir=data_dir, device="cpu", host=host, port=0, auth=Auth(**auth))


def refused(call, code: str = "UNAUTHENTICATED") -> PlinthError:
    """The PlinthError `call()` raises, checked to carry `code`."""
    with pytest.raises(PlinthError) as caught:
        call()
    assert caught.value.code == code, caught.value
    return caught.value


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PLINTH_TOKEN in the environment running the tests must not change what they send."""
    monkeypatch.delenv("PLINTH_TOKEN", raising=False)


@pytest.fixture(scope="module")
def token_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Tokens from both places at once: TOKEN set directly, FILE_TOKEN in a file with comments
    and blank lines."""
    folder = tmp_path_factory.mktemp("auth")
    (folder / "tokens").write_text(TOKEN_FILE)
    with PlinthServer(config(models_dir, folder / "data", token_file=folder / "tokens", tokens=(TOKEN,))) as server:
        yield server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if not have_openssl():
        pytest.skip("the openssl command makes the test certificates")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(models_dir: Path, certs: Certs, tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("tls-data")
    with PlinthServer(config(models_dir, data, tls_cert=certs.server_cert, tls_key=certs.server_key)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(models_dir: Path, certs: Certs, tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("mtls-data")
    auth = dict(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca, tokens=(TOKEN,))
    with PlinthServer(config(models_dir, data, **auth)) as server:
        yield server


# tokens


def test_right_token_lists_nodes_and_runs_txt2img(token_server, txt2img):
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    with Client(token_server.address, timeout=120, token=TOKEN) as client:
        assert any(schema.class_type == "KSampler" for schema in client.list_nodes())
        result = client.run(txt2img)
        assert result.status == "completed" and [im.size for im in result.images] == [(64, 64)]
        assert client.get_job(result.job_id).job_id == result.job_id
        assert client.get_image(result.image_refs[0].id).startswith(b"\x89PNG")


@pytest.mark.parametrize("token", ["", "wrong-token"], ids=["missing", "wrong"])
def test_wrong_or_missing_token_is_refused_on_every_call_but_health(token_server, txt2img, token):
    with Client(token_server.address, timeout=10, token=token) as client:
        calls = {
            "ListNodes": client.list_nodes,
            "Submit": lambda: client.submit(txt2img),
            "GetJob": lambda: client.get_job("any"),
            "CancelJob": lambda: client.cancel("any"),
            "ListJobs": client.list_jobs,
            "GetImage": lambda: client.get_image("any"),
            "Run (server streaming)": lambda: client.run(txt2img),
            "Watch (server streaming)": lambda: list(client.watch("any")),
        }
        for name, call in calls.items():
            error = refused(call)
            assert "bearer token" in error.message, name
            assert TOKEN not in error.message and (not token or token not in error.message), name
        assert client.health() == "SERVING"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", f"Token {TOKEN}", "Bearer", "Bearer # retired-token"])
def test_malformed_authorization_and_token_file_comments_are_refused(token_server, value):
    with grpc.insecure_channel(token_server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            ns_grpc.NodeServiceStub(channel).ListNodes(
                ns.ListNodesRequest(), metadata=[("authorization", value)], timeout=10
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in caught.value.details() and "retired" not in caught.value.details()


def test_health_and_reflection_need_no_token(token_server):
    with grpc.insecure_channel(token_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"plinth.v1.GraphService", "plinth.v1.NodeService", "grpc.health.v1.Health"} <= set(services)


def test_token_file_with_comments_and_blank_lines(token_server):
    with Client(token_server.address, timeout=10, token=FILE_TOKEN) as client:
        assert client.list_nodes()
    with Client(token_server.address, timeout=10, token="# retired-token") as client:
        refused(client.list_nodes)


def test_clients_read_plinth_token(token_server, txt2img, monkeypatch):
    monkeypatch.setenv("PLINTH_TOKEN", TOKEN)
    with Client(token_server.address, timeout=10) as client:
        assert client.list_nodes()
    with Client(token_server.address, timeout=10, token="wrong-token") as client:  # an explicit token wins
        refused(client.list_nodes)

    async def both_ways() -> None:
        async with AsyncClient(token_server.address, timeout=10) as client:
            assert await client.list_nodes()
            await client.list_jobs()
        monkeypatch.setenv("PLINTH_TOKEN", "wrong-token")
        async with AsyncClient(token_server.address, timeout=10) as client:
            with pytest.raises(PlinthError, match="UNAUTHENTICATED"):
                await client.run(txt2img)
            with pytest.raises(PlinthError, match="UNAUTHENTICATED"):
                async for _ in client.watch("any"):
                    pass

    asyncio.run(both_ways())


# binding beyond loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.0.2.7", "plinth.internal", ""])
def test_other_hosts_refuse_to_start_without_tokens(models_dir, tmp_path, host):
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match=r"auth\.token_file or auth\.tokens"):
        PlinthServer(config(models_dir, tmp_path, host=host))


def test_all_interfaces_with_tokens_starts_and_warns_about_clear_text(models_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="plinth.server")
    with PlinthServer(config(models_dir, tmp_path, host="0.0.0.0", tokens=(TOKEN,))) as server:
        with Client(f"127.0.0.1:{server.port}", timeout=10, token=TOKEN) as client:
            assert client.list_nodes()
        with Client(f"127.0.0.1:{server.port}", timeout=10) as client:
            refused(client.list_nodes)
            assert client.health() == "SERVING"
    assert "clear text" in caplog.text


# TLS


def test_tls_client_is_served_and_plain_text_gets_unavailable(tls_server, certs):
    with Client(tls_server.address, timeout=10, tls=TLS(root_cert=certs.ca)) as client:
        assert client.list_nodes() and client.health() == "SERVING"
    with Client(tls_server.address, timeout=10) as plain:
        refused(plain.list_nodes, "UNAVAILABLE")
        refused(plain.health, "UNAVAILABLE")
    with Client(tls_server.address, timeout=10, tls=TLS(root_cert=certs.ca)) as client:  # still serving
        assert client.list_nodes()

    async def over_asyncio() -> None:
        async with AsyncClient(tls_server.address, timeout=10, tls=TLS(root_cert=certs.ca)) as client:
            assert await client.list_nodes()

    asyncio.run(over_asyncio())


def test_tls_client_that_does_not_trust_the_ca_is_refused(tls_server, certs):
    with Client(tls_server.address, timeout=10, tls=TLS(root_cert=certs.client_cert)) as client:
        refused(client.list_nodes, "UNAVAILABLE")


def test_mutual_tls_serves_only_clients_with_a_certificate(mtls_server, certs):
    with Client(mtls_server.address, timeout=10, token=TOKEN, tls=TLS(root_cert=certs.ca)) as client:
        refused(client.list_nodes, "UNAVAILABLE")
    mine = TLS(root_cert=certs.ca, cert=certs.client_cert, key=certs.client_key)
    with Client(mtls_server.address, timeout=10, token=TOKEN, tls=mine) as client:
        assert client.list_nodes()
    with Client(mtls_server.address, timeout=10, tls=mine) as client:  # a certificate does not replace the token
        refused(client.list_nodes)


@pytest.mark.parametrize(
    "auth, setting",
    [
        (dict(tls_cert="server.pem"), "auth.tls_cert and auth.tls_key"),
        (dict(tls_key="server.key"), "auth.tls_cert and auth.tls_key"),
        (dict(tls_client_ca="ca.pem"), "auth.tls_client_ca"),
        (dict(tls_cert="absent.pem", tls_key="server.key"), "auth.tls_cert"),
    ],
)
def test_incomplete_tls_settings_are_named(models_dir, tmp_path, auth, setting):
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_bytes(b"")
    paths = {key: tmp_path / value for key, value in auth.items()}
    with pytest.raises(ConfigError, match=setting):
        PlinthServer(config(models_dir, tmp_path / "data", **paths))


def test_client_tls_needs_cert_and_key_together(certs):
    with pytest.raises(ValueError, match="cert and key"):
        Client("127.0.0.1:1", tls=TLS(root_cert=certs.ca, cert=certs.client_cert))
