"""`opt-ray ctl`: the control-plane client: submit, eval, status, list, watch, cancel, delete, scale,
rollback, serve, logbook, health.

Relative paths are made absolute here (the server does not share your working
directory). The token comes from ``--token-file`` or ``$OPT_RAY_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from opt_ray.config import (DEVICES, PRECISIONS, PRESETS, TrainConfig, add_dataclass_args,
                            field_default, field_help, from_args)
from opt_ray.errors import UserError
from opt_ray.run_dir import is_url
from opt_ray.serve.engine_config import CHECKPOINT_HELP

STAGE_ORDER = ("dedup", "tokenizer", "tokenize", "train", "export")


def _workers(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1:4' -> (1, 4)."""
    try:
        lo, _, hi = text.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: use N or MIN:MAX") from None


def _abs(p: str) -> str:
    """A path made absolute; a URL as it is (the server says which fields may be one)."""
    return os.path.abspath(p) if p and not is_url(p) else p


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ctl", help="control-plane client: submit, eval, status, list, watch, "
                                   "cancel, delete, scale, rollback, serve, logbook",
                       description="Talk to 'opt-ray control' over gRPC.")
    p.add_argument("--target", default=os.environ.get("OPT_RAY_CONTROL", "127.0.0.1:50051"),
                   help="control server host:port (default: $OPT_RAY_CONTROL or 127.0.0.1:50051)")
    p.add_argument("--token-file", default=None, help="bearer token file (default: $OPT_RAY_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="CA (PEM) that signed the server's certificate")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root CAs")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", default=None, help="client private key (PEM) for mutual TLS")
    p.add_argument("--json", action="store_true", help="print responses as JSON")
    cmds = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)

    s = cmds.add_parser("submit", help="submit a stage or a whole pipeline as Ray job(s)")
    # Options every KIND takes, so they may come anywhere after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default="", help="a label for the job")
    common.add_argument("--watch", action="store_true", help="watch the job after submitting it")
    _kinds = s.add_subparsers(dest="kind", metavar="KIND", required=True)

    class kinds:  # add_parser with the common options
        @staticmethod
        def add_parser(name, **kw):
            return _kinds.add_parser(name, parents=[common], **kw)
    k = kinds.add_parser("dedup", help="opt-ray dedup INPUT... --output DIR")
    k.add_argument("inputs", nargs="+")
    k.add_argument("--output", required=True)
    k.add_argument("--workers", type=int, default=0)
    k.add_argument("--threshold", type=float, default=0.0)
    k = kinds.add_parser("tokenizer", help="opt-ray tokenizer train CORPUS --vocab-size N --output DIR")
    k.add_argument("corpus")
    k.add_argument("--vocab-size", type=int, required=True)
    k.add_argument("--output", required=True)
    k = kinds.add_parser("tokenize", help="opt-ray tokenize DEDUP_DIR --tokenizer T --seq-len L --output DIR")
    k.add_argument("input")
    k.add_argument("--tokenizer", required=True)
    k.add_argument("--seq-len", type=int, required=True)
    k.add_argument("--output", required=True)
    k.add_argument("--workers", type=int, default=0)
    k = kinds.add_parser("train", help="opt-ray train --preset P --data SHARDS --output RUN_DIR ...")
    _train_args(k)
    k.add_argument("--data", required=True,
                   help="token shards (from `opt-ray tokenize`): a path, or a bucket URL "
                        "(s3://bucket/shards) under one of the server's URL --allowed-root prefixes")
    k.add_argument("--output", required=True,
                   help="the run directory: a path, or a bucket URL (s3://bucket/run) under one "
                        "of the server's URL --allowed-root prefixes")
    _eval_args(kinds.add_parser("eval", help="opt-ray eval CHECKPOINT --tasks T1,T2 ... "
                                              "(or --data SHARDS)"))
    k = kinds.add_parser("export", help="opt-ray export RUN_DIR --output HF_DIR")
    k.add_argument("run_dir")
    k.add_argument("--output", required=True)
    k.add_argument("--step", type=int, default=0)
    k = kinds.add_parser("pipeline", help="dedup -> tokenizer -> tokenize -> train -> export, "
                                          "outputs under --work-dir")
    k.add_argument("inputs", nargs="+", help="corpus files or directories")
    k.add_argument("--work-dir", required=True,
                   help="every stage writes WORK_DIR/<stage>: a directory, or a bucket prefix "
                        "(s3://bucket/p1, under one of the server's URL --allowed-root "
                        "prefixes; no stage then needs a disk the nodes share)")
    k.add_argument("--local-dir", default="",
                   help="with a bucket --work-dir: put the tokenizer and the HF export in "
                        "LOCAL_DIR/<stage> instead (default: the bucket too)")
    k.add_argument("--stages", default=",".join(STAGE_ORDER),
                   help=f"comma-separated subset, in order (default: {','.join(STAGE_ORDER)})")
    k.add_argument("--tokenizer", default="", help="use this tokenizer (skips the tokenizer stage)")
    k.add_argument("--vocab-size", type=int, default=8192)
    k.add_argument("--seq-len", type=int, default=128)
    k.add_argument("--dedup-workers", type=int, default=0)
    _train_args(k)

    _eval_args(cmds.add_parser("eval", parents=[common],
                               help="evaluate a checkpoint as a job (same as 'submit eval')"))
    cmds.add_parser("status", help="a job's state and attempts").add_argument("job")
    k = cmds.add_parser("list", help="all jobs")
    k.add_argument("--active", action="store_true")
    k.add_argument("--kind", default="")
    k = cmds.add_parser("watch", help="follow a job live until it ends")
    k.add_argument("job")
    k.add_argument("--no-logs", action="store_true")
    k.add_argument("--new-only", action="store_true", help="skip what happened before now")
    cmds.add_parser("cancel", help="stop a job").add_argument("job")
    k = cmds.add_parser("delete", help="forget finished jobs (records and control logbooks; "
                                       "artifacts stay)")
    k.add_argument("jobs", nargs="+", metavar="JOB")
    k = cmds.add_parser("scale", help="restart a training job with a new worker range")
    k.add_argument("job")
    k.add_argument("--workers", type=_workers, required=True, help="N or MIN:MAX")
    k = cmds.add_parser("rollback", help="restart a training job from a checkpoint step")
    k.add_argument("job")
    k.add_argument("--checkpoint", type=int, required=True,
                   help="checkpoint step; it must be committed (`ctl logbook JOB` lists them), "
                        "and is then kept for good (never pruned by --keep)")
    # As the OPT team intervened by hand after a divergence (OPT_FACTS.md, the logbook).
    k.add_argument("--lr", type=float, metavar="LR",
                   help="the peak LR from this checkpoint on; the divergence guard's LR factor "
                        "still multiplies it (default: the run's)")
    k.add_argument("--grad-clip", type=float, metavar="GRAD_CLIP",
                   help="gradient clipping from this checkpoint on (OPT lowered 1.0 -> 0.3; "
                        "default: the run's)")
    k = cmds.add_parser("logbook", help="a job's or run directory's logbook")
    k.add_argument("what", metavar="JOB|RUN_DIR", help="a job id, a run directory or a run's bucket URL")
    k.add_argument("--markdown", action="store_true", help="the rendered chronicle")
    cmds.add_parser("health", help="cluster and control-plane health")

    sv = cmds.add_parser("serve", help="deploy, update, remove or list serving apps")
    sa = sv.add_subparsers(dest="serve_action", metavar="ACTION", required=True)
    for name in ("deploy", "update"):
        k = sa.add_parser(name)
        k.add_argument("name")
        k.add_argument("--checkpoint", required=True,
                       help=f"{CHECKPOINT_HELP}; inside an --allowed-root of the server (a "
                            f"bucket prefix under a URL root)")
        k.add_argument("--replicas", type=int, default=0)
        k.add_argument("--max-replicas", type=int, default=0)
        k.add_argument("--http-port", type=int, default=0)
        k.add_argument("--grpc-port", type=int, default=0)
        k.add_argument("--max-num-seqs", type=int, default=0)
        k.add_argument("--tensor-parallel-size", type=int, default=0,
                       help="processes (GPUs) per replica, on one node, the model split across "
                            "them (default: 1)")
    sa.add_parser("remove").add_argument("name")
    sa.add_parser("list")
    p.set_defaults(func=run)


