"""`opt-ray dedup`: deduplicate a corpus with MinHash-LSH on Ray actors (Jaccard >= 0.95)."""

from __future__ import annotations

import argparse
import json
import sys

from opt_ray.errors import UserError

DESCRIPTION = """\
Remove near-duplicate documents the way OPT did: MinHash signatures of word 5-gram
shingles, LSH banding into partitioned buckets, candidates verified by exact Jaccard
similarity, and one survivor (the lowest id) per connected cluster of documents at
Jaccard >= --threshold. Workers (Ray tasks) read their own input files; intermediates
go to a work directory beside the output (.OUTPUT.dedup-work), so an interrupted run
resumes from its completed steps when run again with the same arguments.

Inputs: .jsonl / .ndjson (optionally .gz or .zst), .parquet, .txt (one document per
file), or directories of them (recursively; a dedup output directory is valid input).
Output directory: the kept records with all their fields as Parquet shards
(part-*.parquet, plus the id column opt_ray_id), clusters.parquet (every cluster member),
dedup_report.json (clusters with member ids and verified similarities, bad records by
file and line, counts, parameters, timings) and manifest.json. It is written atomically: it appears complete or not at all.
"""

EPILOG = """\
examples:
  opt-ray dedup corpus/ --output dedup-out
  opt-ray dedup a.jsonl.zst b.parquet --output out --threshold 0.85 --workers 4
  opt-ray dedup docs.jsonl --output out --id-field url --strict

Bands x rows default to the most selective split with >= 99% probability of making a
pair at the threshold a candidate (0.95 and 128 permutations: 8 x 16).
Exit status: 0 done, 2 bad input (one line on stderr; also when no usable document).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="deduplicate a corpus with MinHash-LSH on Ray actors "
                                     "(Jaccard >= 0.95)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="corpus files or directories (jsonl[.gz|.zst], parquet, txt)")
    p.add_argument("--output", "-o", required=True, metavar="DIR|URL",
                   help="output directory (must not exist unless --overwrite), or a bucket "
                        "URL (s3://bucket/dedup: the tasks share a work prefix beside it and "
                        "put the kept shards there themselves, the manifest goes up last; no "
                        "filesystem shared by the nodes is needed)")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="two documents are duplicates when the Jaccard similarity of their "
                        "shingle sets is >= this (default 0.95, as OPT)")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle (default 5)")
    p.add_argument("--num-perm", type=int, default=128,
                   help="MinHash permutations (default 128)")
    p.add_argument("--seed", type=int, default=1, help="MinHash seed (default 1, as datasketch)")
    p.add_argument("--bands", type=int, default=None,
                   help="LSH bands (with --rows; default: the most selective split with "
                        ">= 99%% candidate probability at the threshold)")
    p.add_argument("--rows", type=int, default=None, help="rows per LSH band (with --bands)")
    p.add_argument("--workers", type=int, default=2,
                   help="concurrent Ray tasks (1 CPU each; default 2); 0 runs every step in "
                        "this process, without Ray")
    p.add_argument("--buckets", type=int, default=None,
                   help="partitions of the LSH band keys, digests and ids, one task each "
                        "(default: one per 16 GB of text, estimated from the inputs' sizes, "
                        "at least 2; 800 GB: 50)")
    p.add_argument("--batch-docs", type=int, default=512,
                   help="documents signed at a time in a worker (default 512)")
    p.add_argument("--text-field", default="text",
                   help="record field holding the text (default 'text')")
    p.add_argument("--id-field", default=None,
                   help="record field holding a unique id (default: generated, "
                        "'<file>:<line>')")
    p.add_argument("--no-verify", action="store_true",
                   help="accept candidates by MinHash estimate instead of exact Jaccard "
                        "(faster, approximate; not recommended)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad record instead of skipping and reporting it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from opt_ray.ray_util import add_ray_args
    add_ray_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from opt_ray.data.dedup import DedupConfig, run_dedup
    from opt_ray.data.readers import check_output_dir, resolve_inputs
    from opt_ray.run_dir import is_url

    # Everything that can be wrong with the request is checked before Ray starts.
    files = resolve_inputs(args.inputs)
    cfg = DedupConfig(threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm,
                      seed=args.seed, bands=args.bands, rows=args.rows,
                      verify=not args.no_verify, batch_docs=args.batch_docs,
                      num_buckets=args.buckets)
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if is_url(args.output):
        from opt_ray.data.artifact_io import check_artifact_url
        from opt_ray.data.dedup import work_url
        args.output = args.output.rstrip("/")
        check_artifact_url(args.output, work_url(args.output), overwrite=args.overwrite)
    else:
        check_output_dir(args.output, overwrite=args.overwrite)
        args.output = str(Path(args.output).absolute())

    executor = None
    if args.workers > 0:
        from actors.dedup import RayExecutor
        from opt_ray.ray_util import init_ray
        init_ray(args.address, num_cpus=args.num_cpus)
        executor = RayExecutor(args.workers)
    report = run_dedup(args.inputs, args.output, cfg, executor, text_field=args.text_field,
                       id_field=args.id_field, strict=args.strict, overwrite=args.overwrite,
                       progress=not args.no_progress, files=files)
    c = report["counts"]
    print(json.dumps({"output": args.output, "docs": c["docs"],
                      "kept": c["docs_kept"], "removed": c["duplicates_removed"],
                      "bad_records": c["bad_records"], "mb_s": report["throughput_mb_s"]}))
    if c["bad_records"]:
        print(f"opt-ray dedup: skipped {c['bad_records']} bad records; see "
              f"{args.output}/dedup_report.json (input_errors)", file=sys.stderr)
    return 0
