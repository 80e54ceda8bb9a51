"""`opt-ray tokenizer`: load (GPT-2 vocab/merges or tokenizer.json) or train a byte-level BPE tokenizer.

Either way the result is a tokenizer artifact: ``tokenizer.json`` (plus GPT-2 style
``vocab.json`` / ``merges.txt``) beside a manifest, which tokenize, training, evaluation
and serving all load with ``opt_ray.data.tokenizer.load_tokenizer``.
"""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


SAMPLE_DEFAULT = "1GB"
OUTPUT_HELP = ("tokenizer artifact to write: a directory, or a bucket prefix (s3://bucket/tok; "
               "the standard AWS environment variables), uploaded with its manifest last")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="load (GPT-2 vocab/merges or tokenizer.json) or train a byte-level BPE tokenizer",
                       description="Load a GPT-2/OPT tokenizer (vocab.json + merges.txt or "
                                   "tokenizer.json, e.g. an HF OPT checkpoint directory) or train "
                                   "a byte-level BPE on a corpus, and save it as a tokenizer artifact.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    load = actions.add_parser("load", help="import an existing tokenizer",
                              description="Import vocab.json + merges.txt or tokenizer.json (a file "
                                          "or a directory holding them) as a tokenizer artifact.")
    load.add_argument("path", metavar="PATH", help="tokenizer.json, vocab.json, or a directory with "
                                                   "either; local or a bucket URL (s3://...)")
    load.add_argument("--output", required=True, help=OUTPUT_HELP)
    load.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    train = actions.add_parser("train", help="train a byte-level BPE on a corpus",
                               description="Train a GPT-2 style byte-level BPE (OPT special tokens "
                                           "<s> 0, <pad> 1, </s> 2, <unk> 3) on a corpus.")
    train.add_argument("corpus", nargs="+", metavar="CORPUS",
                       help="jsonl[.gz|.zst], parquet, txt files or directories (a dedup output too)")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="vocabulary size including the 4 special tokens (OPT: 50265)")
    train.add_argument("--output", required=True, help=OUTPUT_HELP)
    train.add_argument("--min-frequency", type=int, default=2,
                       help="minimum pair count for a merge (default: 2)")
    train.add_argument("--text-field", default="text", help="record field holding the text (default: text)")
    train.add_argument("--sample", default=SAMPLE_DEFAULT, metavar="SIZE",
                       help=f"characters of text to train on (default {SAMPLE_DEFAULT}; 'all': the "
                            "whole corpus): each input file gives its first records up to its "
                            "share, in proportion to its size, so a corpus of hundreds of GB is "
                            "not read whole by this one process (BPE merges settle long before)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from opt_ray.data.readers import check_output_dir
    from opt_ray.data.tokenizer import describe, load_tokenizer, save_tokenizer, train_tokenizer

    if args.action in ("load", "train"):
        check_output_dir(args.output, overwrite=args.overwrite)   # before any work
    if args.action == "train":
        from opt_ray.sizes import parse_size
        sample = None if args.sample.strip().lower() == "all" else parse_size(args.sample, "--sample")
    if args.action == "load":
        tok = load_tokenizer(args.path)
        from opt_ray.run_dir import is_url
        source = {"from": "load",
                  "path": args.path if is_url(args.path) else str(Path(args.path).absolute())}
    elif args.action == "train":
        from tqdm import tqdm

        from opt_ray.data.readers import InputErrors, iter_sample, resolve_inputs, text_weight
        from opt_ray.data.shards import source_info

        files = resolve_inputs(args.corpus)
        errors = InputErrors()
        total = sum(text_weight(f) for f in files)
        bar = tqdm(total=min(sample or total, total), unit="char", unit_scale=True,
                   desc="tokenizer: reading text", disable=args.no_progress, leave=False)
        used = {"docs": 0, "chars": 0}

        def texts():
            for r in iter_sample(files, sample, text_field=args.text_field, errors=errors):
                used["docs"] += 1
                used["chars"] += len(r[args.text_field])
                bar.update(len(r[args.text_field]))
                yield r[args.text_field]

        tok = train_tokenizer(texts(), args.vocab_size, min_frequency=args.min_frequency)
        bar.close()
        source = {"from": "train", **source_info(args.corpus), "vocab_size": args.vocab_size,
                  "min_frequency": args.min_frequency, "bad_records": errors.to_dict(),
                  "sample": {"chars_asked": sample, "chars": used["chars"],
                             "docs": used["docs"], "files": len(files)}}
        if errors.total:
            print(f"tokenizer: skipped {errors.total} bad records (see the manifest)")
        print(f"tokenizer: trained on {used['chars']:,} characters of {used['docs']:,} documents "
              f"from {len(files)} files" + ("" if sample is None else f" (--sample {args.sample})"))
    else:
        args._parser.print_help()
        raise UserError("choose an action: 'opt-ray tokenizer load PATH --output DIR' or "
                        "'opt-ray tokenizer train CORPUS --vocab-size N --output DIR'")
    out = save_tokenizer(tok, args.output, source=source, overwrite=args.overwrite)
    info = describe(tok)
    print(f"tokenizer: {out} (vocab {info['vocab_size']}, special ids {info['special_ids']}, "
          f"hash {info['hash'][:12]})")
    return 0
