"""Checkpoint -> deployment bundle, in one go: merge, vision ONNX, GGUF, tokenizer, manifest.

    python -m export CHECKPOINT --out BUNDLE [--quant q4_k_m ...] [--vision-precision fp32 fp16 int8]

The bundle replaces BUNDLE atomically, and an unchanged artifact of a previous bundle there is reused
(export/pipeline.py).
"""
from __future__ import annotations

import argparse

from export.fidelity import DEFAULT_PAIRS
from export.pipeline import DEFAULT_QUANTS, DTYPES, VISION_PRECISIONS, run_cli, run_export, supported_quants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="sqllava-edge checkpoint folder (LoRA adapters are merged on the way)")
    parser.add_argument("--out", required=True, help="bundle folder to create or update (replaced atomically)")
    parser.add_argument("--quant", nargs="+", default=list(DEFAULT_QUANTS), metavar="TYPE",
                        help=f"GGUF types to write (default: {' '.join(DEFAULT_QUANTS)}; known: {', '.join(supported_quants())})")
    parser.add_argument("--no-gguf", action="store_true", help="skip the LLM (vision ONNX + tokenizer only)")
    parser.add_argument("--vision-precision", nargs="+", default=list(VISION_PRECISIONS), choices=VISION_PRECISIONS,
                        help="vision ONNX variants: fp32 (reference), fp16 (GPU/TensorRT), int8 (CPU)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="precision to load and merge in; float32 is exact, 16-bit halves memory for 7B/13B")
    parser.add_argument("--no-reuse", action="store_true", help="re-export every artifact even if unchanged")
    parser.add_argument("--calibration", metavar="JSON",
                        help="LLaVA JSON whose images measure each artifact's fidelity vs fp32 PyTorch (e.g. the eval "
                             "set; default: the checkpoint's training data, else the validation text)")
    parser.add_argument("--calibration-pairs", type=int, default=DEFAULT_PAIRS,
                        help=f"images (first question + answer each) for the fidelity (default {DEFAULT_PAIRS})")
    parser.add_argument("--no-fidelity", action="store_true", help="skip measuring fidelity (sqllava-edge inspect "
                                                                    "shows none; the quality floor keeps such artifacts)")
    args = parser.parse_args(argv)
    return run_cli(lambda: run_export(args.checkpoint, args.out, quants=[] if args.no_gguf else args.quant,
                                      vision_precisions=args.vision_precision, reuse=not args.no_reuse, dtype=args.dtype,
                                      calibration=args.calibration, calibration_pairs=args.calibration_pairs,
                                      fidelity=not args.no_fidelity))


if __name__ == "__main__":
    raise SystemExit(main())
