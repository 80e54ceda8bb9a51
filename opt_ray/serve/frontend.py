"""The serving front end without Ray: the completions protocol over an *engine handle*.

An engine handle is anything with ``generate(EngineRequest) -> async iterator of
RequestOutput`` whose iterator, when closed early, aborts the request (frees its slots),
and ``stats() -> dict``. Two exist: ``LocalEngineHandle`` over an in-process
``EngineLoop`` (``opt-ray generate``, tests) and the Ray Serve deployment handle adapter
in ``actors/serve.py``. The HTTP app (``opt_ray.serve.http``) and the gRPC service
(``opt_ray.serve.grpc_service``) are thin protocol layers over ``Frontend``.

One request goes through three steps here:
  1. ``parse``: JSON body -> ``CompletionRequest``: validation, prompt size limits, then
     tokenising, all on a thread pool so a huge or slow request never stalls the event
     loop (other requests keep streaming while it is refused);
  2. ``start``: one engine request per prompt, and wait for each one's first output, so a
     rejection (429, 400 from the engine) is known before a response status is sent;
  3. iterate the ``Execution``: the merged deltas of all prompts, ``(prompt, output)``.
     Leaving the iteration early (client gone, error) cancels every engine request.
That loop is the only place that accumulates and cancels; ``complete`` (non-streaming),
the SSE stream and the gRPC service all consume it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from opt_ray.serve import api
from opt_ray.serve.api import ApiError, CompletionRequest
from opt_ray.serve.engine import (EngineDeadError, EngineLoop, EngineRequest, QueueFullError,
                                  RequestError, RequestOutput)
from opt_ray.serve.frontend_config import FrontendConfig

__all__ = ["EngineHandle", "Execution", "Frontend", "FrontendConfig", "LocalEngineHandle", "as_api_error"]

logger = logging.getLogger("opt_ray.serve")


class EngineHandle(Protocol):
    """What the front end needs of an engine (in-process or behind Ray Serve)."""

    def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    async def stats(self) -> dict[str, Any]: ...


class LocalEngineHandle:
    """An in-process ``EngineLoop`` as an engine handle."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        return self.loop.generate(req)

    async def stats(self) -> dict[str, Any]:
        import dataclasses
        return {"replica": "local", **dataclasses.asdict(self.loop.engine.stats())}


def as_api_error(e: BaseException) -> ApiError | None:
    """Engine-side request errors as the error the client should see (also when they
    arrive wrapped, as a Ray handle delivers them: the original is ``e.cause``)."""
    cause = getattr(e, "cause", None) or e
    for x in (e, cause):
        if isinstance(x, ApiError):
            return x
        if isinstance(x, QueueFullError):
            return api.queue_full()
        if isinstance(x, RequestError):
            msg = str(x)
            word = msg.split(" ", 1)[0].rstrip(":")
            return ApiError(msg, param=word if word in api.FIELDS else None)
        if isinstance(x, EngineDeadError):
            return ApiError(f"the engine failed and is being restarted: {x}", status=503,
                            type="server_error", retry_after_s=5)
    return None


