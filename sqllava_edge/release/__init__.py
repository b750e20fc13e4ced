"""Importing released checkpoints (SQ-LLaVA, liuhaotian LLaVA-1.5, llava-hf) and writing the official layout.

    python -m sqllava_edge.convert --help      (the same as python -m sqllava_edge.release.convert)

Modules: `names` (the name tables, no torch), `official` (config translation both ways, `export_official`),
`weights` (safe shard readers / writers, torch), `convert` (the importer, `load_any`, the command line).
The facts the importer relies on: docs/importing.md.
"""
