"""``ControlClient``: the Python client of the control plane (``opt-ray ctl`` is built on it).

    from opt_ray.control.client import ControlClient
    with ControlClient("127.0.0.1:50051", token=...) as c:
        job = c.submit(pb.JobSpec(dedup=pb.DedupSpec(inputs=[...], output=...)))
        for ev in c.watch(job.job_id):
            ...
        print(c.get(job.job_id).state)

The bearer token is sent as call metadata on every call. With ``tls_ca`` (or
``tls=True`` for system roots) the channel is TLS; ``tls_cert``/``tls_key`` add a client
certificate for mutual TLS. gRPC errors surface as ``grpc.RpcError`` with the server's
status code and message (INVALID_ARGUMENT names the field and the fix).
"""

from __future__ import annotations

import time
from typing import Iterator

import grpc

from opt_ray.control.auth import channel_credentials
from opt_ray.control.registry import TERMINAL
from opt_ray.v1 import control_pb2 as pb
from opt_ray.v1 import control_pb2_grpc as pb_grpc


class ControlClient:
    def __init__(self, target: str, token: str, *, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 timeout: float = 60.0):
        if tls or tls_ca or tls_cert:
            self.channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ControlServiceStub(self.channel)
        # A token read from a file keeps its newline, which gRPC refuses as a header value
        # ("Illegal header value"); the server strips its own copy the same way.
        self._md = (("authorization", f"Bearer {token.strip()}"),)
        self.timeout = timeout

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request, timeout: float | None = None):
        return getattr(self.stub, method)(request, metadata=self._md,
                                          timeout=timeout or self.timeout)

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: pb.JobSpec) -> pb.Job:
        return self._call("SubmitJob", pb.SubmitJobRequest(spec=spec))

    def get(self, job_id: str) -> pb.Job:
        return self._call("GetJob", pb.GetJobRequest(job_id=job_id))

    def list(self, *, active_only: bool = False, kind: str = "") -> list[pb.Job]:
        """Every job (all pages), oldest first."""
        return list(self.iter_jobs(active_only=active_only, kind=kind))

    def iter_jobs(self, *, active_only: bool = False, kind: str = "",
                  page_size: int = 0) -> Iterator[pb.Job]:
        """Jobs page by page (``ListJobs`` is paged: one page stays under gRPC's
        message limit however many jobs the server keeps)."""
        token = ""
        while True:
            resp = self._call("ListJobs", pb.ListJobsRequest(active_only=active_only, kind=kind,
                                                             page_size=page_size,
                                                             page_token=token))
            yield from resp.jobs
            token = resp.next_page_token
            if not token:
                return

    def delete(self, job_id: str) -> pb.Job:
        """Forget a finished job (its record and control logbook; artifacts stay)."""
        return self._call("DeleteJob", pb.DeleteJobRequest(job_id=job_id))

    def watch(self, job_id: str, *, logs: bool = True, metrics: bool = True,
              from_start: bool = True, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """Events until the job is final (the stream then ends). ``timeout`` bounds the
        whole stream (default: none)."""
        req = pb.WatchJobRequest(job_id=job_id, include_logs=logs, include_metrics=metrics,
                                 from_start=from_start)
        return self.stub.WatchJob(req, metadata=self._md, timeout=timeout)

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 1.0) -> pb.Job:
        """Poll until the job is final; raises TimeoutError with its last state."""
        deadline = time.time() + timeout
        while True:
            job = self.get(job_id)
            if job.state in TERMINAL:
                return job
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {pb.JobState.Name(job.state)} after "
                                   f"{timeout:.0f} s: {job.message}")
            time.sleep(poll)

    def cancel(self, job_id: str) -> pb.Job:
        return self._call("CancelJob", pb.CancelJobRequest(job_id=job_id))

    def scale(self, job_id: str, min_workers: int, max_workers: int = 0) -> pb.Job:
        return self._call("ScaleJob", pb.ScaleJobRequest(job_id=job_id, min_workers=min_workers,
                                                         max_workers=max_workers), timeout=300)

    def rollback(self, job_id: str, checkpoint_step: int, **optim) -> pb.Job:
        """Restart a training job from ``checkpoint_step``; ``optim``: OptimSpec fields
        that change from there on (``peak_lr=6e-5, grad_clip=0.3``)."""
        return self._call("RollbackJob", pb.RollbackJobRequest(
            job_id=job_id, checkpoint_step=checkpoint_step, optim=pb.OptimSpec(**optim)),
            timeout=300)

    # ------------------------------------------------------------------ serving

    def deploy_serve(self, spec: pb.ServeSpec) -> pb.ServeApp:
        return self._call("DeployServe", pb.DeployServeRequest(spec=spec))

    def update_serve(self, spec: pb.ServeSpec) -> pb.ServeApp:
        return self._call("UpdateServe", pb.UpdateServeRequest(spec=spec), timeout=300)

    def remove_serve(self, name: str) -> pb.ServeApp:
        return self._call("RemoveServe", pb.RemoveServeRequest(name=name), timeout=300)

    def list_serve(self) -> list[pb.ServeApp]:
        return list(self._call("ListServe", pb.ListServeRequest()).apps)

    # ------------------------------------------------------------------ logbook, health

    def logbook(self, *, job_id: str = "", run_dir: str = "",
                markdown: bool = False) -> pb.ReadLogbookResponse:
        req = (pb.ReadLogbookRequest(job_id=job_id, markdown=markdown) if job_id
               else pb.ReadLogbookRequest(run_dir=run_dir, markdown=markdown))
        return self._call("ReadLogbook", req)

    def health(self) -> pb.ClusterHealthResponse:
        return self._call("ClusterHealth", pb.ClusterHealthRequest())
