"""deploy/ stays runnable: every file parses, has what its tool requires, its `opt-ray`
commands parse with the real CLI, and images and versions agree with pyproject.toml."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from opt_ray.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE_RE = re.compile(r"ghcr\.io/opt-ray/opt-ray:(?P<ver>[0-9.]+)-ray(?P<ray>[0-9.]+)"
                      r"-py(?P<py>\d)(?P<pyminor>\d+)-(?P<cuda>cu\d+)")
YAMLS = sorted(DEPLOY.rglob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strings(obj):
    """Every string value in a parsed YAML tree."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def opt_ray_commands(text: str) -> list[str]:
    """`opt-ray SUBCOMMAND ...` command lines in text, comments included: a command starts
    a line (after `#`, `-`, `$` or YAML's `>-`) or follows a `-- ` (ray job submit), and
    runs to the end of the line with `\\` continuations joined and a trailing comment cut.
    Prose mentions of opt-ray in the middle of a sentence are not commands."""
    lines = [re.sub(r"^\s*#\s?", "", l) for l in text.splitlines()]
    joined, buf = [], ""
    for l in lines:
        buf = f"{buf} {l.strip()}" if buf else l
        if buf.rstrip().endswith("\\"):
            buf = buf.rstrip()[:-1]
            continue
        joined.append(buf)
        buf = ""
    subs = "|".join(map(re.escape, COMMANDS))
    pat = re.compile(rf"(?:^[\s$>-]*|--\s+|\"\s*)(opt-ray\s+(?:{subs})\b[^#`\"]*)")
    cmds = []
    for l in joined:
        for m in pat.finditer(l):
            cmds.append(" ".join(m.group(1).split()))
    return cmds