class Execution:
    """A request in flight: one engine stream per prompt, merged into one sequence of
    ``(prompt_index, RequestOutput)``. Closing it (or leaving ``async for`` early)
    cancels every engine request that has not finished."""

    def __init__(self, req: CompletionRequest, handle: EngineHandle):
        self.req = req
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._open = set(range(len(req.prompts)))
        self._tasks = [asyncio.create_task(self._pump(
            p, handle.generate(EngineRequest(req.sub_request_id(p), prompt.token_ids, req.params))))
            for p, prompt in enumerate(req.prompts)]

    async def _pump(self, p: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                self._queue.put_nowait((p, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((p, e))
        finally:
            # Cancelled mid-stream: closing the engine stream aborts the request there.
            await gen.aclose()

    async def _next(self) -> tuple[int, RequestOutput]:
        p, item = await self._queue.get()
        if isinstance(item, BaseException):
            err = as_api_error(item)
            if err is None:
                logger.warning("request %s failed: %r", self.req.request_id, item)
                raise item
            raise err from item
        if item.finished:
            self._open.discard(p)
        return p, item

    async def wait_started(self) -> None:
        """Return once every prompt has its first output; raise (and cancel all) if one
        of them is refused."""
        seen: set[int] = set()
        try:
            while len(seen) < len(self.req.prompts):
                p, out = await self._next()
                self._buffer.append((p, out))
                seen.add(p)
        except BaseException:
            await self.close()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while self._buffer:
                yield self._buffer.pop(0)
            while self._open:
                yield await self._next()
        finally:
            await self.close()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Frontend:
    """The completions protocol for one served model over an engine handle."""

    def __init__(self, handle: EngineHandle, tokenizer, *, model_name: str, max_model_len: int,
                 vocab_size: int, config: FrontendConfig | None = None):
        self.handle, self.tokenizer, self.model_name = handle, tokenizer, model_name
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.config = config or FrontendConfig()
        self.limits = api.Limits(max_model_len, vocab_size,
                                 api.max_prompt_chars(tokenizer, max_model_len), self.config.max_prompts)
        self._pool = ThreadPoolExecutor(self.config.tokenizer_threads, thread_name_prefix="opt-ray-tokenize")

    @classmethod
    def for_checkpoint(cls, handle: EngineHandle, checkpoint: str | Path, *, model_name: str | None,
                       max_model_len: int | None = None, config: FrontendConfig | None = None) -> "Frontend":
        """A front end for a checkpoint (``resolve_checkpoint``): its tokenizer and context
        (of a bucket export only those files are fetched, of a training run only the
        config and tokenizer written: the weights stay with the replicas)."""
        from opt_ray.serve.engine import checkpoint_name, local_checkpoint, resolve_checkpoint
        from opt_ray.serve.loading import load_tokenizer_dir
        ref = resolve_checkpoint(checkpoint)
        with local_checkpoint(ref, weights=False) as path:
            cfg = json.loads((path / "config.json").read_text())
            tokenizer = load_tokenizer_dir(path)
        ctx = int(cfg["max_position_embeddings"])
        return cls(handle, tokenizer, model_name=model_name or checkpoint_name(ref),
                   max_model_len=min(max_model_len or ctx, ctx), vocab_size=int(cfg["vocab_size"]),
                   config=config)

    # ---- 1. parse ------------------------------------------------------------------------

    def _parse_sync(self, body: bytes | dict) -> CompletionRequest:
        if isinstance(body, (bytes, bytearray)):
            try:
                body = json.loads(body)
            except ValueError as e:
                raise ApiError(f"request body is not valid JSON: {e}", param="body") from e
        req = api.parse_body(body, model_name=self.model_name, limits=self.limits)
        return api.tokenize(req, self.tokenizer, self.max_model_len)

    async def parse(self, body: bytes | dict) -> CompletionRequest:
        """Validate and tokenise a completions body (raw JSON bytes or a dict) on the
        thread pool; raises ``ApiError``."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._parse_sync, body)

    # ---- 2. start ------------------------------------------------------------------------

    async def start(self, req: CompletionRequest) -> Execution:
        """Submit every prompt and wait for its first output (raises ``ApiError``)."""
        ex = Execution(req, self.handle)
        await ex.wait_started()
        return ex

    # ---- 3. consumers ----------------------------------------------------------------------

    def accumulators(self, req: CompletionRequest) -> list[api.Accumulator]:
        return [api.Accumulator(req, p) for p in range(len(req.prompts))]

    async def complete(self, req: CompletionRequest, ex: Execution | None = None) -> list[api.Accumulator]:
        """Run a request to the end; every prompt's accumulated choices."""
        ex = ex or await self.start(req)
        accs = self.accumulators(req)
        try:
            async for p, out in ex:
                accs[p].add(out)
        finally:
            await ex.close()
        return accs

    async def render(self, accs: list[api.Accumulator]) -> bytes:
        """The non-streaming response as JSON bytes, built on the thread pool: echoing
        long prompts with logprobs decodes every token (and its alternatives)."""
        def build() -> bytes:
            return json.dumps(api.completion_response(accs, self.tokenizer)).encode()
        return await asyncio.get_running_loop().run_in_executor(self._pool, build)

    async def sse(self, req: CompletionRequest, ex: Execution) -> AsyncIterator[str]:
        """Server-sent events for a started streaming request. An error after the status
        was sent is one final ``error`` event."""
        accs = self.accumulators(req)
        first = [True] * len(req.prompts)
        offsets: dict[int, int] = {}
        try:
            async for p, out in ex:
                accs[p].add(out)
                for chunk in api.stream_chunks(req, out, self.tokenizer, first=first[p],
                                               prompt_index=p, offsets=offsets):
                    yield f"data: {json.dumps(chunk)}\n\n"
                first[p] = False
            if req.include_usage:
                yield f"data: {json.dumps(api.usage_chunk(accs))}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            # The client went away (the generator is closed): abort what still runs.
            await ex.close()
        yield "data: [DONE]\n\n"

    async def models(self) -> dict[str, Any]:
        return api.models_response(self.model_name, self.max_model_len)

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