def _eval_args(k: argparse.ArgumentParser) -> None:
    k.add_argument("checkpoint", help="run dir, checkpoint dir or HF dir")
    k.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    k.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples per prompt (default: each task's own)")
    k.add_argument("--limit", type=float, default=0.0,
                   help="documents per task (a number < 1 is a fraction; default: all)")
    k.add_argument("--include-path", default="", help="directory of extra lm-eval YAML tasks")
    k.add_argument("--output", default="", help="results JSON file to write")
    k.add_argument("--eval-workers", type=int, default=0,
                   help="Ray actors scoring in parallel (default: the stage's)")
    k.add_argument("--eval-tp", type=int, default=0,
                   help="tensor-parallel degree: each copy of the model split over this many "
                        "of the actors, on one node (--eval-workers is a multiple; default: 1)")
    k.add_argument("--data", default="", help="token shards: perplexity instead of tasks")
    k.add_argument("--split", default="", help="shard split with --data (default: valid)")
    k.add_argument("--max-rows", type=int, default=0, help="rows with --data (default: all)")


def _train_args(k: argparse.ArgumentParser) -> None:
    """`opt-ray train`'s flags that a TrainSpec carries, with train's help texts. A flag
    left out sends the spec's zero value, which leaves train's default."""
    def flag(name: str, **kw) -> None:
        k.add_argument("--" + name.replace("_", "-"),
                       help=field_help(TrainConfig, name).replace("%", "%%"), **kw)

    flag("preset", default=field_default(TrainConfig, "preset"), choices=PRESETS)
    flag("steps", type=int, default=field_default(TrainConfig, "steps"))
    flag("workers", type=_workers, default=(1, 1), metavar="N|MIN:MAX")
    for name in ("checkpoint_every", "batch_tokens", "micro_batch", "tp"):
        flag(name, type=int, default=0)
    flag("precision", default="", choices=PRECISIONS)
    flag("device", default="", choices=DEVICES)
    for name in ("activation_checkpointing", "compile"):
        flag(name, action="store_true")
    # The recipe, the guard policy, checkpoints and fault tolerance: train's own flags,
    # derived from the same fields.
    from opt_ray.control.specs import TRAIN_NESTED, TRAIN_OPTIONAL
    add_dataclass_args(k, TrainConfig, only=(*TRAIN_OPTIONAL, *TRAIN_NESTED))


def _changed(obj) -> dict:
    """The fields of a config dataclass that differ from their defaults."""
    import dataclasses
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if getattr(obj, f.name) != field_default(type(obj), f.name)}


