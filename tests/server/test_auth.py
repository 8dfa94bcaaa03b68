"""Bearer-token interceptor, token loading and TLS/mTLS against a small real gRPC server."""

import datetime
import ipaddress
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmwatts.errors import InvalidArgument
from llmwatts.server import auth
from llmwatts.client import client_channel
from llmwatts.credentials import is_loopback_host, load_token
from llmwatts.server.auth import BearerTokenInterceptor, server_credentials

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
TOKEN = "s3cret-control-token"

# ---------------------------------------------------------------------------------------------------
# Certificates made by the test: a CA, a server cert for localhost/127.0.0.1, a client cert.
# ---------------------------------------------------------------------------------------------------


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(subject_cn, key, issuer_cert=None, issuer_key=None, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("llmwatts test CA", ca_key, ca=True)
    server_key, client_key, other_key = _key(), _key(), _key()
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": _cert("localhost", server_key, ca, ca_key, server=True).public_bytes(serialization.Encoding.PEM),
        "server_key": _pem_key(server_key),
        "client_cert": _cert("alice", client_key, ca, ca_key).public_bytes(serialization.Encoding.PEM),
        "client_key": _pem_key(client_key),
        # a client certificate from a CA the server does not trust
        "rogue_cert": _cert("mallory", other_key).public_bytes(serialization.Encoding.PEM),
        "rogue_key": _pem_key(other_key),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


# ---------------------------------------------------------------------------------------------------
# A real server: the health service plus the interceptor; Check stands in for a mutating method.
# ---------------------------------------------------------------------------------------------------


class RecordingHealth(health.HealthServicer):
    def __init__(self):
        super().__init__()
        self.callers = []

    def Check(self, request, context):
        self.callers.append(auth.who(context))
        return super().Check(request, context)


def start_server(interceptor, credentials=None, host="127.0.0.1"):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    servicer = RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port(f"{host}:0")
    else:
        port = server.add_secure_port(f"{host}:0", credentials)
    server.start()
    return server, port, servicer


@pytest.fixture
def serve():
    servers = []

    def make(interceptor, credentials=None):
        server, port, servicer = start_server(interceptor, credentials)
        servers.append(server)
        return port, servicer

    yield make
    for s in servers:
        s.stop(None)


def check(channel):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def protecting_check(token, **kwargs):
    return BearerTokenInterceptor(token, control_methods={HEALTH_CHECK}, **kwargs)


def test_plaintext_token_accepted_and_missing_or_wrong_refused(serve):
    port, servicer = serve(protecting_check(TOKEN))
    with client_channel(f"127.0.0.1:{port}", token=TOKEN) as ch:
        assert check(ch).status == health_pb2.HealthCheckResponse.SERVING
    assert servicer.callers[0].startswith("ipv4:127.0.0.1:")
    assert servicer.callers[0].endswith(f"token={auth.token_fingerprint(TOKEN)}")
    with client_channel(f"127.0.0.1:{port}") as ch:
        code, details = code_of(lambda: check(ch))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details and "LLMWATTS_CONTROL_TOKEN" in details
    with client_channel(f"127.0.0.1:{port}", token="wrong") as ch:
        code, details = code_of(lambda: check(ch))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong" in details
    assert TOKEN not in details
    assert len(servicer.callers) == 1  # refused calls never reached the servicer


def test_unprotected_methods_pass_without_token(serve):
    port, _ = serve(BearerTokenInterceptor(TOKEN))  # protects only SetPowerCap/ResetPowerCap
    with client_channel(f"127.0.0.1:{port}") as ch:
        assert check(ch).status == health_pb2.HealthCheckResponse.SERVING


def test_streaming_methods_are_refused_too(serve):
    port, _ = serve(BearerTokenInterceptor(TOKEN, control_methods={HEALTH_WATCH}))
    with client_channel(f"127.0.0.1:{port}") as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        code, _ = code_of(lambda: next(stream))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_no_control_token_refuses_mutations_with_the_fix(serve):
    port, _ = serve(protecting_check(None))
    with client_channel(f"127.0.0.1:{port}", token=TOKEN) as ch:
        code, details = code_of(lambda: check(ch))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "LLMWATTS_CONTROL_TOKEN" in details and "--allow-insecure-loopback-control" in details


def test_loopback_allow_flag_lets_mutations_through_only_on_loopback(serve):
    port, _ = serve(protecting_check(None, loopback_only=True, allow_insecure_loopback_control=True))
    with client_channel(f"127.0.0.1:{port}") as ch:
        assert check(ch).status == health_pb2.HealthCheckResponse.SERVING
    not_loopback = protecting_check(None, loopback_only=False, allow_insecure_loopback_control=True)
    assert not_loopback.check(HEALTH_CHECK, [])[0] == grpc.StatusCode.PERMISSION_DENIED
    flag_missing = protecting_check(None, loopback_only=True)
    assert flag_missing.check(HEALTH_CHECK, [])[0] == grpc.StatusCode.PERMISSION_DENIED


def test_inference_token_protects_inference_methods():
    i = BearerTokenInterceptor(TOKEN, inference_token="inf")
    generate = "/llmwatts.v1.Inference/Generate"
    assert i.check(generate, [])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert i.check(generate, [("authorization", "Bearer inf")]) is None
    assert i.check(generate, [("authorization", f"Bearer {TOKEN}")])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert BearerTokenInterceptor(TOKEN).check(generate, []) is None
    assert i.check("/llmwatts.v1.Control/SetPowerCap", [("authorization", f"Bearer {TOKEN}")]) is None
    assert i.check("/llmwatts.v1.Control/ResetPowerCap", [("authorization", f"Basic {TOKEN}")])[0] == grpc.StatusCode.UNAUTHENTICATED


def test_from_config_reads_host_and_flags():
    from llmwatts.server.config import ServerConfig

    i = BearerTokenInterceptor.from_config(ServerConfig(host="127.0.0.1", allow_insecure_loopback_control=True))
    assert i.check("/llmwatts.v1.Control/SetPowerCap", []) is None
    i = BearerTokenInterceptor.from_config(ServerConfig(host="0.0.0.0", allow_insecure_loopback_control=True))
    assert i.check("/llmwatts.v1.Control/SetPowerCap", [])[0] == grpc.StatusCode.PERMISSION_DENIED


def test_tls_with_token(serve, pki):
    port, servicer = serve(protecting_check(TOKEN), server_credentials(pki["server_cert"], pki["server_key"]))
    with client_channel(f"localhost:{port}", ca=pki["ca"], token=TOKEN) as ch:
        assert check(ch).status == health_pb2.HealthCheckResponse.SERVING
    with client_channel(f"localhost:{port}", ca=pki["ca"], token="wrong") as ch:
        assert code_of(lambda: check(ch))[0] == grpc.StatusCode.UNAUTHENTICATED
    # A plaintext client cannot talk to a TLS server.
    with client_channel(f"localhost:{port}", token=TOKEN) as ch:
        assert code_of(lambda: check(ch))[0] == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_cert_from_the_ca(serve, pki):
    creds = server_credentials(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    port, servicer = serve(protecting_check(TOKEN), creds)
    target = f"localhost:{port}"
    with client_channel(target, ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"], token=TOKEN) as ch:
        assert check(ch).status == health_pb2.HealthCheckResponse.SERVING
    assert "cn=alice" in servicer.callers[-1]
    with client_channel(target, ca=pki["ca"], token=TOKEN) as ch:  # no client cert
        assert code_of(lambda: check(ch))[0] == grpc.StatusCode.UNAVAILABLE
    with client_channel(target, ca=pki["ca"], cert=pki["rogue_cert"], key=pki["rogue_key"], token=TOKEN) as ch:
        assert code_of(lambda: check(ch))[0] == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.callers) == 1


def test_client_cert_needs_key():
    with pytest.raises(InvalidArgument, match="--cert and --key"):
        client_channel("localhost:1", cert="c.pem")


def test_load_token_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMWATTS_CONTROL_TOKEN", raising=False)
    monkeypatch.delenv("LLMWATTS_CONTROL_TOKEN_FILE", raising=False)
    assert load_token() is None
    monkeypatch.setenv("LLMWATTS_CONTROL_TOKEN", "  from-env \n")
    assert load_token() == "from-env"
    env_file = tmp_path / "env-token"
    env_file.write_text("from-env-file\n")
    env_file.chmod(0o600)
    monkeypatch.setenv("LLMWATTS_CONTROL_TOKEN_FILE", str(env_file))
    assert load_token() == "from-env-file"
    flag_file = tmp_path / "flag-token"
    flag_file.write_text("from-flag\n")
    assert load_token(path=flag_file) == "from-flag"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InvalidArgument, match="empty"):
        load_token(path=tmp_path / "empty")
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_token(path=tmp_path / "missing")


def test_is_loopback_host():
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org"))
