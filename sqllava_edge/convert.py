"""`python -m sqllava_edge.convert`: the documented command of the importer in sqllava_edge/release/convert.py."""
from __future__ import annotations

from sqllava_edge.release.convert import *  # noqa: F401,F403  (the importer's public names, for existing imports)
from sqllava_edge.release.convert import __all__, main  # noqa: F401

if __name__ == "__main__":
    main()