def _recipe(a: argparse.Namespace) -> dict:
    """TrainSpec's optional fields and nested messages (as dicts) from train's flags: what
    differs from train's defaults (unset fields are the defaults), the nested ones checked
    by their configs' rules first."""
    from opt_ray.control.specs import TRAIN_NESTED, TRAIN_OPTIONAL
    out = {n: getattr(a, n) for n in TRAIN_OPTIONAL if getattr(a, n) != field_default(TrainConfig, n)}
    for name, cls in TRAIN_NESTED.items():
        out[name] = _changed(from_args(cls, a, dest=name + "__"))
    return out


# ---------------------------------------------------------------------- specs from flags

def build_spec(a: argparse.Namespace):
    from opt_ray.v1 import control_pb2 as pb
    spec = pb.JobSpec(name=a.name)
    if a.kind == "dedup":
        spec.dedup.CopyFrom(pb.DedupSpec(inputs=[_abs(i) for i in a.inputs], output=_abs(a.output),
                                         workers=a.workers, threshold=a.threshold))
    elif a.kind == "tokenizer":
        spec.tokenizer.CopyFrom(pb.TokenizerSpec(corpus=_abs(a.corpus), vocab_size=a.vocab_size,
                                                 output=_abs(a.output)))
    elif a.kind == "tokenize":
        spec.tokenize.CopyFrom(pb.TokenizeSpec(input=_abs(a.input), tokenizer=_abs(a.tokenizer),
                                               seq_len=a.seq_len, output=_abs(a.output),
                                               workers=a.workers))
    elif a.kind == "train":
        spec.train.CopyFrom(_train_spec(a, _abs(a.data), _abs(a.output)))
    elif a.kind == "eval":
        spec.eval.CopyFrom(pb.EvalSpec(
            checkpoint=_abs(a.checkpoint), data=_abs(a.data) if a.data else "", split=a.split,
            max_rows=a.max_rows, tasks=[t.strip() for t in a.tasks.split(",") if t.strip()],
            num_fewshot=a.num_fewshot or 0, has_num_fewshot=a.num_fewshot is not None,
            limit=a.limit, include_path=_abs(a.include_path) if a.include_path else "",
            output=_abs(a.output) if a.output else "", workers=a.eval_workers, tp=a.eval_tp))
    elif a.kind == "export":
        spec.export.CopyFrom(pb.ExportSpec(run_dir=_abs(a.run_dir), output=_abs(a.output),
                                           step=a.step))
    else:
        spec.pipeline.CopyFrom(pipeline_spec(a))
    return spec


