"""The CPU demo's training budget (`make demo`, scripts/demo.py; measured in training/RESULTS.md), in a module of
its own so the demo and `python -m benchmarks.train` (which times the demo's stages) read the same numbers.

Optimizer steps per stage with the tiny-demo recipe (training/recipes.py). Stage 0 makes the stand-ins for CLIP and
Vicuna that the tiny preset lacks offline; stages 1 and 2 are SQ-LLaVA's own. No imports: the demo reads this before
anything heavy is loaded.
"""

STEPS = {"0-vision": 800, "0-llm": 1000, "1": 300, "2": 400}
VISION_GRAY_SHARE = 0.5  # stage 0 vision: half the images grey, so shape is read from the outline, not tied to colour
