"""`opt-ray tokenize`: tokenize a dedup output into packed Arrow token shards.

Each input file is one task (a Ray task on ``--workers`` CPUs, or in this process with
``--workers 0``) that reads it, encodes, packs documents separated by eos into rows of
``--seq-len + 1`` tokens and writes and checksums its own shards; the driver writes the
manifest (see ``opt_ray.data.tokenize_pipeline``). An interrupted run resumes from the
files it completed when run again with the same arguments.
"""

from __future__ import annotations

import argparse

from opt_ray.ray_util import add_ray_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="tokenize a dedup output into packed Arrow token shards",
                       description="Tokenize a corpus (a dedup output directory, or any jsonl/"
                                   "parquet/txt input) into packed Arrow IPC token shards with a "
                                   "train/valid split by document.")
    p.add_argument("inputs", nargs="+", metavar="DEDUP_DIR",
                   help="dedup output directory (or corpus files / directories)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer artifact dir, tokenizer.json, or a dir with vocab.json + merges.txt")
    p.add_argument("--seq-len", type=int, required=True,
                   help="training sequence length; rows hold seq_len + 1 tokens")
    p.add_argument("--output", required=True,
                   help="shards artifact directory to write, or a bucket URL (s3://bucket/shards: "
                        "each task puts its own shards there, the manifest goes up last; no "
                        "filesystem shared by the nodes is needed; `opt-ray train --data URL` "
                        "reads it)")
    p.add_argument("--workers", type=int, default=2,
                   help="concurrent Ray encoder tasks (one input file each, one CPU each); 0 "
                        "encodes in this process (default: 2)")
    p.add_argument("--valid-fraction", type=float, default=0.02,
                   help="fraction of documents held out for validation (default: 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split (default: 0)")
    p.add_argument("--text-field", default="text", help="record field holding the text (default: text)")
    p.add_argument("--id-field", default=None,
                   help="record field with a stable document id for the split (default: the "
                        "reader's id)")
    p.add_argument("--shard-tokens", type=int, default=None,
                   help="tokens per shard file (default: 32Mi)")
    p.add_argument("--batch-chars", type=int, default=1 << 18,
                   help="characters of text a worker encodes at a time (default: 262144)")
    p.add_argument("--max-doc-chars", type=int, default=1 << 20,
                   help="longer documents are encoded in pieces of at most this many "
                        "characters, cut at spaces (default: 1048576)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_ray_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opt_ray.data.readers import check_output_dir, resolve_inputs
    from opt_ray.data.shards import DEFAULT_SHARD_TOKENS, source_info
    from opt_ray.data.tokenize_pipeline import tokenize_files
    from opt_ray.data.tokenizer import load_tokenizer
    from opt_ray.errors import UserError
    from opt_ray.run_dir import is_url

    url = args.output.rstrip("/") if is_url(args.output) else None
    if url:
        from opt_ray.data.shards import check_shards_url
        # Each task puts its own shards in the bucket; the manifest goes up last. An
        # interrupted run resumes from the input files it finished (the work prefix).
        check_shards_url(url, overwrite=args.overwrite)   # before any work
        args.output = url
    else:
        check_output_dir(args.output, overwrite=args.overwrite)   # before any work
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    for flag in ("batch_chars", "max_doc_chars"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    tok = load_tokenizer(args.tokenizer)
    files = resolve_inputs(args.inputs)
    executor = None
    if args.workers > 0:
        from actors.tokenize import ray_executor
        from opt_ray.ray_util import init_ray

        init_ray(args.address, num_cpus=args.num_cpus)
        executor = ray_executor(args.workers)
    source = {**source_info(args.inputs), "tokenizer_path": args.tokenizer}
    out = tokenize_files(files, tok, args.output, seq_len=args.seq_len,
                         valid_fraction=args.valid_fraction, seed=args.seed,
                         text_field=args.text_field, id_field=args.id_field, executor=executor,
                         shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                         batch_chars=args.batch_chars, max_doc_chars=args.max_doc_chars,
                         source=source, progress=not args.no_progress,
                         overwrite=args.overwrite)
    from opt_ray.data.shards import read_shards_manifest

    m = read_shards_manifest(out)
    sp = m["splits"]
    print(f"tokenize: {out}: train {sp['train']['rows']} rows ({sp['train']['docs']} docs), "
          f"valid {sp['valid']['rows']} rows ({sp['valid']['docs']} docs), seq_len {m['seq_len']}, "
          f"{m['dtype']}, {m['tokens_per_second']} tokens/s")
    bad = m["source"]["bad_records"]["total"]
    if bad:
        print(f"tokenize: skipped {bad} bad records (see the manifest)")
    return 0
