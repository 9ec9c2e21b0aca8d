"""Authenticated worker traffic: a shared cluster token on every call and mutual TLS, between the
orchestrator's side (this test) and the workers, and between workers (a disaggregated request
makes the generation worker call the context worker). Certificates are made here with openssl."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from worker_rpc import greedy, wait_for

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc
from tandem.workers.cluster_auth import TOKEN_ENV, TOKEN_FILE_ENV, ClusterAuthError, load_cluster_auth

TOKEN = "s3cret-cluster-token"


def test_token_comes_from_the_file_first_then_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_cluster_auth().token is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert load_cluster_auth().token == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "token"))
    assert load_cluster_auth().token == "from-file"
    (tmp_path / "flag").write_text("from-flag")
    assert load_cluster_auth(str(tmp_path / "flag")).token == "from-flag"


@pytest.mark.parametrize("case, message", [
    ("empty token", "empty"), ("missing token file", "cannot read"), ("partial TLS", "all three"),
    ("missing TLS file", "does not exist"),
])
def test_settings_that_cannot_work_are_refused(case: str, message: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    monkeypatch.setenv(TOKEN_ENV, "" if case == "empty token" else "x")
    (tmp_path / "a.pem").write_text("x")
    arguments = {
        "empty token": {}, "missing token file": {"token_file": str(tmp_path / "nope")},
        "partial TLS": {"tls_cert": str(tmp_path / "a.pem")},
        "missing TLS file": {"tls_cert": str(tmp_path / "a.pem"), "tls_key": str(tmp_path / "a.pem"),
                             "tls_ca": str(tmp_path / "nope.pem")},
    }[case]
    with pytest.raises(ClusterAuthError, match=message):
        load_cluster_auth(**arguments)


def _make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and one certificate for 127.0.0.1 that every member (workers and client) shares."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    files = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key", "csr")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=tandem-test-ca",
            "-keyout", str(files["ca-key"]), "-out", str(files["ca"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=tandem-member", "-keyout", str(files["key"]),
            "-out", str(files["csr"]))
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", str(files["csr"]), "-CA", str(files["ca"]), "-CAkey", str(files["ca-key"]),
            "-CAcreateserial", "-days", "1", "-extfile", str(folder / "san.ext"), "-out", str(files["cert"]))
    return files


@pytest.fixture(scope="module")
def secured(start_worker, tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    files = _make_certificates(tmp_path_factory.mktemp("certs"))
    token_file = files["ca"].parent / "token"
    token_file.write_text(TOKEN)
    tls = ("--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]), "--tls-ca", str(files["ca"]))
    common = ("--kv-cache-bytes", str(32 << 20), "--cluster-token-file", str(token_file), *tls)
    context, generation = start_worker.all(start_worker.launch("context", *common),
                                           start_worker.launch("generation", *common))
    credentials = grpc.ssl_channel_credentials(files["ca"].read_bytes(), files["key"].read_bytes(),
                                               files["cert"].read_bytes())
    channels = {name: grpc.secure_channel(w.address, credentials) for name, w in
                (("context", context), ("generation", generation))}
    yield {"workers": (context, generation), "channels": channels, "files": files}
    for channel in channels.values():
        channel.close()


def _stub(secured, name: str) -> tandem_pb2_grpc.WorkerStub:
    return tandem_pb2_grpc.WorkerStub(secured["channels"][name])


def _with_token() -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKEN}"),)


def test_a_call_without_the_token_is_refused_and_counted(secured) -> None:
    stub = _stub(secured, "context")
    before = stub.Stats(pb.StatsRequest(), timeout=10, metadata=_with_token()).num_unauthenticated
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Stats(pb.StatsRequest(), timeout=10, metadata=metadata)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:  # a streaming method is refused the same way
        list(stub.Generate(pb.GenerateRequest(request_id="r", prompt_token_ids=[1, 2]), timeout=10))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert stub.Stats(pb.StatsRequest(), timeout=10, metadata=_with_token()).num_unauthenticated == before + 3


def test_plaintext_and_certificateless_clients_cannot_connect(secured) -> None:
    address = secured["workers"][0].address
    server_only = grpc.ssl_channel_credentials(secured["files"]["ca"].read_bytes())  # no client certificate
    for channel in (grpc.insecure_channel(address), grpc.secure_channel(address, server_only)):
        with channel, pytest.raises(grpc.RpcError) as refused:
            tandem_pb2_grpc.WorkerStub(channel).Stats(pb.StatsRequest(), timeout=10, metadata=_with_token())
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_disaggregated_request_between_authenticated_workers(secured) -> None:
    context, generation = _stub(secured, "context"), _stub(secured, "generation")
    prompt = list(range(100, 140))
    reply = context.Prefill(pb.PrefillRequest(request_id="auth-1", prompt_token_ids=prompt, params=greedy(8)),
                            timeout=60, metadata=_with_token())
    request = pb.GenerateRequest(request_id="auth-1", prompt_token_ids=prompt, params=greedy(8),
                                 kv_handle=reply.kv_handle, first_token_id=reply.first_token_id)
    chunks = list(generation.Generate(request, timeout=60, metadata=_with_token()))
    assert chunks[0].transfer.num_blocks == 3  # the generation worker fetched metadata and READ over TLS + token
    assert sum(len(chunk.token_ids) for chunk in chunks) == 7
    for name, stub in (("context", context), ("generation", generation)):
        def settled(stub=stub) -> bool:
            stats = stub.Stats(pb.StatsRequest(), timeout=10, metadata=_with_token())
            return stats.num_leases == 0 and stats.num_free_blocks == stats.num_total_blocks
        wait_for(settled, 15, f"{name}'s leases and blocks to come back")
