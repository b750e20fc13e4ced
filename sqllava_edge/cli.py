"""`sqllava-edge` command line: one argparse parser with a subcommand per task.

    sqllava-edge inspect BUNDLE [--json] [--no-verify]   print a bundle's manifest and verify every artifact's sha256

Each subcommand is a `register_<name>(subparsers)` function that adds its parser and sets `func`; `func(args)`
returns the exit code. More subcommands (ask, self-question, chat) are registered the same way.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def register_inspect(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="print a bundle's manifest and verify its artifacts' hashes",
                                   description="Print a deployment bundle's manifest and check every artifact file "
                                               "against its recorded sha256. Exit code 1 if any file is missing or changed.")
    parser.add_argument("bundle", help="bundle folder (written by python -m export)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    parser.add_argument("--no-verify", action="store_true", help="skip hashing the artifact files")
    parser.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from sqllava_edge.bundle import read_manifest
    from sqllava_edge.errors import BundleError

    manifest = read_manifest(args.bundle, verify=False)
    failures: dict[str, str] = {}
    if not args.no_verify:
        for artifact in manifest.artifacts:
            try:
                artifact.verify(args.bundle)
            except BundleError as exc:
                failures[artifact.path] = str(exc)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print(_summary(manifest, failures, verified=not args.no_verify))
    for message in failures.values():
        print(f"error: {message}", file=sys.stderr)
    return 1 if failures else 0


def _summary(manifest, failures: dict[str, str], verified: bool) -> str:
    model, pre, prov = manifest.model, manifest.preprocessing, manifest.provenance
    lines = [
        f"bundle schema {manifest.schema_version}: model {model.get('name')} (template {manifest.template})",
        f"  image: {pre.get('image_size')} px, {pre.get('mode')}, {pre.get('resample')}; "
        f"{manifest.num_image_tokens} image tokens x {manifest.embed_dim}",
        f"  special tokens: {', '.join(f'{k}={v}' for k, v in manifest.special_tokens.items())}",
        f"  source: {prov.get('source_checkpoint', '?')} (sha256 {str(prov.get('source_sha256', '?'))[:16]}...), "
        f"created {prov.get('created', '?')}",
        f"  artifacts ({len(manifest.artifacts)}):",
    ]
    for artifact in manifest.artifacts:
        status = "not verified" if not verified else ("MODIFIED/MISSING" if artifact.path in failures else "sha256 ok")
        lines.append(f"    {artifact.kind:<16} {artifact.precision or '-':<7} {artifact.size / 2**20:9.2f} MiB  "
                     f"{artifact.path}  [{status}]")
        numbers = _validation_line(artifact.validation)
        if numbers:
            lines.append(f"      validation: {numbers}")
        if artifact.target:
            lines.append(f"      target: {', '.join(f'{k}={v}' for k, v in artifact.target.items() if k in ('gpu', 'compute_capability', 'tensorrt', 'jetson'))}")
    tools = prov.get("tools", {})
    if tools:
        lines.append(f"  tools: {', '.join(f'{k} {v}' for k, v in tools.items())}")
    return "\n".join(lines)


def _validation_line(validation: dict) -> str:
    keys = ("max_abs_diff", "cosine_min", "cosine_mean", "dispatch_mismatches", "top1_agreement", "argmax_agreement", "skipped")
    parts = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in validation.items() if k in keys]
    return ", ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqllava-edge", description="SQ-LLaVA on edge devices")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_inspect(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sqllava_edge.errors import SQLLaVAError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SQLLaVAError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
