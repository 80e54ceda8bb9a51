"""Ray metrics with the common ``opt_ray_`` prefix, usable with or without Ray.

``counter("dedup_docs", "...")`` etc. return an object with ``inc``/``set``/``observe``
that records to ``ray.util.metrics`` when this process is attached to a Ray cluster and
does nothing otherwise, so library code can report unconditionally.
"""

from __future__ import annotations

from typing import Any, Sequence

PREFIX = "opt_ray_"


class _Noop:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class _Metric:
    def __init__(self, kind: str, name: str, description: str, tag_keys: Sequence[str],
                 boundaries: Sequence[float] | None):
        self._args = (kind, PREFIX + name, description, tuple(tag_keys), boundaries)
        self._m: Any = None

    def _get(self) -> Any:
        if self._m is None:
            try:
                import ray
                if not ray.is_initialized():
                    return _Noop()
                from ray.util import metrics as rm
            except Exception:
                return _Noop()
            kind, name, desc, tags, bounds = self._args
            if kind == "counter":
                self._m = rm.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                self._m = rm.Gauge(name, description=desc, tag_keys=tags)
            else:
                self._m = rm.Histogram(name, description=desc, boundaries=list(bounds or [1.0]),
                                       tag_keys=tags)
        return self._m

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._get().inc(value, tags=tags) if value > 0 else None

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._get().set(value, tags=tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._get().observe(value, tags=tags)


_REGISTRY: dict[str, _Metric] = {}


def _metric(kind: str, name: str, description: str, tag_keys: Sequence[str] = (),
            boundaries: Sequence[float] | None = None) -> _Metric:
    m = _REGISTRY.get(name)
    if m is None:
        m = _REGISTRY[name] = _Metric(kind, name, description, tag_keys, boundaries)
    return m


def counter(name: str, description: str, tag_keys: Sequence[str] = ()) -> _Metric:
    return _metric("counter", name, description, tag_keys)


def gauge(name: str, description: str, tag_keys: Sequence[str] = ()) -> _Metric:
    return _metric("gauge", name, description, tag_keys)


def histogram(name: str, description: str, boundaries: Sequence[float],
              tag_keys: Sequence[str] = ()) -> _Metric:
    return _metric("histogram", name, description, tag_keys, boundaries)
