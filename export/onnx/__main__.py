"""python -m export.onnx CHECKPOINT --out FOLDER [--precision fp32 fp16 int8]: the export pipeline with only the vision
ONNX step (export/pipeline.py); or, with --random-preset, a preset's vision graph with random weights."""
from __future__ import annotations

import argparse

from export import onnx
from export.pipeline import run_cli, run_export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=onnx.__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="sqllava-edge checkpoint folder (LoRA adapters are merged first)")
    parser.add_argument("--out", required=True, help="output folder: FOLDER/vision/*.onnx + manifest.json (written atomically)")
    parser.add_argument("--precision", nargs="+", default=list(onnx.PRECISIONS), choices=onnx.PRECISIONS,
                        help="variants to export")
    parser.add_argument("--random-preset", metavar="PRESET", help="instead of a checkpoint: random weights of a preset "
                                                                  "(e.g. bench-1b), to measure export time and memory")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.random_preset is None):
        parser.error("give either CHECKPOINT or --random-preset")
    if args.random_preset:
        return run_cli(lambda: onnx.export_random_preset(args.random_preset, args.out, args.precision))
    return run_cli(lambda: run_export(args.checkpoint, args.out, vision_precisions=args.precision, quants=[],
                                      include_tokenizer=False))


if __name__ == "__main__":
    raise SystemExit(main())
