"""training: everything here needs torch, transformers and peft (pip install 'sqllava-edge[train]')."""
from sqllava_edge.deps import explain_when_run_as_main

explain_when_run_as_main("train", __name__)