def test_there_is_a_config_for_each_tool():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert {"cluster-a100.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
            "kuberay/rayservice.yaml", "serve-config.yaml", "Dockerfile", "README.md"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    assert docs(path), f"{path} is empty"


def test_cluster_launcher_has_required_keys_and_a100_workers():
    (c,) = docs(DEPLOY / "cluster-a100.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "docker", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in c, f"cluster launcher config lacks {key}"
    assert c["provider"]["type"] in ("aws", "gcp", "azure")
    assert c["head_node_type"] in c["available_node_types"]
    gpu_types = [t for t in c["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu_types, "no GPU node type"
    for t in gpu_types:
        assert t["node_config"]["InstanceType"].startswith(("p4d.", "p4de.")), "not an A100 instance"
        assert t["resources"]["GPU"] == 8 and "accelerator_type:A100" in t["resources"]
        assert t["max_workers"] <= c["max_workers"]
    assert any("ray start --head" in cmd for cmd in c["head_start_ray_commands"])
    assert all("auto" not in cmd for cmd in c["worker_start_ray_commands"])


def _pod_specs(raycluster_spec: dict) -> list[dict]:
    specs = [raycluster_spec["headGroupSpec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in raycluster_spec["workerGroupSpecs"]]
    return specs


def kuberay_objects():
    out = []
    for path in (DEPLOY / "kuberay").glob("*.yaml"):
        for d in docs(path):
            out.append((path.name, d))
    return out


def _cluster_spec(obj: dict) -> dict | None:
    kind, spec = obj["kind"], obj["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}.get(kind)


def test_kuberay_objects_are_well_formed():
    kinds = {}
    claims_defined = set()
    for name, obj in kuberay_objects():
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(obj), name
        kinds[obj["kind"]] = name
        if obj["kind"] == "PersistentVolumeClaim":
            claims_defined.add(obj["metadata"]["name"])
            continue
        assert obj["apiVersion"] == "ray.io/v1", name
        cs = _cluster_spec(obj)
        assert cs is not None, f"{name}: {obj['kind']} without a cluster spec"
        assert "rayVersion" in cs and cs["workerGroupSpecs"], name
        for g in cs["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{name}: {g['groupName']}"
            (c,) = g["template"]["spec"]["containers"]
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{name}: worker without GPUs"
            assert "A100" in g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert {"RayCluster", "RayJob", "RayService"} <= set(kinds)
    # Every volume claim the pods use is defined (in raycluster.yaml).
    used = {v["persistentVolumeClaim"]["claimName"] for _, obj in kuberay_objects()
            if _cluster_spec(obj) for spec in _pod_specs(_cluster_spec(obj))
            for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    assert used and used <= claims_defined


def all_commands() -> list[tuple[str, str]]:
    """Commands in comments and docs, and in YAML values (a RayJob's entrypoint)."""
    out = []
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        where = path.relative_to(DEPLOY).as_posix()
        text = path.read_text()
        if path.suffix == ".yaml":
            comments = "\n".join(l for l in text.splitlines() if l.lstrip().startswith("#"))
            cmds = opt_ray_commands(comments)
            for d in docs(path):
                for v in strings(d):
                    parts = v.split()
                    if len(parts) > 1 and parts[0] == "opt-ray" and parts[1] in COMMANDS:
                        cmds.append(" ".join(parts))
        else:
            cmds = opt_ray_commands(text)
        out += [(where, c) for c in dict.fromkeys(cmds)]
    return out


def test_commands_are_found():
    cmds = all_commands()
    subs = {c.split()[1] for _, c in cmds}
    assert {"train", "logbook"} <= subs, cmds
    (job,) = [obj for _, obj in kuberay_objects() if obj["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"].startswith("opt-ray train ")


@pytest.mark.parametrize("where,cmd", all_commands(), ids=lambda x: x if "/" in x or "." in x else None)
def test_commands_parse_with_the_real_cli(where, cmd):
    parser = build_parser()
    argv = shlex.split(cmd)[1:]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{cmd}` does not parse with opt-ray's CLI (exit {e.code})")
    assert args.command == argv[0]
    # Deploy configs never point Ray at "auto": drivers get RAY_ADDRESS from the job.
    assert getattr(args, "address", None) in (None,)


def test_image_and_versions_agree_with_pyproject():
    found = []
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            found += [(path.name, m) for m in IMAGE_RE.finditer(path.read_text())]
    assert found, "no opt-ray image referenced under deploy/"
    tags = {m.group(0) for _, m in found}
    assert len(tags) == 1, f"deploy/ uses several opt-ray images: {sorted(tags)}"
    m = found[0][1]
    assert m.group("ver") == VERSION, f"image tag {m.group(0)} != pyproject version {VERSION}"
    ray_spec = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray"))
    assert Version(m.group("ray")) in SpecifierSet(ray_spec.split("]")[-1]), (m.group("ray"), ray_spec)
    py = Version(f"{m.group('py')}.{m.group('pyminor')}")
    assert py in SpecifierSet(PYPROJECT["project"]["requires-python"])

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{m.group('ray')}-py{m.group('py')}{m.group('pyminor')}-{m.group('cuda')}"
    makefile_torch = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"torch=={makefile_torch}" in dockerfile
    assert f"whl/{m.group('cuda')}" in dockerfile

    for name, obj in kuberay_objects():
        cs = _cluster_spec(obj)
        if cs is None:
            continue
        assert cs["rayVersion"] == m.group("ray"), f"{name}: rayVersion {cs['rayVersion']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/version"] == VERSION, name
        for spec in _pod_specs(cs):
            for c in spec["containers"]:
                assert c["image"] == m.group(0), f"{name}: {c['image']}"


def _serve_apps():
    (standalone,) = docs(DEPLOY / "serve-config.yaml")
    (svc,) = [obj for _, obj in kuberay_objects() if obj["kind"] == "RayService"]
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    return standalone, embedded


def test_serve_configs_agree_and_point_at_a_real_builder():
    standalone, embedded = _serve_apps()
    assert standalone["applications"] == embedded["applications"]
    assert standalone["http_options"] == embedded["http_options"]
    for app in standalone["applications"]:
        module, _, attr = app["import_path"].partition(":")
        src = ROOT / (module.replace(".", "/") + ".py")
        assert src.is_file(), f"import_path {app['import_path']}: no {src}"
        names = {n.name for n in ast.parse(src.read_text()).body
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert attr in names, f"import_path {app['import_path']}: {module} defines no {attr}"
        deployments = {d["name"] for d in app.get("deployments", [])}
        serve_src = (ROOT / "actors" / "serve.py").read_text()
        for d in deployments:
            assert f'name="{d}"' in serve_src, f"no Serve deployment named {d} in actors/serve.py"


def _app_signature(app) -> tuple:
    """What a built Serve application would deploy: the ingress's and the engine's
    constructor arguments and the engine's replica/autoscaling settings."""
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    dc = engine._deployment_config
    auto = dc.autoscaling_config
    return (ingress.name, ingress.init_args[1:], engine.name, engine.init_args,
            dc.num_replicas if auto is None else None,
            None if auto is None else (auto.min_replicas, auto.max_replicas))


@pytest.fixture
def fake_hf(tmp_path):
    """An HF-format directory as far as checkpoint resolution goes (the builder only
    checks that it is one; no weights are loaded until a replica starts)."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_serve_args_are_accepted_by_the_builder(fake_hf):
    from actors.serve import app_builder
    from opt_ray.errors import UserError

    standalone, _ = _serve_apps()
    for app in standalone["applications"]:
        built = app_builder({**app["args"], "checkpoint": str(fake_hf)})
        assert _app_signature(built)[0] == "OpenAIIngress"
    with pytest.raises(UserError, match="unknown"):
        app_builder({"checkpoint": str(fake_hf), "replica": 2})


def test_serve_config_equals_the_documented_opt_ray_serve_command(fake_hf):
    """serve-config.yaml documents the `opt-ray serve` command it is equivalent to; both
    must build the same application (the command's mapping of flags, as in
    opt_ray/commands/serve.py, onto actors.serve.build_app)."""
    from actors.serve import app_builder, build_app
    from opt_ray.config import from_args
    from opt_ray.serve.engine import EngineConfig

    (cmd,) = [c for w, c in all_commands() if w == "serve-config.yaml" and c.split()[1] == "serve"]
    f = build_parser().parse_args(shlex.split(cmd)[1:])
    (app,) = _serve_apps()[0]["applications"]
    assert app["args"]["checkpoint"] == f.checkpoint
    from_config = app_builder({**app["args"], "checkpoint": str(fake_hf)})
    from_cli = build_app(str(fake_hf), model_name=f.model_name, replicas=f.replicas,
                         max_replicas=f.max_replicas, host=f.host, grpc_port=f.grpc_port or None,
                         engine_config=from_args(EngineConfig, f, dest="engine__"))
    assert _app_signature(from_config) == _app_signature(from_cli)
