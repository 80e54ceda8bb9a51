"""Ray adapter for the dedup stage: phase tasks as retried Ray tasks (thin; the phases
live in ``opt_ray.data.dedup``).

``RayExecutor.map`` runs each task as a ``num_cpus=1`` Ray task with ``max_retries``: a
task reads its own split or partition from the shared filesystem or the bucket and writes
its result under the work dir (or prefix), so only small summaries reach the driver. A
killed worker's task is re-run by Ray in a fresh temporary directory, and so is a task
whose I/O failed (an ``OSError``, or the object store's client giving up after its own
retries: ``transient``); a completed task's directory is never rewritten, so the retry
cannot change the output. Bad input (``UserError``) stops the stage at once with its one
line; any other exception (a bug) fails it without retries.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import ray

from opt_ray.errors import UserError
from opt_ray.ray_util import user_error

RETRIES = 5
#: Where an exception comes from, for the object store's clients (fsspec's s3fs over
#: aiobotocore): theirs are raised after their own retries and may pass, as a 503
#: SlowDown under load or a dropped connection do.
_STORE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "fsspec")


class TransientTaskError(OSError):
    """A task's I/O failed (an ``OSError``, or the object store's client gave up): Ray
    runs the task again, up to ``RETRIES`` times. A task never leaves half its output
    behind (it writes in a temporary place, ``done.json`` last), so a rerun is safe."""


def transient(e: BaseException) -> bool:
    """An I/O failure a rerun may not meet: an ``OSError`` (``StoreUnavailable`` among
    them) or an exception of the object store's client; never bad input (``UserError``)
    nor a bug in the task (any other exception), which a rerun would only repeat."""
    if isinstance(e, UserError):
        return False
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in _STORE_MODULES


@ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=[TransientTaskError])
def _run(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:
        if transient(e):
            raise TransientTaskError(f"{type(e).__name__}: {e}") from e
        raise


class RayExecutor:
    """``opt_ray.data.dedup.Executor`` on Ray: at most ``num_workers`` tasks in flight,
    so ``--workers N`` uses N CPUs of the cluster (a task takes seconds; Ray schedules
    the next one in milliseconds), and the driver's state stays bounded."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        pending: list = []
        todo = list(args)
        todo.reverse()
        limit = max(1, self.num_workers)
        while todo or pending:
            while todo and len(pending) < limit:
                pending.append(_run.remote(fn, *todo.pop()))
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                if (bad := user_error(e)) is not None:
                    for ref in pending:
                        ray.cancel(ref)
                    raise bad from None     # bad input: one line, exit 2
                raise
