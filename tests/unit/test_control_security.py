"""Auth, TLS and spec validation of the control server (no Ray: a backend that refuses)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opt_ray.control.auth import read_token, server_credentials
from opt_ray.control.client import ControlClient
from opt_ray.control.registry import Registry
from opt_ray.control.server import build_server, stop_server
from opt_ray.control.service import ControlService
from opt_ray.control.specs import SpecError, SpecValidator
from opt_ray.errors import UserError
from opt_ray.v1 import control_pb2 as pb

TOKEN = "s3cret-token-abcdefghijklmnop"


class RefusingBackend:
    """Any submission reaching the backend is a test failure: validation comes first."""
    submitted: list = []

    def submit(self, *a):
        self.submitted.append(a)
        return a[1]

    def status(self, sid):
        from opt_ray.control.ray_jobs import RayJobStatus
        return RayJobStatus(pb.PENDING)

    def stop(self, sid): ...
    def logs(self, sid): return ""
    def health(self): return {}
    def shutdown_serve(self): ...


def _start(tmp_path, credentials=None):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    backend = RefusingBackend()
    backend.submitted = []
    service = ControlService(Registry(tmp_path / "state"), SpecValidator([root]), backend,
                             poll_interval=0.05)
    server, port = build_server(service, token=TOKEN, port=0, credentials=credentials)
    return server, service, port, root, backend


@pytest.fixture
def plain(tmp_path):
    server, service, port, root, backend = _start(tmp_path)
    yield port, root, backend
    stop_server(server, service, grace=0)


@pytest.mark.parametrize("token", [None, "wrong-token-abcdefghijklmnop", TOKEN[:-1]])
def test_missing_or_wrong_token_is_unauthenticated(plain, token):
    port, _, backend = plain
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    from opt_ray.v1 import control_pb2_grpc as pb_grpc
    stub = pb_grpc.ControlServiceStub(ch)
    md = None if token is None else (("authorization", f"Bearer {token}"),)
    for call in (lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=md, timeout=5),
                 lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="x"), metadata=md,
                                            timeout=5))):
        with pytest.raises(grpc.RpcError) as ei:
            call()
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


def test_right_token_works_and_health_needs_none(plain):
    port, _, _ = plain
    with ControlClient(f"127.0.0.1:{port}", TOKEN) as c:
        assert c.list() == []
    with ControlClient(f"127.0.0.1:{port}", TOKEN + "\n") as c:   # as read from a token file
        assert c.list() == []
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    resp = health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="opt_ray.v1.ControlService"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    ch.close()


def test_reflection_lists_the_service(plain):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    port, _, _ = plain
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert "opt_ray.v1.ControlService" in names and "grpc.health.v1.Health" in names
    ch.close()


@pytest.mark.parametrize("make_spec, field", [
    (lambda r: pb.JobSpec(dedup=pb.DedupSpec(inputs=["/etc/passwd"], output=str(r / "o"))),
     "spec.dedup.inputs[0]"),
    (lambda r: pb.JobSpec(dedup=pb.DedupSpec(inputs=[str(r / "c.txt")], output="/tmp/x")),
     "spec.dedup.output"),
    (lambda r: pb.JobSpec(dedup=pb.DedupSpec(inputs=[str(r / ".." / "c.txt")],
                                             output=str(r / "o"))),
     "spec.dedup.inputs[0]"),
    (lambda r: pb.JobSpec(dedup=pb.DedupSpec(inputs=["c.txt"], output=str(r / "o"))),
     "absolute"),
    (lambda r: pb.JobSpec(train=pb.TrainSpec(preset="tiny", data=str(r), output=str(r / "run"),
                                             min_workers=1, max_workers=100000, steps=10)),
     "spec.train.max_workers"),
    (lambda r: pb.JobSpec(train=pb.TrainSpec(preset="tiny", data=str(r), output=str(r / "run"),
                                             min_workers=4, max_workers=2, steps=10)),
     "spec.train.max_workers"),
    (lambda r: pb.JobSpec(train=pb.TrainSpec(preset="huge", data=str(r), output=str(r / "run"),
                                             min_workers=1, steps=10)),
     "spec.train.preset"),
    (lambda r: pb.JobSpec(tokenize=pb.TokenizeSpec(input=str(r), tokenizer=str(r),
                                                   seq_len=10 ** 7, output=str(r / "s"))),
     "spec.tokenize.seq_len"),
    (lambda r: pb.JobSpec(train=pb.TrainSpec(preset="tiny", data=str(r), output=str(r / "run"),
                                             min_workers=1, steps=10, batch_tokens=-5)),
     "spec.train.batch_tokens"),
    (lambda r: pb.JobSpec(train=pb.TrainSpec(preset="tiny", data=str(r), output=str(r / "run"),
                                             min_workers=1, steps=10, micro_batch=10 ** 6)),
     "spec.train.micro_batch"),
    (lambda r: pb.JobSpec(), "no job kind"),
])
def test_out_of_bounds_specs_are_invalid_argument(plain, make_spec, field):
    port, root, backend = plain
    (root / "c.txt").write_text("x")
    (root.parent / "c.txt").write_text("x")  # exists, but outside the root
    with ControlClient(f"127.0.0.1:{port}", TOKEN) as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.submit(make_spec(root))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in ei.value.details()
    assert backend.submitted == []


def test_train_spec_batch_reaches_the_command_line(tmp_path):
    v = SpecValidator([tmp_path])
    st = v.train(pb.TrainSpec(preset="tiny", data=str(tmp_path), output=str(tmp_path / "run"),
                              min_workers=1, steps=10, batch_tokens=4096, micro_batch=4))
    argv = " ".join(st.argv)
    assert "--batch-tokens 4096" in argv and "--micro-batch 4" in argv
    default = v.train(pb.TrainSpec(preset="tiny", data=str(tmp_path),
                                   output=str(tmp_path / "run"), min_workers=1, steps=10))
    assert "--batch-tokens" not in default.argv and "--micro-batch" not in default.argv


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    with pytest.raises(SpecError, match="outside the allowed roots"):
        SpecValidator([root]).path("x", str(root / "escape" / "passwd"))


def test_pipeline_inputs_may_come_from_earlier_stages(tmp_path):
    v = SpecValidator([tmp_path])
    (tmp_path / "c.txt").write_text("x")
    spec = pb.JobSpec(pipeline=pb.PipelineSpec(stages=[
        pb.StageSpec(dedup=pb.DedupSpec(inputs=[str(tmp_path / "c.txt")], output=str(tmp_path / "d"))),
        pb.StageSpec(tokenizer=pb.TokenizerSpec(corpus=str(tmp_path / "d"), vocab_size=300,
                                                output=str(tmp_path / "t")))]))
    kind, stages = v.job(spec)
    assert kind == "pipeline" and [s.kind for s in stages] == ["dedup", "tokenizer"]
    spec.pipeline.stages[1].tokenizer.corpus = str(tmp_path / "nope")
    with pytest.raises(SpecError, match=r"stages\[1\].tokenizer.corpus.*does not exist"):
        v.job(spec)


def test_token_sources(tmp_path, monkeypatch):
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    assert read_token(f) == TOKEN
    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    assert read_token(None) == TOKEN
    monkeypatch.setenv("OPT_RAY_TOKEN", "short")
    with pytest.raises(UserError, match="at least 16"):
        read_token(None)
    monkeypatch.delenv("OPT_RAY_TOKEN")
    with pytest.raises(UserError, match="--token-file"):
        read_token(None)


# ---------------------------------------------------------------------- TLS

def _self_signed(tmp_path: Path, name: str, ca=None):
    """A certificate for 127.0.0.1 / localhost; self-signed, or signed by ``ca``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (ca[0].subject, ca[1]) if ca else (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                   critical=False)
               .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True))
    cert = builder.sign(issuer_key, hashes.SHA256())
    cp, kp = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cert, key, str(cp), str(kp)


