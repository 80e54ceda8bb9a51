"""The only place the control plane talks to Ray: the job API and cluster state.

``JobBackend`` is the small interface the service needs; ``RayJobBackend`` implements it
with ``ray.job_submission.JobSubmissionClient`` against the dashboard's job server, so
every stage shows up in the dashboard's Jobs view with its logs, exactly as if it had
been submitted with ``ray job submit -- opt-ray ...``. Unit tests use a fake backend.

Ray token authentication: when the cluster runs with ``RAY_AUTH_MODE=token``, Ray's own
client adds its token (from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``) to every job-API request as long as the control server's
environment has the same settings; ``--ray-auth-token-file`` adds the header
explicitly for a server whose environment does not.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Protocol

from opt_ray.v1 import control_pb2 as pb

_STATES = {"PENDING": pb.PENDING, "RUNNING": pb.RUNNING, "SUCCEEDED": pb.SUCCEEDED,
           "FAILED": pb.FAILED, "STOPPED": pb.STOPPED}


@dataclass
class RayJobStatus:
    state: int  # pb.JobState
    message: str = ""
    start_time: float = 0.0  # seconds since the epoch
    end_time: float = 0.0


class JobNotFound(LookupError):
    """Ray does not know the submission id (e.g. the cluster was restarted)."""


class JobBackend(Protocol):
    def submit(self, entrypoint: str, submission_id: str, metadata: dict[str, str]) -> str: ...
    def status(self, submission_id: str) -> RayJobStatus: ...
    def stop(self, submission_id: str) -> None: ...
    def logs(self, submission_id: str) -> str: ...
    def health(self) -> dict: ...
    def shutdown_serve(self) -> None: ...


class RayJobBackend:
    """JobSubmissionClient wrapper. ``dashboard_url`` is the job server's HTTP address
    (``http://127.0.0.1:8265``); ``driver_connected`` says whether this process is also
    a Ray driver, which ``health`` uses for node and resource counts."""

    def __init__(self, dashboard_url: str, *, headers: dict[str, str] | None = None,
                 driver_connected: bool = False, env_vars: dict[str, str] | None = None,
                 ray_address: str | None = None):
        from ray.job_submission import JobSubmissionClient
        if "://" not in dashboard_url:
            dashboard_url = "http://" + dashboard_url
        self.dashboard_url = dashboard_url
        # An explicit address: JobSubmissionClient never auto-detects a cluster here.
        self._client = JobSubmissionClient(dashboard_url, headers=headers or None)
        self._driver_connected = driver_connected
        self.ray_address = ray_address
        # Unbuffered stdout so that WatchJob streams a stage's progress as it happens.
        # RAY_ADDRESS pins the job's tasks and actors (and the driver, where the
        # supervisor does not set it itself) to this cluster: never auto-detected.
        env = {"PYTHONUNBUFFERED": "1", **(env_vars or {})}
        if ray_address:
            env["RAY_ADDRESS"] = ray_address
        self._runtime_env = {"env_vars": env}

    def submit(self, entrypoint: str, submission_id: str, metadata: dict[str, str]) -> str:
        """Submit once. 'already exists' means an earlier try went through (the
        submission id makes retries idempotent), so it counts as success."""
        try:
            return self._client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                           metadata=metadata, runtime_env=self._runtime_env)
        except RuntimeError as e:
            if "already exists" in str(e):
                return submission_id
            raise

    def status(self, submission_id: str) -> RayJobStatus:
        try:
            info = self._client.get_job_info(submission_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                raise JobNotFound(submission_id) from e
            raise
        return RayJobStatus(_STATES.get(str(info.status.value if hasattr(info.status, "value")
                                                else info.status), pb.JOB_STATE_UNSPECIFIED),
                            info.message or "",
                            (info.start_time or 0) / 1000.0, (info.end_time or 0) / 1000.0)

    def stop(self, submission_id: str) -> None:
        self._client.stop_job(submission_id)

    def logs(self, submission_id: str) -> str:
        return self._client.get_job_logs(submission_id)

    def shutdown_serve(self) -> None:
        """Shut Ray Serve down on the cluster. ``opt-ray serve`` removes its app when it
        exits cleanly, but a Ray job stop (SIGTERM, then SIGKILL) can end it first and
        leave the app serving; the serve stage runs one app per cluster, so the whole
        of Serve goes."""
        if not self._driver_connected:
            return
        from ray import serve
        serve.shutdown()

    def health(self) -> dict:
        """Node and resource counts (when this process is a Ray driver) and whether the
        job server answers."""
        out: dict = {"dashboard_url": self.dashboard_url}
        try:
            self._client.get_version()
            out["job_api"] = (True, "job server answers")
        except Exception as e:  # any failure here is the thing health reports
            out["job_api"] = (False, f"{type(e).__name__}: {e}")
        if self._driver_connected:
            try:
                import ray
                nodes = [n for n in ray.nodes() if n.get("Alive")]
                out["alive_nodes"] = len(nodes)
                out["metrics_endpoints"] = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
                                            for n in nodes if n.get("MetricsExportPort")]
                out["total"] = {k: float(v) for k, v in ray.cluster_resources().items()
                                if not k.startswith("node:")}
                out["available"] = {k: float(v) for k, v in ray.available_resources().items()
                                    if not k.startswith("node:")}
                out["ray"] = (len(nodes) > 0, f"{len(nodes)} alive node(s)")
            except Exception as e:
                out["ray"] = (False, f"{type(e).__name__}: {e}")
        return out


def entrypoint(opt_ray_bin: str, argv: list[str]) -> str:
    """The shell command line Ray runs: ``opt-ray <argv>`` with every argument quoted."""
    return shlex.join([opt_ray_bin, *argv])
