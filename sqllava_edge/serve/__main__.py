"""python -m sqllava_edge.serve BUNDLE: see sqllava_edge.serve."""
from sqllava_edge.serve import main

raise SystemExit(main())
