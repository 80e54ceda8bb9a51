"""Ray adapter for the dedup stage: phase tasks as retried Ray tasks (thin; the phases
live in ``opt_ray.data.dedup``).

``RayExecutor.map`` runs each task as a ``num_cpus=1`` Ray task with ``max_retries``: a
task reads its own split or partition from the shared filesystem and writes its result
under the work dir, so only small summaries reach the driver. A killed worker's task is
re-run by Ray in a fresh temporary directory; a completed task's directory is never
rewritten, so the retry cannot change the output.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import ray

from opt_ray.errors import UserError

RETRIES = 5


@ray.remote(num_cpus=1, max_retries=RETRIES)
def _run(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


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
                if isinstance(e.cause, UserError):
                    for ref in pending:
                        ray.cancel(ref)
                    raise e.cause from None     # bad input: one line, exit 2
                raise
