"""Convert insightface RecordIO (.rec/.idx) or a folder per identity into largefr shards."""
from __future__ import annotations

import argparse
import logging
import time

from largefr.data.build import DEFAULT_SHARD_BYTES, parse_size
from largefr.data.convert import convert_folder, convert_rec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="kind", required=True, choices=("rec", "folder"),
                        help="source kind: rec (PATH/train.rec with train.idx beside it) or folder (DIR/<identity>/*)")
    parser.add_argument("source", help="the .rec file or the folder of identity sub-folders")
    parser.add_argument("--out", required=True, help="output dataset directory (rerun to resume)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--shard-size", default=str(DEFAULT_SHARD_BYTES), help="target shard size, e.g. 1G, 256M")
    parser.add_argument("--image-size", type=int, default=112, help="output images are SIZE x SIZE")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when an image is re-encoded")
    parser.add_argument("--verify", action="store_true", help="decode every image (slower; drops corrupt ones now)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order instead of mixing shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be in [1, 100], got {args.quality}")
    if args.image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {args.image_size}")
    convert = convert_rec if args.kind == "rec" else convert_folder
    start = time.perf_counter()
    manifest = convert(args.source, args.out, shard_bytes=parse_size(args.shard_size), workers=args.workers,
                       shuffle=not args.no_shuffle, seed=args.seed, image_size=(args.image_size, args.image_size),
                       quality=args.quality, verify=args.verify, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(f"wrote {manifest.num_samples} images of {manifest.num_classes} classes in {len(manifest.shards)} shards "
          f"to {args.out} in {seconds:.1f}s; skipped {manifest.extra.get('skipped', 0)} unusable images")
    return 0
