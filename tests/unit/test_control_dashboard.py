"""The Grafana dashboard in deploy/ queries the opt_ray_ metrics the code declares.

Ray exports a metric declared as ``opt_ray.metrics.counter("dedup_docs", ...)`` as
``ray_opt_ray_dedup_docs_total`` (gauges without the suffix, histograms as _bucket/_sum/
_count). A panel querying a name nobody declares shows "No data" forever, so every name
must be declared in opt_ray/ or actors/ -- except the training stage's, listed in
``AWAITED`` until it emits them (its metrics.jsonl already has these fields).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "opt_ray_dashboard.json"

# Names the training stage is expected to declare (loss, lr, grad_norm, tokens/s, mfu,
# restarts). Remove a name from here once it is declared: the test then checks it.
AWAITED = {"train_loss", "train_lr", "train_grad_norm", "train_tokens_per_s", "train_mfu",
           "train_restarts"}


def _declared() -> set[str]:
    pat = re.compile(r"""(?:counter|gauge|histogram)\(\s*["']([a-z0-9_]+)["']""")
    names = set()
    for d in ("opt_ray", "actors"):
        for f in (ROOT / d).rglob("*.py"):
            names |= set(pat.findall(f.read_text()))
    return names


def _queried(dash: dict) -> set[str]:
    pat = re.compile(r"\bray_opt_ray_([a-z0-9_]+)")
    names = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            for n in pat.findall(t["expr"]):
                names.add(re.sub(r"_(total|bucket|sum|count)$", "", n))
    return names


def test_dashboard_is_valid_and_covers_every_stage():
    dash = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("dedup: documents", "duplicates", "tokenize: tokens", "loss", "learning rate",
                  "grad norm", "train: tokens", "mfu", "restarts", "serve: requests",
                  "first token", "per output token", "control"):
        assert topic in titles, f"no panel for {topic!r}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_queried_metric_is_declared():
    declared = _declared()
    queried = _queried(json.loads(DASHBOARD.read_text()))
    missing = sorted(n for n in queried - declared if n not in AWAITED)
    assert not missing, (f"dashboard queries opt_ray_{missing} but no code declares them "
                         f"(opt_ray.metrics.counter/gauge/histogram)")
    landed = sorted(AWAITED & declared)
    assert set(landed) <= queried
