"""The committed gRPC stubs are exactly what `make proto` generates from protos/."""

from __future__ import annotations

from pathlib import Path

from opt_ray.control import protogen


def test_committed_stubs_match_the_protos(tmp_path):
    generated = protogen.generate(tmp_path)
    assert generated, "no stubs generated"
    stale = []
    for path in generated:
        rel = path.relative_to(tmp_path)
        committed = protogen.ROOT / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    assert not stale, f"stale or missing stubs {stale}: run `make proto` and commit them"
    names = {p.relative_to(tmp_path).as_posix() for p in generated}
    assert "opt_ray/v1/control_pb2_grpc.py" in names


def test_control_service_has_the_promised_methods():
    from opt_ray.v1 import control_pb2 as pb
    methods = set(pb.DESCRIPTOR.services_by_name["ControlService"].methods_by_name)
    assert methods >= {"SubmitJob", "GetJob", "ListJobs", "WatchJob", "CancelJob", "ScaleJob",
                       "RollbackJob", "DeployServe", "UpdateServe", "RemoveServe",
                       "ReadLogbook", "ClusterHealth", "DeleteJob"}
    assert pb.DESCRIPTOR.package == "opt_ray.v1"


def test_regenerating_one_proto_writes_only_its_stubs(tmp_path):
    """`python -m opt_ray.control.protogen control.proto` leaves other protos' stubs alone."""
    generated = protogen.generate(tmp_path, only=["control.proto"])
    names = sorted(p.relative_to(tmp_path).as_posix() for p in generated)
    assert names == ["opt_ray/v1/control_pb2.py", "opt_ray/v1/control_pb2.pyi",
                     "opt_ray/v1/control_pb2_grpc.py"]
    on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py*"))
    assert on_disk == names
    for p in generated:
        assert p.read_bytes() == (protogen.ROOT / p.relative_to(tmp_path)).read_bytes()