def _train_spec(a: argparse.Namespace, data: str, output: str):
    """The TrainSpec of the ``_train_args`` flags (a train job or a pipeline's stage)."""
    from opt_ray.v1 import control_pb2 as pb
    return pb.TrainSpec(preset=a.preset, data=data, output=output, min_workers=a.workers[0],
                        max_workers=a.workers[1], steps=a.steps,
                        checkpoint_every=a.checkpoint_every, batch_tokens=a.batch_tokens,
                        micro_batch=a.micro_batch, tp=a.tp, precision=a.precision, device=a.device,
                        activation_checkpointing=a.activation_checkpointing, compile=a.compile,
                        **_recipe(a))


def pipeline_spec(a: argparse.Namespace):
    """The pipeline's stages with each output under WORK_DIR, chained into the next."""
    from opt_ray.v1 import control_pb2 as pb
    wanted = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGE_ORDER]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from "
                        f"{','.join(STAGE_ORDER)}")
    if a.tokenizer and "tokenizer" in wanted:
        wanted.remove("tokenizer")
    work = _abs(a.work_dir)
    if a.local_dir and not is_url(work):
        raise UserError("--local-dir goes with a bucket --work-dir (s3://...); with a directory "
                        "--work-dir every stage writes there")
    local = _abs(a.local_dir) or work

    def under(base: str, name: str) -> str:
        return f"{base.rstrip('/')}/{name}" if is_url(base) else os.path.join(base, name)
    d = {n: under(local if n in ("tokenizer", "hf") else work, n)
         for n in ("dedup", "tokenizer", "shards", "run", "hf")}
    tokenizer = _abs(a.tokenizer) or d["tokenizer"]
    stages = []
    for name in wanted:
        st = pb.StageSpec()
        if name == "dedup":
            st.dedup.CopyFrom(pb.DedupSpec(inputs=[_abs(i) for i in a.inputs], output=d["dedup"],
                                           workers=a.dedup_workers))
        elif name == "tokenizer":
            st.tokenizer.CopyFrom(pb.TokenizerSpec(corpus=d["dedup"], vocab_size=a.vocab_size,
                                                   output=d["tokenizer"]))
        elif name == "tokenize":
            st.tokenize.CopyFrom(pb.TokenizeSpec(input=d["dedup"], tokenizer=tokenizer,
                                                 seq_len=a.seq_len, output=d["shards"],
                                                 workers=a.dedup_workers))
        elif name == "train":
            st.train.CopyFrom(_train_spec(a, d["shards"], d["run"]))
        else:
            st.export.CopyFrom(pb.ExportSpec(run_dir=d["run"], output=d["hf"]))
        stages.append(st)
    return pb.PipelineSpec(stages=stages)


