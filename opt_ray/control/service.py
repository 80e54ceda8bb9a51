"""``ControlService``: the gRPC servicer. Specs in, Ray jobs out, state in the registry.

Life of a job: ``SubmitJob`` validates the spec (``specs.SpecValidator``), plans one
command line per stage, records the job, then submits stage 0 as a Ray job whose
submission id is ``opt-ray-<job_id>-<attempt>``. A reconciler thread polls Ray for every
active job, records state changes, submits a pipeline's next stage when the previous
one succeeded, and writes control events to the job's logbook. Because the record is
written before Ray is asked, and the reconciler only needs the submission id, a
restarted server picks every job up where it was: that is the reattach.

Scale and rollback of training stop the Ray job, wait until it has exited (so two
trainers never write one run directory), then resubmit the training stage with the new
worker range (resuming from the latest checkpoint) or with ``--resume-from STEP``.
Serving applications are long-lived Ray jobs with an ``opt-ray serve`` entrypoint.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc

from opt_ray import metrics
from opt_ray.control.ray_jobs import JobBackend, JobNotFound, RayJobStatus, entrypoint
from opt_ray.control.registry import TERMINAL, Registry, parse_json, read_jsonl_from
from opt_ray.control.specs import SpecError, SpecValidator, Stage
from opt_ray.errors import UserError
from opt_ray.logbook import LOGBOOK
from opt_ray.run_dir import MARK, RunMirror, is_url, local_run_dir, store_errors
from opt_ray.v1 import control_pb2 as pb
from opt_ray.v1 import control_pb2_grpc as pb_grpc

STATE_NAMES = {v: k for k, v in pb.JobState.items()}

M_SUBMITTED = metrics.counter("control_jobs_submitted", "control jobs accepted by SubmitJob",
                              ("kind",))
M_RAY_JOBS = metrics.counter("control_ray_jobs_submitted",
                             "Ray jobs submitted by the control plane (stages, resubmissions)",
                             ("stage", "reason"))
M_FINISHED = metrics.counter("control_jobs_finished", "control jobs that reached a final state",
                             ("kind", "state"))
M_ACTIONS = metrics.counter("control_actions", "cancel / scale / rollback / serve actions",
                            ("action",))
M_ACTIVE = metrics.gauge("control_active_jobs", "control jobs not yet in a final state")
M_REJECTED = metrics.counter("control_unauthenticated", "calls rejected for a missing or "
                             "wrong bearer token")
M_INVALID = metrics.counter("control_invalid_specs", "specs rejected with INVALID_ARGUMENT")


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
PAGE_BYTES = 2 * 1024 * 1024


def _encode_token(created: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, job_id]).encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), str(job_id)
    except (ValueError, TypeError) as e:
        raise SpecError("page_token is not one this server issued; pass the "
                        "next_page_token of the previous ListJobs response") from e


class NotFound(LookupError):
    pass


class Precondition(RuntimeError):
    pass


class Unavailable(RuntimeError):
    pass


@contextlib.contextmanager
def _status(context: grpc.ServicerContext):
    """Map the service's exceptions to gRPC status codes (context.abort raises)."""
    try:
        yield
    except UserError as e:
        M_INVALID.inc()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except NotFound as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except Precondition as e:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except (Unavailable, OSError) as e:  # requests' ConnectionError is an OSError
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


