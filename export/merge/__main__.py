"""python -m export.merge CHECKPOINT --out MERGED [--dtype float32|float16|bfloat16] [--no-validate]: the adapters
merged into the base weights, saved as a plain checkpoint (export/merge)."""
from __future__ import annotations

import argparse

from export import merge
from export.pipeline import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.merge", description=merge.__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="sqllava-edge checkpoint folder with llm_lora/ and/or vit_lora/")
    parser.add_argument("--out", required=True, help="merged checkpoint folder to write (atomically)")
    parser.add_argument("--dtype", default="float32", choices=sorted(merge.DTYPES),
                        help="precision to merge and save in (float32 is exact; 16-bit halves memory for 7B/13B)")
    parser.add_argument("--no-validate", action="store_true", help="skip the merged-vs-adapters logits check")
    args = parser.parse_args(argv)
    return run_cli(lambda: merge.merge_checkpoint(args.checkpoint, args.out, dtype=merge.DTYPES[args.dtype],
                                                  validate=not args.no_validate))


if __name__ == "__main__":
    raise SystemExit(main())
