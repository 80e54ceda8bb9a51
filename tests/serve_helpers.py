"""A tiny random-weight HF-format OPT checkpoint with its own byte-level BPE tokenizer,
shared by the serving tests and the serving bench. Built with ``transformers`` (test
dependency) so that the reference implementation writes the checkpoint we load."""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Open pretrained transformers are decoder-only language models.",
    "Ray Serve runs replicas of a deployment behind an HTTP proxy.",
    "Continuous batching lets requests join and leave at every step.",
    "Zürich, café, naïve: bytes that span more than one token — ünïcödé ✓.",
]


def build_tokenizer(path: Path, vocab_size: int = 400, *, opt_bos: bool = False):
    """Byte-level BPE trained on a few sentences; ids 0..3 = <s> <pad> </s> <unk> as OPT's.

    ``opt_bos``: as OPT's own tokenizer, ``encode`` prepends bos ``</s>`` (a post-processor
    in tokenizer.json), and a ``tokenizer_config.json`` names the special tokens, so that
    ``transformers.AutoTokenizer`` (lm-eval's backends) loads the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    path.mkdir(parents=True, exist_ok=True)
    if opt_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))])
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>", "eos_token": "</s>",
            "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 2048}))
    tok.save(str(path / "tokenizer.json"))
    return tok


def build_checkpoint(path: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_positions: int = 256, init_std: float = 0.2, seed: int = 0,
                     opt_bos: bool = False) -> Path:
    """Write an HF OPT checkpoint (config.json + model.safetensors) + tokenizer.json
    (``opt_bos``: see ``build_tokenizer``)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    tok = build_tokenizer(path, opt_bos=opt_bos)
    vocab = ((tok.get_vocab_size() + 7) // 8) * 8
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, ffn_dim=4 * hidden,
                    max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, init_std=init_std,
                    dropout=0.0)
    torch.manual_seed(seed)
    OPTForCausalLM(cfg).save_pretrained(str(path))
    return path


class LocalServer:
    """The Ray-free front end (HTTP, and gRPC when asked) over an in-process engine, on
    127.0.0.1 free ports, its event loop on a background thread. A context manager."""

    def __init__(self, checkpoint: Path, *, model_name: str = "opt-tiny", engine_config=None,
                 frontend_config=None, grpc: bool = False):
        self.checkpoint, self.model_name, self.grpc = checkpoint, model_name, grpc
        self.engine_config, self.frontend_config = engine_config, frontend_config

    def __enter__(self) -> "LocalServer":
        import asyncio
        import threading

        from opt_ray.serve.engine import EngineConfig, EngineLoop, engine_from_checkpoint
        from opt_ray.serve.frontend import Frontend, LocalEngineHandle
        from opt_ray.serve.grpc_service import start_grpc_server
        from opt_ray.serve.http import HttpServer
        from tests.conftest import free_port

        self.engine = engine_from_checkpoint(self.checkpoint, self.engine_config or EngineConfig())
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.error: BaseException | None = None

        async def start() -> None:
            self.engine_loop = EngineLoop(self.engine)
            self.frontend = Frontend.for_checkpoint(LocalEngineHandle(self.engine_loop), self.checkpoint,
                                                    model_name=self.model_name,
                                                    max_model_len=self.engine.max_model_len,
                                                    config=self.frontend_config)
            port = free_port()
            self.http = HttpServer(self.frontend, "127.0.0.1", port)
            await self.http.start()
            self.base = f"http://127.0.0.1:{port}"
            self.grpc_server = None
            if self.grpc:
                self.grpc_address = f"127.0.0.1:{free_port()}"
                self.grpc_server = await start_grpc_server(self.frontend, self.grpc_address)

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                self.error = e
                return
            finally:
                started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="opt-ray-test-server", daemon=True)
        self.thread.start()
        started.wait(60)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc) -> None:
        import asyncio

        async def stop() -> None:
            if self.grpc_server is not None:
                await self.grpc_server.stop(grace=1)
            await self.http.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine_loop.stop()
        self.frontend.close()


def actor_pids(*class_names: str) -> set[int]:
    """PIDs of the live actors of these classes on the connected Ray cluster, from the
    GCS's actor table (Ray's state API needs the dashboard, which test clusters run
    without)."""
    import ray
    return {a["Pid"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] in class_names}