# ---------------------------------------------------------------------- output

def _job_line(job) -> str:
    from opt_ray.v1 import control_pb2 as pb
    stage = (f" stage {job.stage_index + 1}/{job.stage_count}" if job.stage_count > 1 else "")
    return (f"{job.job_id:<36} {pb.JobState.Name(job.state):<9} {job.kind:<9}{stage} "
            f"{job.message}")


def _print_job(job) -> None:
    from opt_ray.v1 import control_pb2 as pb
    print(_job_line(job))
    if job.run_dir:
        print(f"  run dir: {job.run_dir}")
    for a in job.attempts:
        print(f"  {a.ray_submission_id}  {pb.JobState.Name(a.state):<9} {a.reason}")
        print(f"    {a.entrypoint}")
        if a.message:
            print(f"    {a.message}")


def _metrics_summary(line: str) -> str:
    try:
        m = json.loads(line)
    except json.JSONDecodeError:
        return line
    keys = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu")
    parts = [f"{k} {m[k]:.4g}" if isinstance(m.get(k), float) else f"{k} {m[k]}"
             for k in keys if k in m]
    return "  ".join(parts) if parts else line


def watch(client, job_id: str, *, logs: bool, from_start: bool, as_json: bool) -> int:
    """Live display: status transitions, logs as they come, a one-line metrics ticker."""
    from google.protobuf import json_format
    from opt_ray.v1 import control_pb2 as pb
    tty = sys.stdout.isatty()
    ticker = False
    last = None
    for ev in client.watch(job_id, logs=logs, metrics=True, from_start=from_start):
        if as_json:
            print(json_format.MessageToJson(ev, indent=None), flush=True)
            continue
        which = ev.WhichOneof("event")
        if which == "metrics_line" and tty:
            print("\r\033[K" + _metrics_summary(ev.metrics_line), end="", flush=True)
            ticker = True
            continue
        if ticker:
            print()
            ticker = False
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.time))
        if which == "status":
            last = ev.status
            print(f"[{stamp}] {_job_line(ev.status)}", flush=True)
        elif which == "log":
            sys.stdout.write(ev.log)
            sys.stdout.flush()
        elif which == "metrics_line":
            print(f"[{stamp}] metrics {_metrics_summary(ev.metrics_line)}", flush=True)
        else:
            print(f"[{stamp}] logbook {ev.logbook_line}", flush=True)
    if ticker:
        print()
    if last is None:
        return 1
    return 0 if last.state == pb.SUCCEEDED else 1


def _out(msg, as_json: bool, text) -> None:
    from google.protobuf import json_format
    if as_json:
        print(json_format.MessageToJson(msg, preserving_proto_field_name=True))
    else:
        text(msg)


