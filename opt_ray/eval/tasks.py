"""lm-eval's task registry, with errors a user can act on.

``load_tasks(names, include_path)`` returns lm-eval Task/Group objects ready for
``simple_evaluate``. Before any model work:

- every name must be a registered task, group or tag (or a glob over them, or a YAML
  file); an unknown one is refused with its closest registered names;
- local data files of ``dataset_path: json`` tasks are read row by row: a row that is
  not a JSON object, or lacks a field the first row has, is refused naming the file and
  the row (datasets' own error names neither);
- a task whose dataset must be downloaded where the network is off
  (``HF_DATASETS_OFFLINE``, no route to the Hub) is one line naming the task and the
  way out: ``--include-path`` with a local copy.

Scanning lm-eval's ~15,000 built-in task files takes ~10 s, so when every name is
found under ``include_path`` the built-ins are not scanned, and a process keeps the
registries it has built (one per ``include_path``) for its next evaluation.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
from pathlib import Path
from typing import Any, Sequence

from opt_ray.errors import UserError


def task_manager(names: Sequence[str], include_path: str | None = None):
    """A ``TaskManager`` that knows ``names``: local tasks only when that suffices."""
    if include_path:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path {include_path} is not a directory; pass the directory "
                            f"holding your task YAML files")
        include_path = str(Path(include_path).resolve())
        local = _manager(include_path, False)
        if all(_known(local, n) for n in names):
            return local
    return _manager(include_path, True)


@functools.lru_cache(maxsize=8)
def _manager(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include_path, include_defaults=defaults)


def _known(tm, name: str) -> bool:
    if name in tm.task_index:
        return True
    if any(c in name for c in "*?["):
        return bool(fnmatch.filter(tm.all_tasks, name))
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def check_names(tm, names: Sequence[str]) -> list[str]:
    """``names`` with globs expanded; unknown names are one ``UserError`` listing each
    with its close matches."""
    unknown = []
    for name in names:
        if not _known(tm, name):
            close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.6)
            unknown.append(f"{name!r} (" + (f"close matches: {', '.join(close)}" if close
                                            else "no registered name is close") + ")")
    if unknown:
        raise UserError(f"unknown task {'; '.join(unknown)}; `lm-eval ls tasks` lists the registry, "
                        f"--include-path DIR adds your own YAML tasks")
    out: list[str] = []
    for name in names:
        if any(c in name for c in "*?[") and name not in tm.task_index:
            out += [n for n in fnmatch.filter(tm.all_tasks, name) if n not in out]
        elif name not in out:
            out.append(name)
    return out


def check_local_data(tm, names: Sequence[str]) -> None:
    """Read the local JSON data files of ``names`` (and of their groups' tasks) row by
    row; a malformed row is a ``UserError`` naming the file and the row."""
    seen: set[str] = set()

    def visit(spec: Any) -> None:
        if isinstance(spec, dict):
            cfg = spec
        else:
            if spec in seen:
                return
            seen.add(spec)
            entry = tm.task_index.get(spec)
            cfg = entry.cfg if entry is not None and entry.cfg else None
            if cfg is None and isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
                from lm_eval.tasks._index import TaskIndex
                e = TaskIndex.entry_from_path(Path(spec))
                cfg = e.cfg if e is not None else None
            if entry is not None and getattr(entry, "kind", None) is not None and entry.kind.name == "TAG":
                for n, e in tm.task_index.items():
                    if spec in (e.tags or ()):
                        visit(n)
                return
        if not cfg:
            return
        subtasks = cfg.get("task")
        if isinstance(subtasks, list):   # a group
            for sub in subtasks:
                visit(sub)
            return
        if cfg.get("dataset_path") in ("json", "jsonl"):
            for f in _data_files((cfg.get("dataset_kwargs") or {}).get("data_files")):
                _check_json_rows(Path(f), task=str(cfg.get("task", spec)))

    for name in names:
        visit(name)


def _data_files(spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, dict):
        return [f for v in spec.values() for f in _data_files(v)]
    if isinstance(spec, (list, tuple)):
        return [f for v in spec for f in _data_files(v)]
    return []


def _check_json_rows(path: Path, *, task: str) -> None:
    if any(c in str(path) for c in "*?[") or "://" in str(path):
        return  # globs and remote files are datasets' to resolve
    if not path.is_file():
        raise UserError(f"task {task}: data file {path} does not exist; fix data_files in its YAML "
                        f"(relative paths are taken from the current directory)")
    text = path.read_text(encoding="utf-8", errors="strict")
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON document holding a list of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"task {task}: {path} is not valid JSON (line {e.lineno}: {e.msg}); "
                            f"fix the file or write one JSON object per line") from e
        numbered = [(f"row {i + 1}", r) for i, r in enumerate(rows)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"task {task}: {path} line {n} is not valid JSON ({e.msg} at column "
                                f"{e.colno}); fix that row (one JSON object per line)") from e
    first_keys: set[str] | None = None
    for where, row in numbered:
        if not isinstance(row, dict):
            raise UserError(f"task {task}: {path} {where} is a JSON {type(row).__name__}, not an "
                            f"object; each row must be an object with the task's fields")
        if first_keys is None:
            first_keys = set(row)
        elif not first_keys <= set(row):
            missing = sorted(first_keys - set(row))
            raise UserError(f"task {task}: {path} {where} lacks field(s) {missing} that the first row "
                            f"has; every row needs the same fields")


def _network_error(e: BaseException) -> BaseException | None:
    c: BaseException | None = e
    while c is not None:
        if isinstance(c, ConnectionError) or type(c).__name__ in (
                "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectTimeout", "ConnectionError"):
            return c
        c = c.__cause__ or c.__context__
    return None


def load_tasks(tm, names: Sequence[str]) -> list[Any]:
    """The Task/Group objects of ``names`` (datasets loaded), one name at a time so that a
    failure names its task."""
    objs: list[Any] = []
    for name in names:
        try:
            loaded = tm.load([name])
        except Exception as e:
            net = _network_error(e)
            if net is not None:
                raise UserError(
                    f"task {name}: its dataset must be downloaded and the network is not reachable "
                    f"({str(net).splitlines()[0][:160]}); run where the Hub is reachable (and "
                    f"HF_DATASETS_OFFLINE is unset), or copy the data and pass --include-path DIR "
                    f"with a local YAML task (dataset_path: json, data_files: ...)") from e
            raise UserError(f"task {name}: lm-eval could not load it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''}); check its YAML") from e
        if name in loaded["groups"]:
            objs.append(loaded["groups"][name])
        else:
            objs += [t for t in loaded["tasks"].values() if t not in objs]
    return objs