class ControlService(pb_grpc.ControlServiceServicer):
    def __init__(self, registry: Registry, validator: SpecValidator, backend: JobBackend, *,
                 opt_ray_bin: str = "opt-ray", poll_interval: float = 1.0,
                 stop_timeout: float = 120.0, submit_timeout: float = 300.0):
        self.registry = registry
        self.validator = validator
        self.backend = backend
        self.opt_ray_bin = opt_ray_bin
        self.poll_interval = poll_interval
        self.stop_timeout = stop_timeout
        self.submit_timeout = submit_timeout
        # One lock orders every state change of every job; Ray calls made under it are
        # short HTTP requests. Jobs being stopped-and-resubmitted are in _busy so the
        # reconciler does not read their intermediate STOPPED as the job's end.
        self._lock = threading.RLock()
        self._busy: set[str] = set()
        self._unsettled: set[str] = set()  # final jobs whose last Ray job may still run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pulled: dict[str, float] = {}  # bucket run URL -> when it was last pulled

    def _run_files(self, run_dir: str, *, every: float = 2.0) -> Path:
        """The directory a run's logbook and metrics are read from: the run directory,
        or for a bucket URL the server's staging copy, pulled from the bucket when the last
        pull is older than ``every`` seconds (a pull whose mark is current is one GET)."""
        if is_url(run_dir) and time.monotonic() - self._pulled.get(run_dir, -every) >= every:
            self._pulled[run_dir] = time.monotonic()
            try:
                RunMirror(run_dir).pull()
            except Exception as e:  # the bucket unreachable now: serve the last copy
                print(f"control: could not read {run_dir}: {type(e).__name__}: {e}", flush=True)
        return local_run_dir(run_dir)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the reconciler; it immediately reattaches to the registry's active jobs
        (and settles the records of cancelled jobs whose Ray job had not ended yet)."""
        self._unsettled |= {j.job_id for j in self.registry.jobs()
                            if j.state in TERMINAL and j.attempts
                            and j.attempts[-1].state not in TERMINAL}
        self._thread = threading.Thread(target=self._reconcile_loop, name="opt-ray-reconciler",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            ids = self.registry.active_job_ids()
            with self._lock:
                unsettled = sorted(self._unsettled)
            for job_id in ids + unsettled:
                try:
                    self.reconcile(job_id)
                except Exception as e:  # keep reconciling the others; health shows Ray errors
                    print(f"opt-ray control: reconcile {job_id}: {type(e).__name__}: {e}",
                          flush=True)
            M_ACTIVE.set(len(ids))
            self._stop.wait(self.poll_interval)

    # ------------------------------------------------------------------ core

    def _event(self, job: pb.Job, event: str, **fields) -> None:
        self.registry.logbook(job.job_id).event(event, job_id=job.job_id, source="control",
                                                **fields)

    def _submit_stage(self, job: pb.Job, index: int, reason: str) -> pb.Job:
        """Record attempt N for stage ``index``, then submit it to Ray. The record comes
        first so that a crash in between leaves an attempt the next server submits."""
        plan = job.plan[index]
        sid = f"opt-ray-{job.job_id}-{len(job.attempts) + 1}"
        ep = entrypoint(self.opt_ray_bin, list(plan.argv))
        job.attempts.add(ray_submission_id=sid, stage=plan.kind, entrypoint=ep,
                         state=pb.PENDING, reason=reason, start_time=time.time())
        job.stage_index = index
        job.state = pb.PENDING if index == 0 else pb.RUNNING
        job.message = f"{plan.kind}: submitting Ray job {sid}"
        self.registry.put_job(job)
        self._try_submit(job)
        return job

    def _try_submit(self, job: pb.Job) -> None:
        """Submit the last attempt. Failures are retried by the reconciler until
        ``submit_timeout`` (a node's job agent needs a while after ``ray start``; Ray
        may be restarting); then the attempt and the job fail with Ray's error."""
        att = job.attempts[-1]
        try:
            self.backend.submit(att.entrypoint, att.ray_submission_id,
                                {"opt_ray_job": job.job_id, "stage": att.stage,
                                 "reason": att.reason[:100]})
        except Exception as e:  # whatever Ray says, it is reported on the job
            err = f"{type(e).__name__}: {e}"
            if time.time() - att.start_time > self.submit_timeout:
                att.state = job.state = pb.FAILED
                att.message = job.message = f"Ray refused the job: {err}"
                att.end_time = time.time()
                self._event(job, "stage_submit_failed", stage=att.stage, error=err)
                M_FINISHED.inc(tags={"kind": job.kind, "state": "FAILED"})
            else:
                job.message = f"{att.stage}: waiting for Ray's job server: {err}"
            self.registry.put_job(job)
            return
        att.submitted = True
        job.message = f"{att.stage}: submitted as Ray job {att.ray_submission_id}"
        self.registry.put_job(job)
        M_RAY_JOBS.inc(tags={"stage": att.stage, "reason": att.reason.split()[0]})
        self._event(job, "stage_submitted", stage=att.stage, index=job.stage_index,
                    ray_submission_id=att.ray_submission_id, entrypoint=att.entrypoint,
                    reason=att.reason)

    def reconcile(self, job_id: str) -> pb.Job | None:
        """Bring one job's record up to date with Ray; advance pipelines."""
        with self._lock:
            job = self.registry.get_job(job_id)
            if job is None or job_id in self._busy or not job.attempts:
                return job
            att = job.attempts[-1]
            if job.state in TERMINAL and att.state in TERMINAL:
                self._unsettled.discard(job_id)
                return job
            if not att.submitted:
                if job.state in TERMINAL:  # cancelled before Ray ever had it
                    att.state, att.message = pb.STOPPED, "never submitted"
                    self.registry.put_job(job)
                else:
                    self._try_submit(job)
                return job
            try:
                st = self.backend.status(att.ray_submission_id)
            except JobNotFound:
                st = RayJobStatus(pb.FAILED, f"Ray has no job {att.ray_submission_id}: the "
                                             f"cluster was restarted or the submission never "
                                             f"reached it; resubmit the job")
            changed = (st.state, st.message) != (att.state, att.message)
            att.state, att.message = st.state, st.message
            if st.end_time:
                att.end_time = st.end_time
            if job.state in TERMINAL:  # cancelled: only settle the attempt's record
                if changed:
                    self.registry.put_job(job)
                return job
            if not changed:
                return job
            self._event(job, "stage_state", stage=att.stage, state=STATE_NAMES[st.state],
                        ray_submission_id=att.ray_submission_id, message=st.message)
            if st.state == pb.SUCCEEDED and job.stage_index + 1 < len(job.plan):
                i = job.stage_index + 1
                return self._submit_stage(job, i, f"pipeline stage {i + 1}/{len(job.plan)}")
            job.state = st.state if (st.state != pb.PENDING or job.stage_index == 0) else pb.RUNNING
            job.message = f"{att.stage}: {STATE_NAMES[st.state]}" + (f": {st.message}"
                                                                     if st.message else "")
            self.registry.put_job(job)
            if job.state in TERMINAL:
                M_FINISHED.inc(tags={"kind": job.kind, "state": STATE_NAMES[job.state]})
                self._event(job, "job_finished", state=STATE_NAMES[job.state],
                            message=job.message)
            return job

    def _job(self, job_id: str) -> pb.Job:
        if not job_id:
            raise SpecError("job_id is required")
        job = self.registry.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}; 'opt-ray ctl list' shows the known jobs")
        return job

    def _stop_and_wait(self, job: pb.Job) -> None:
        """Stop the job's current Ray job and wait until Ray reports it ended."""
        att = job.attempts[-1]
        if att.state in TERMINAL:
            return
        if not att.submitted:
            att.state, att.message = pb.STOPPED, "never submitted"
            return
        try:
            self.backend.stop(att.ray_submission_id)
        except JobNotFound:
            return
        deadline = time.time() + self.stop_timeout
        while time.time() < deadline:
            try:
                st = self.backend.status(att.ray_submission_id)
            except JobNotFound:
                return
            if st.state in TERMINAL:
                att.state, att.message, att.end_time = st.state, st.message, st.end_time or time.time()
                return
            time.sleep(0.5)
        raise Unavailable(f"Ray job {att.ray_submission_id} did not stop within "
                          f"{self.stop_timeout:.0f} s; try again or stop it with "
                          f"'ray job stop {att.ray_submission_id}'")

    @contextlib.contextmanager
    def _exclusive(self, job_id: str):
        with self._lock:
            if job_id in self._busy:
                raise Precondition(f"job {job_id} is being changed by another call; retry")
            self._busy.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(job_id)

    # ------------------------------------------------------------------ jobs API

    def submit(self, spec: pb.JobSpec) -> pb.Job:
        kind, stages = self.validator.job(spec)
        return self._create(kind, spec, stages)

    def _create(self, kind: str, spec: pb.JobSpec, stages: list[Stage]) -> pb.Job:
        now = time.time()
        job = pb.Job(job_id=self.registry.new_job_id(kind), kind=kind, name=spec.name,
                     state=pb.PENDING, spec=spec, created=now, stage_count=len(stages))
        for s in stages:
            job.plan.add(kind=s.kind, argv=s.argv, run_dir=str(s.run_dir or ""))
        job.run_dir = next((str(s.run_dir) for s in stages if s.run_dir), "")
        with self._lock:
            self.registry.put_job(job)
            self._event(job, "job_submitted", job_kind=kind, name=spec.name,
                        stages=[s.kind for s in stages])
            M_SUBMITTED.inc(tags={"kind": kind})
            return self._submit_stage(job, 0, "submit")

    def _restart_training(self, job_id: str, action: str, edit, describe,
                          before_stop=None) -> pb.Job:
        """Stop a training job and resubmit its training stage with ``edit`` applied to
        its TrainSpec. Shared by scale and rollback; ``before_stop(run_dir)`` runs once the
        new spec is valid, before the job is stopped."""
        with self._exclusive(job_id):
            job = self._job(job_id)
            idx = job.stage_index
            if not job.plan or job.plan[idx].kind != "train":
                raise Precondition(f"job {job_id} is not training now (its current stage is "
                                   f"{job.plan[idx].kind if job.plan else 'none'}); only a "
                                   f"training stage can be scaled or rolled back")
            if job.state == pb.SUCCEEDED:
                raise Precondition(f"job {job_id} already finished; submit a new training job")
            train = (job.spec.train if job.kind == "train"
                     else job.spec.pipeline.stages[idx].train)
            new = pb.TrainSpec()
            new.CopyFrom(train)
            edit(new)
            name = "spec.train" if job.kind == "train" else f"spec.pipeline.stages[{idx}].train"
            produced = [Path(p.run_dir) for p in job.plan if p.run_dir]
            stage = self.validator.train(new, name, produced)
            if before_stop is not None and job.plan[idx].run_dir:
                before_stop(job.plan[idx].run_dir)
            self._stop_and_wait(job)
            before = describe(train)
            train.CopyFrom(new)
            del job.plan[idx].argv[:]
            job.plan[idx].argv.extend(stage.argv)
            with self._lock:
                self._event(job, f"job_{action}", before=before, after=describe(new),
                            ray_submission_id=job.attempts[-1].ray_submission_id)
                M_ACTIONS.inc(tags={"action": action})
                return self._submit_stage(job, idx, f"{action} {before} -> {describe(new)}")

    # ------------------------------------------------------------------ gRPC methods

    def SubmitJob(self, request, context):
        with _status(context):
            return self.submit(request.spec)

    def GetJob(self, request, context):
        with _status(context):
            self._job(request.job_id)
            return self.reconcile(request.job_id)

    def ListJobs(self, request, context):
        with _status(context):
            return self.list_jobs(request)

    def list_jobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        """One page of jobs, oldest first. The token is the (created, job_id) of the
        last job sent, so a page stays correct when jobs are added or deleted between
        calls. A page ends at ``page_size`` jobs or before it would pass PAGE_BYTES
        (gRPC's default message limit is 4 MiB; a job record may be ~100 kB)."""
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise SpecError(f"page_size={request.page_size} is out of bounds; use 1.."
                            f"{MAX_PAGE_SIZE} (or 0 for {DEFAULT_PAGE_SIZE})")
        size = request.page_size or DEFAULT_PAGE_SIZE
        after = _decode_token(request.page_token) if request.page_token else None
        resp = pb.ListJobsResponse()
        nbytes = 0
        jobs = [j for j in self.registry.jobs()
                if (not request.active_only or j.state not in TERMINAL)
                and (not request.kind or j.kind == request.kind)
                and (after is None or (j.created, j.job_id) > after)]
        for i, j in enumerate(jobs):
            n = j.ByteSize() + 8
            if len(resp.jobs) >= size or (resp.jobs and nbytes + n > PAGE_BYTES):
                last = resp.jobs[-1]
                resp.next_page_token = _encode_token(last.created, last.job_id)
                break
            resp.jobs.append(j)
            nbytes += n
        return resp

    def DeleteJob(self, request, context):
        with _status(context):
            return self.delete(request.job_id)

    def delete(self, job_id: str) -> pb.Job:
        """Forget a finished job (record and control logbook; artifacts stay)."""
        with self._exclusive(job_id):
            job = self._job(job_id)
            with self._lock:
                last = job.attempts[-1] if job.attempts else None
                if job.state not in TERMINAL:
                    raise Precondition(f"job {job_id} is {STATE_NAMES[job.state]}; cancel it "
                                       f"first ('opt-ray ctl cancel {job_id}'), then delete it")
                if job_id in self._unsettled or (last is not None and last.submitted
                                                 and last.state not in TERMINAL):
                    raise Precondition(f"job {job_id} was cancelled but its Ray job "
                                       f"{last.ray_submission_id if last else ''} has not "
                                       f"stopped yet; retry in a few seconds")
                app = next((a for a in self.registry.apps() if a.job_id == job_id), None)
                if app is not None:
                    raise Precondition(f"serving app {app.name!r} runs as job {job_id}; remove "
                                       f"it with 'opt-ray ctl serve remove {app.name}'")
                self.registry.delete_job(job_id)
                M_ACTIONS.inc(tags={"action": "delete"})
                return job

    def CancelJob(self, request, context):
        with _status(context):
            with self._exclusive(request.job_id):
                job = self._job(request.job_id)
                if job.state in TERMINAL:
                    return job
                att = job.attempts[-1] if job.attempts else None
                if att is not None and att.submitted and att.state not in TERMINAL:
                    try:
                        self.backend.stop(att.ray_submission_id)
                    except JobNotFound:
                        pass
                # Cancelling returns at once; the reconciler records when Ray has
                # actually stopped the job (attempt state), the job is STOPPED now so
                # no further pipeline stage is submitted.
                job.state = pb.STOPPED
                job.message = "cancelled by user"
                with self._lock:
                    job = self.registry.put_job(job)
                    self._unsettled.add(job.job_id)
                    self._event(job, "job_cancelled")
                    M_ACTIONS.inc(tags={"action": "cancel"})
                    M_FINISHED.inc(tags={"kind": job.kind, "state": "STOPPED"})
                return job

    def ScaleJob(self, request, context):
        with _status(context):
            self.validator.workers("", request.min_workers, request.max_workers)

            def edit(t: pb.TrainSpec) -> None:
                t.min_workers, t.max_workers = request.min_workers, request.max_workers or request.min_workers
                t.resume_from = 0  # scaling continues from the latest checkpoint

            return self._restart_training(request.job_id, "scaled", edit,
                                          lambda t: f"{t.min_workers}:{t.max_workers or t.min_workers}")

    def RollbackJob(self, request, context):
        with _status(context):
            if request.checkpoint_step <= 0:
                raise SpecError("checkpoint_step must be a positive checkpoint step; "
                                "'opt-ray ctl logbook JOB' lists the saved checkpoints")

            def edit(t: pb.TrainSpec) -> None:
                t.resume_from = request.checkpoint_step
                t.optim.MergeFrom(request.optim)  # the set fields only; betas replace
                if request.optim.betas:
                    t.optim.betas[:] = request.optim.betas

            def describe(t: pb.TrainSpec) -> str:
                changed = ", ".join(f"{f.name} {v}" for f, v in t.optim.ListFields())
                return f"step {t.resume_from or 'latest'}" + (f" ({changed})" if changed else "")

            def pin_target(run_dir: str) -> None:
                # The gang goes on saving until it stops, and --keep would prune the
                # target under it: keep it for good (as the OPT team kept theirs). A
                # target that is not there is refused here, with the running job left
                # running, rather than found missing when the rolled-back run starts.
                from opt_ray.train.checkpoint import committed, pin
                root = f"{run_dir.rstrip('/')}/checkpoints"
                step = request.checkpoint_step
                try:
                    if pin(root, step, f"rollback of job {request.job_id}"):
                        return
                    steps = [s for s, _ in committed(root)]
                except OSError as e:
                    raise Precondition(f"cannot reach the checkpoints of job {request.job_id} "
                                       f"({root}: {e}); the job was left running, retry") from e
                raise Precondition(f"job {request.job_id} has no committed checkpoint of step "
                                   f"{step} in {root} (committed: {steps or 'none'}); the job "
                                   f"was left running; pick one of those steps")

            return self._restart_training(request.job_id, "rolled_back", edit, describe,
                                          before_stop=pin_target)

    def WatchJob(self, request, context):
        with _status(context):
            self._job(request.job_id)
        yield from self.watch(request, context.is_active)

    def watch(self, request: pb.WatchJobRequest, is_active=lambda: True) -> Iterator[pb.JobEvent]:
        """Status transitions, new log text and run-file lines until the job is final."""
        job_id = request.job_id
        log_off: dict[str, int] = {}
        logs_done: set[str] = set()
        file_off: dict[Path, int] = {}
        last_key = None
        first = True
        while True:
            job = self.reconcile(job_id) or self._job(job_id)
            final = job.state in TERMINAL and (not job.attempts or job.attempts[-1].state in TERMINAL)
            key = (job.state, job.stage_index, len(job.attempts), job.message,
                   job.attempts[-1].state if job.attempts else 0)
            if key != last_key:
                last_key = key
                yield pb.JobEvent(time=time.time(), job_id=job_id, status=job)
            if request.include_logs:
                for att in job.attempts:
                    sid = att.ray_submission_id
                    if sid in logs_done:
                        continue
                    try:
                        text = self.backend.logs(sid)
                    except Exception:  # not started yet, or Ray lost it: nothing to stream
                        text = ""
                    if first and not request.from_start:
                        log_off[sid] = len(text)
                    new = text[log_off.get(sid, 0):]
                    log_off[sid] = len(text)
                    if new:
                        yield pb.JobEvent(time=time.time(), job_id=job_id, log=new)
                    if att.state in TERMINAL:
                        logs_done.add(sid)
            files: list[tuple[Path, str]] = [
                (self.registry.logbook(job_id).path, "logbook_line")]
            run = self._run_files(job.run_dir) if job.run_dir else None
            if run is not None:
                files.append((run / LOGBOOK, "logbook_line"))
                if request.include_metrics:
                    files.append((run / "metrics.jsonl", "metrics_line"))
            for path, field in files:
                if run is not None and path.parent == run:
                    try:
                        # A run file swapped for a symlink out of the roots is not streamed.
                        self.validator.readable_file(field, path)
                    except SpecError:
                        continue
                if first and not request.from_start:
                    file_off[path] = path.stat().st_size if path.exists() else 0
                lines, file_off[path] = read_jsonl_from(path, file_off.get(path, 0))
                for ln in lines:
                    yield pb.JobEvent(time=time.time(), job_id=job_id, **{field: ln})
            first = False
            if final or not is_active():
                return
            time.sleep(self.poll_interval)

    # ------------------------------------------------------------------ serving

    def _app_state(self, app: pb.ServeApp) -> pb.ServeApp:
        job = self.reconcile(app.job_id) if app.job_id else None
        if job is not None:
            app.state, app.message = job.state, job.message
        return app

    def _deploy(self, spec: pb.ServeSpec, action: str) -> pb.ServeApp:
        stage = self.validator.serve(spec)
        job = self._create("serve", pb.JobSpec(name=f"serve {spec.name}", serve=spec), [stage])
        M_ACTIONS.inc(tags={"action": action})
        return self.registry.put_app(pb.ServeApp(name=spec.name, spec=spec, job_id=job.job_id,
                                                 state=job.state, message=job.message))

    def _stop_serve_job(self, job_id: str, why: str) -> None:
        with self._exclusive(job_id):
            job = self.registry.get_job(job_id)
            if job is not None and job.attempts:
                self._stop_and_wait(job)
                if job.state not in TERMINAL:
                    job.state, job.message = pb.STOPPED, why
                with self._lock:
                    self.registry.put_job(job)
                    self._unsettled.add(job.job_id)
                self._event(job, "serve_stopped", reason=why)
        try:
            self.backend.shutdown_serve()
        except Exception as e:  # Serve already gone is the common case
            print(f"opt-ray control: serve shutdown after {why}: {type(e).__name__}: {e}",
                  flush=True)

    def DeployServe(self, request, context):
        with _status(context):
            old = self.registry.get_app(request.spec.name)
            if old is not None and self._app_state(old).state not in TERMINAL:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"serving app {request.spec.name!r} is deployed (job "
                              f"{old.job_id}); use UpdateServe ('opt-ray ctl serve update')")
            return self._deploy(request.spec, "serve_deploy")

    def UpdateServe(self, request, context):
        with _status(context):
            old = self.registry.get_app(request.spec.name)
            if old is None:
                raise NotFound(f"no serving app {request.spec.name!r}; deploy it first")
            self.validator.serve(request.spec)  # reject a bad update before stopping anything
            # The old job is stopped before the new one starts: the HTTP/gRPC ports are
            # the same, so both cannot run at once. The app is down while replicas load.
            self._stop_serve_job(old.job_id, "replaced by UpdateServe")
            return self._deploy(request.spec, "serve_update")

    def RemoveServe(self, request, context):
        with _status(context):
            app = self.registry.get_app(request.name)
            if app is None:
                raise NotFound(f"no serving app {request.name!r}; 'opt-ray ctl serve list'")
            self._stop_serve_job(app.job_id, "removed by RemoveServe")
            self.registry.delete_app(request.name)
            M_ACTIONS.inc(tags={"action": "serve_remove"})
            app.state, app.message = pb.STOPPED, "removed"
            return app

    def ListServe(self, request, context):
        with _status(context):
            return pb.ListServeResponse(apps=[self._app_state(a) for a in self.registry.apps()])

    # ------------------------------------------------------------------ logbook, health

    def read_logbook(self, job_id: str = "", run_dir: str = "") -> tuple[list[str], str]:
        """(events as JSON lines sorted by time, run_dir). A job's control events and its
        run directory's logbook are merged into one chronicle."""
        lines: list[str] = []
        if job_id:
            job = self._job(job_id)
            run_dir = job.run_dir
            lines += read_jsonl_from(self.registry.logbook(job_id).path, 0)[0]
        elif is_url(run_dir):
            run_dir = self.validator.run_location("run_dir", run_dir)[0]
            with store_errors(f"run_dir={run_dir!r}", "the control server's read",
                              "the control server's environment", error=SpecError):
                mirror = RunMirror(run_dir)
                mirror.pull()
            self._pulled[run_dir] = time.monotonic()
            if not (mirror.local / MARK).is_file():
                raise SpecError(f"run_dir={run_dir!r}: no run there (nothing mirrored by an "
                                f"'opt-ray train --output {run_dir}')")
        elif run_dir:
            run_dir = str(self.validator.path("run_dir", run_dir, must_exist=True))
        else:
            raise SpecError("give job_id or run_dir")
        if run_dir:
            path = self.validator.readable_file("run_dir logbook", self._run_files(run_dir) / LOGBOOK)
            if path is not None:
                lines += read_jsonl_from(path, 0)[0]
        keyed = [((parse_json(ln) or {}).get("time", 0.0), i, ln) for i, ln in enumerate(lines)]
        return [ln for _, _, ln in sorted(keyed, key=lambda t: (float(t[0] or 0), t[1]))], run_dir

    def ReadLogbook(self, request, context):
        with _status(context):
            events, run_dir = self.read_logbook(request.job_id, request.run_dir)
            md = ""
            if request.markdown and run_dir:
                from opt_ray import logbook as lb
                # Both files the chronicle reads, symlinks resolved, inside the roots.
                local = self._run_files(run_dir)
                self.validator.readable_file("run_dir metrics", local / lb.METRICS)
                try:
                    md = lb.render_markdown(local, name=run_dir if is_url(run_dir) else None)
                except Exception as e:  # a chronicle that fails to render is no error
                    md = f"(could not render the chronicle: {type(e).__name__}: {e})"
            return pb.ReadLogbookResponse(events=events, markdown=md or "", run_dir=run_dir)

    def ClusterHealth(self, request, context):
        with _status(context):
            h = self.backend.health()
            resp = pb.ClusterHealthResponse(dashboard_url=h.get("dashboard_url", ""),
                                            alive_nodes=h.get("alive_nodes", 0))
            resp.metrics_endpoints.extend(h.get("metrics_endpoints", []))
            resp.total_resources.update(h.get("total", {}))
            resp.available_resources.update(h.get("available", {}))
            for name in ("ray", "job_api"):
                if name in h:
                    ok, detail = h[name]
                    resp.components.add(name=name, ok=ok, detail=detail)
            probe = self.registry.state_dir / ".health-probe"
            try:
                probe.write_text("ok")
                probe.unlink()
                resp.components.add(name="registry", ok=True, detail=str(self.registry.state_dir))
            except OSError as e:
                resp.components.add(name="registry", ok=False,
                                    detail=f"{self.registry.state_dir}: {e.strerror}")
            alive = self._thread is not None and self._thread.is_alive()
            resp.components.add(name="reconciler", ok=alive,
                                detail="running" if alive else "not running")
            active = self.registry.active_job_ids()
            resp.active_jobs = len(active)
            resp.ok = all(c.ok for c in resp.components)
            return resp


