"""python -m export.gguf CHECKPOINT --out BUNDLE [--quant f32 q8_0 q4_k_m ...]: the export pipeline with only the GGUF
step (export/pipeline.py), the LLM merged first."""
from __future__ import annotations

import argparse

from export import gguf
from export.pipeline import DTYPES, run_cli, run_export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.gguf", description=gguf.__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="sqllava-edge checkpoint folder (LoRA adapters are merged first)")
    parser.add_argument("--out", required=True, help="bundle folder: OUT/llm/model.<quant>.gguf + manifest.json "
                                                     "(written atomically)")
    parser.add_argument("--quant", nargs="+", default=["f16"], metavar="TYPE",
                        help=f"GGUF types to write (default f16; valid: {', '.join(gguf.QUANTS)})")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="precision to load and merge the checkpoint in")
    args = parser.parse_args(argv)
    return run_cli(lambda: run_export(args.checkpoint, args.out, quants=gguf.check_quants(args.quant),
                                      vision_precisions=[], include_tokenizer=False, dtype=args.dtype))


if __name__ == "__main__":
    raise SystemExit(main())