def test_tls_server_refuses_plaintext_and_serves_tls(tmp_path):
    _, _, cert, key = _self_signed(tmp_path, "server")
    server, service, port, _, _ = _start(tmp_path, server_credentials(cert, key))
    try:
        with ControlClient(f"127.0.0.1:{port}", TOKEN, timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as ei:
                plain.list()
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with ControlClient(f"127.0.0.1:{port}", TOKEN, tls_ca=cert, timeout=5) as tls:
            assert tls.list() == []
        with ControlClient(f"127.0.0.1:{port}", "wrong-token-abcdefghijkl", tls_ca=cert,
                           timeout=5) as bad:
            with pytest.raises(grpc.RpcError) as ei:
                bad.list()
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop_server(server, service, grace=0)


def test_mutual_tls_requires_a_client_certificate(tmp_path):
    ca_cert, ca_key, ca_path, _ = _self_signed(tmp_path, "ca")
    _, _, cert, key = _self_signed(tmp_path, "server", ca=(ca_cert, ca_key))
    _, _, ccert, ckey = _self_signed(tmp_path, "client", ca=(ca_cert, ca_key))
    server, service, port, _, _ = _start(tmp_path, server_credentials(cert, key, ca_path))
    try:
        with ControlClient(f"127.0.0.1:{port}", TOKEN, tls_ca=ca_path, timeout=5) as no_cert:
            with pytest.raises(grpc.RpcError) as ei:
                no_cert.list()
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with ControlClient(f"127.0.0.1:{port}", TOKEN, tls_ca=ca_path, tls_cert=ccert,
                           tls_key=ckey, timeout=5) as ok:
            assert ok.list() == []
    finally:
        stop_server(server, service, grace=0)