def run(a: argparse.Namespace) -> int:
    import grpc
    from opt_ray.control.auth import read_token
    from opt_ray.control.client import ControlClient
    from opt_ray.v1 import control_pb2 as pb

    token = read_token(a.token_file)
    client = ControlClient(a.target, token, tls=a.tls, tls_ca=a.tls_ca, tls_cert=a.tls_cert,
                           tls_key=a.tls_key)
    c = a.ctl_command
    try:
        if c in ("submit", "eval"):
            if c == "eval":
                a.kind = "eval"
            job = client.submit(build_spec(a))
            _out(job, a.json, _print_job)
            if a.watch:
                return watch(client, job.job_id, logs=True, from_start=True, as_json=a.json)
        elif c == "status":
            _out(client.get(a.job), a.json, _print_job)
        elif c == "list":
            jobs = client.iter_jobs(active_only=a.active, kind=a.kind)
            if a.json:
                _out(pb.ListJobsResponse(jobs=list(jobs)), True, None)
            else:
                # Page by page: the first jobs print while later pages are fetched.
                for j in jobs:
                    print(_job_line(j), flush=True)
        elif c == "delete":
            for job_id in a.jobs:
                job = client.delete(job_id)
                _out(job, a.json, lambda j: print(f"deleted {j.job_id} "
                                                  f"({pb.JobState.Name(j.state)} {j.kind})"))
        elif c == "watch":
            return watch(client, a.job, logs=not a.no_logs, from_start=not a.new_only,
                         as_json=a.json)
        elif c == "cancel":
            _out(client.cancel(a.job), a.json, _print_job)
        elif c == "scale":
            _out(client.scale(a.job, *a.workers), a.json, _print_job)
        elif c == "rollback":
            changes = {"peak_lr": a.lr, "grad_clip": a.grad_clip}
            _out(client.rollback(a.job, a.checkpoint,
                                 **{k: v for k, v in changes.items() if v is not None}),
                 a.json, _print_job)
        elif c == "logbook":
            is_dir = is_url(a.what) or os.path.sep in a.what or os.path.isdir(a.what)
            r = (client.logbook(run_dir=_abs(a.what), markdown=a.markdown) if is_dir
                 else client.logbook(job_id=a.what, markdown=a.markdown))
            _out(r, a.json, lambda r: print(r.markdown if a.markdown and r.markdown
                                            else "\n".join(r.events)))
        elif c == "health":
            def show(h):
                print(f"{'OK' if h.ok else 'DEGRADED'}  nodes {h.alive_nodes}  active jobs "
                      f"{h.active_jobs}  dashboard {h.dashboard_url}")
                if h.metrics_endpoints:
                    print("  metrics: " + ", ".join(f"http://{m}/metrics" for m in h.metrics_endpoints))
                for comp in h.components:
                    print(f"  {'ok ' if comp.ok else 'BAD'} {comp.name}: {comp.detail}")
                if h.total_resources:
                    print("  resources (available/total): " + ", ".join(
                        f"{k} {h.available_resources.get(k, 0):g}/{v:g}"
                        for k, v in sorted(h.total_resources.items())))
            h = client.health()
            _out(h, a.json, show)
            return 0 if h.ok else 1
        elif c == "serve":
            sa = a.serve_action
            if sa in ("deploy", "update"):
                spec = pb.ServeSpec(name=a.name, checkpoint=_abs(a.checkpoint),
                                    replicas=a.replicas, max_replicas=a.max_replicas,
                                    http_port=a.http_port, grpc_port=a.grpc_port,
                                    max_num_seqs=a.max_num_seqs,
                                    tensor_parallel_size=a.tensor_parallel_size)
                app = client.deploy_serve(spec) if sa == "deploy" else client.update_serve(spec)
            elif sa == "remove":
                app = client.remove_serve(a.name)
            else:
                _out(pb.ListServeResponse(apps=client.list_serve()), a.json,
                     lambda r: [print(f"{x.name:<20} {pb.JobState.Name(x.state):<9} {x.job_id} "
                                      f"{x.spec.checkpoint}") for x in r.apps])
                return 0
            _out(app, a.json, lambda x: print(f"{x.name}: {pb.JobState.Name(x.state)} "
                                              f"(job {x.job_id}) {x.message}"))
        return 0
    except grpc.RpcError as e:
        code = e.code()
        print(f"opt-ray ctl {c}: {code.name}: {e.details()}", file=sys.stderr)
        return 2 if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                             grpc.StatusCode.UNAUTHENTICATED,
                             grpc.StatusCode.FAILED_PRECONDITION) else 1
    finally:
        client.close()
