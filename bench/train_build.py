"""Build-time memory per rank: the model built sharded (``opt_ray.model.parallel.build_sharded``:
meta -> FSDP2 -> local shards only -> the paper's init) on 1, 2, 4 gloo processes.

Each rank records its peak RSS growth during the build (Linux: ``/proc/self/clear_refs``
resets the high-water mark, ``VmHWM`` reads it) and a fingerprint (sha256) of a few full tensors
(gathered after the measurement), which must not depend on the number of ranks.

    python -m bench.train_build --preset 1.3b --layers 4 --ranks 1 2 4   # one JSON line
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

FINGERPRINT = ("model.decoder.embed_tokens.weight", "model.decoder.layers.0.fc2.weight",
               "model.decoder.layers.0.self_attn.q_proj.weight")


def _kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rank(rank: int, world: int, port: int, preset: str, layers: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.tensor import DTensor

    from opt_ray.config import num_params
    from opt_ray.config import preset as get_preset
    from opt_ray.model.parallel import build_sharded

    # Libraries the build imports on its first call (FSDP2, and through it dynamo and
    # sympy: ~30 MiB of code and import-time objects) are loaded before the baseline:
    # they are the process's, not the model's.
    import torch._dynamo  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    cfg = get_preset(preset).model.replace(num_hidden_layers=layers)
    dist.barrier()
    base = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    t0 = time.perf_counter()
    model = build_sharded(cfg, device="cpu", seed=0, fsdp=world > 1)
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    dist.barrier()
    params = dict(model.named_parameters())
    fp = {}
    for name in FINGERPRINT:
        p = params[name]
        full = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        fp[name] = hashlib.sha256(full.contiguous().numpy().tobytes()).hexdigest()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "base_rss_mib": base / 1024, "peak_rss_mib": peak / 1024,
        "build_growth_mib": (peak - base) / 1024, "seconds": seconds,
        "model_fp32_mib": num_params(cfg) * 4 / 2**20, "fingerprint": fp}))
    dist.destroy_process_group()


def measure(ranks: int, preset: str = "1.3b", layers: int = 4) -> list[dict]:
    """Build on ``ranks`` gloo processes; returns each rank's record."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(ranks, port, preset, layers, out), nprocs=ranks, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the preset's width)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args(argv)
    res = {"bench": "train_build", "preset": args.preset, "layers": args.layers,
           "load_avg": os.getloadavg()}
    for n in args.ranks:
        recs = measure(n, args.preset, args.layers)
        res[f"ranks_{n}"] = {"build_growth_mib_per_rank": [round(r["build_growth_mib"]) for r in recs],
                             "peak_rss_mib_per_rank": [round(r["peak_rss_mib"]) for r in recs],
                             "seconds": round(max(r["seconds"] for r in recs), 2),
                             "model_fp32_mib": round(recs[0]["model_fp32_mib"]),
                             "fingerprint": recs[0]["fingerprint"]}
    fps = [res[f"ranks_{n}"]["fingerprint"] for n in args.ranks]
    res["init_independent_of_ranks"] = all(f == fps[0] for f in fps)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
