"""A synthetic visual-instruction dataset in the LLaVA JSON format (docs/spec.md 4.5) that a tiny model can learn on a CPU.

    python -m training.synthetic OUT [--n-train N] [--n-eval M] [--seed S] [--image-size PX]

writes
    OUT/images/{train,eval}/*.png    1-4 coloured shapes on a varied (tinted, graded, noisy) background
    OUT/stage1.json                  one caption per training image (stage 1, `plain` format)
    OUT/stage2.json                  multi-turn Q&A per training image (stage 2, `v1_sq`): half start with a
                                     description; with --json-rate R, R of the others with a JSON question
    OUT/eval.json                    held-out images, each holding at least one colour/shape pair never seen in training

Questions ask about colour, shape, count, position (left/right, top/bottom) and size, with several phrasings per type;
every question names an object that is in the image (by shape, colour or both), so a colour question about the
triangle needs binding when several shapes are present. Shapes are unique within an image; a colour may repeat, and
then only count questions use it as a reference. Answers are single canonical words ("red", "triangle", "2", "left",
"big") so exact match works. Every sample carries a "meta" record (objects, question types) for the evaluation.
With --json-rate, that share of the stage-2 conversations without a description opens with one more turn, a
question asking for a JSON answer: the colour and shape of one object, or the count of a colour, answered in the
compact form the JSON-schema decoder (sqllava_edge/structured.py) emits for JSON_SCHEMAS:
`{"colour":"red","shape":"star"}`, `{"count":2}`. It is always the first turn, which is never turned into a
self-questioning (VUSER) turn, so the model learns to answer in JSON but not to ask JSON questions; eval.json has none
(the demo asks them, scripts/demo.py).
Objects sit on an 8 x 8 lattice by default (a small shape fills one cell, a big one 2 x 2 cells): at 112 px that is
the tiny preset's patch grid, so each patch sees a whole small shape or a whole quarter of a big one. With free
placement (--grid 0) shapes straddle patch borders, and a per-patch learner needs far more images to tell them
apart (measured: shape-presence probe at 67 % vs 92 % after 4,800 images).
The output is a deterministic function of the seed: image i of a split uses its own generator seeded by (seed, split, i).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sqllava_edge.fileutil import atomic_dir

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# One unseen pair per colour and per shape (a Latin-square diagonal): training never shows these combinations.
HELD_OUT = frozenset((c, SHAPES[(i + 2) % len(SHAPES)]) for i, c in enumerate(COLOURS))
BACKGROUNDS = ((205, 205, 205), (120, 120, 120), (60, 60, 66), (225, 214, 190), (175, 185, 175), (30, 32, 40))
SIZE_RADIUS = {"big": (0.15, 0.18), "small": (0.075, 0.09)}  # radius as a share of the image side
GRID_FILL = 0.8  # on a grid, an object's radius is this share of half its cell block
SIDE_MARGIN = 0.42  # centre x < 0.42 W is "left", > 0.58 W "right"; in between no left/right question is asked

DESCRIBE_PROMPTS = (
    "Can you describe the image in detail?",  # the self-questioning demo's first question (docs/spec.md 5.1)
    "Describe the image.",
    "What do you see in this picture?",
    "Give a short description of the image.",
)
CAPTION_PROMPTS = ("Describe the image briefly.", "Write a caption for this image.", "What is shown here?")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {ref}?", "What is the colour of the {ref}?", "Which colour does the {ref} have?",
               "Tell me the colour of the {ref}."),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?", "What is the {colour} shape?",
              "Name the shape of the {colour} object."),
    "count": ("How many {colour} shapes are there?", "How many shapes are {colour}?", "Count the {colour} shapes.",
              "What is the number of {colour} objects?"),
    "horizontal": ("Is the {ref} on the left or on the right?", "Which side is the {ref} on, left or right?",
                   "Is the {ref} in the left or right half of the image?"),
    "vertical": ("Is the {ref} at the top or at the bottom?", "Is the {ref} near the top or the bottom?",
                 "Is the {ref} in the top or bottom half of the image?"),
    "size": ("Is the {ref} big or small?", "What size is the {ref}, big or small?", "Is the {ref} a big or a small shape?"),
}
# Evaluation groups the two position axes into one "position" type.
QUESTION_GROUP = {"colour": "colour", "shape": "shape", "count": "count", "horizontal": "position",
                  "vertical": "position", "size": "size"}
# Questions answered in JSON (type "json" in a sample's meta; not an evaluation group): "object" names one object
# and asks for its colour and shape, "count" names a colour and asks how many objects have it.
JSON_QUESTIONS: dict[str, tuple[str, ...]] = {
    "object": ("Answer in JSON: what are the colour and shape of the {ref}?",
               "Answer in JSON with the colour and shape of the {ref}.",
               "Give the colour and shape of the {ref} as JSON."),
    "count": ("Answer in JSON: how many {colour} shapes are there?", "Give the number of {colour} objects as JSON."),
}
JSON_SCHEMAS: dict[str, dict] = {
    "object": {"type": "object", "additionalProperties": False, "required": ["colour", "shape"],
               "properties": {"colour": {"enum": list(COLOURS)}, "shape": {"enum": list(SHAPES)}}},
    "count": {"type": "object", "additionalProperties": False, "required": ["count"],
              "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 4}}},
}
JSON_COUNT_SHARE = 0.25  # share of the JSON questions asking for a count (the rest: an object's colour and shape)
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "count": ("1", "2", "3", "4"), "horizontal": ("left", "right"),
    "vertical": ("top", "bottom"), "size": ("big", "small"),
}


@dataclass
class Obj:
    colour: str
    shape: str
    size: str  # "big" | "small"
    x: float  # centre, share of the image width (0 = left)
    y: float  # centre, share of the image height (0 = top)
    r: float  # radius, share of the image side

    @property
    def horizontal(self) -> str | None:
        return "left" if self.x < SIDE_MARGIN else "right" if self.x > 1 - SIDE_MARGIN else None

    @property
    def vertical(self) -> str | None:
        return "top" if self.y < SIDE_MARGIN else "bottom" if self.y > 1 - SIDE_MARGIN else None


# ----------------------------------------------------------------------------------------------------------------
# Scenes


def sample_scene(rng: np.random.Generator, held_out: bool, grid: int = 0) -> list[Obj]:
    """1-4 objects with distinct shapes; colours may repeat. held_out=True forces at least one unseen pair."""
    while True:
        n = int(rng.integers(1, 5))
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
        colours: list[str] = []
        for _ in shapes:
            if colours and rng.random() < 0.3:  # repeat a colour now and then so colour counts vary
                colours.append(colours[int(rng.integers(len(colours)))])
            else:
                colours.append(list(COLOURS)[int(rng.integers(len(COLOURS)))])
        unseen = [(c, s) in HELD_OUT for c, s in zip(colours, shapes)]
        if any(unseen) == held_out:
            break
    objects = []
    for colour, shape in zip(colours, shapes):
        placed = _place_on_grid(rng, objects, grid) if grid else _place(rng, objects)
        if placed is None:  # too crowded: keep the objects that fit
            break
        size, x, y, r = placed
        objects.append(Obj(colour, shape, size, x, y, r))
    if held_out and not any((o.colour, o.shape) in HELD_OUT for o in objects):
        return sample_scene(rng, held_out, grid)
    return objects


def _place_on_grid(rng: np.random.Generator, objects: list[Obj], grid: int) -> tuple[str, float, float, float] | None:
    """A small object fills one cell of a grid x grid lattice, a big one a 2 x 2 block; cells never overlap."""
    taken = {(cx, cy) for o in objects for cx, cy in _cells(o, grid)}
    for _ in range(200):
        size = "big" if rng.random() < 0.5 else "small"
        span = 2 if size == "big" else 1
        col, row = (int(v) for v in rng.integers(0, grid - span + 1, size=2))
        cells = {(col + i, row + j) for i in range(span) for j in range(span)}
        if not cells & taken:
            return size, (col + span / 2) / grid, (row + span / 2) / grid, GRID_FILL * span / (2 * grid)
    return None


def _cells(o: Obj, grid: int) -> list[tuple[int, int]]:
    span = 2 if o.size == "big" else 1
    col, row = round(o.x * grid - span / 2), round(o.y * grid - span / 2)
    return [(col + i, row + j) for i in range(span) for j in range(span)]


def patch_contents(objects: list[dict | Obj], grid: int) -> list[Obj | None]:
    """What sits in each cell of the grid x grid lattice, in raster order (row by row): the object or None.

    For a dataset written on the lattice (the default) the cells are the tiny preset's image patches, so this is a
    per-patch annotation of the image; the stage-0 trainers (training/pretrain_vision.py, pretrain_llm.py --scenes)
    learn from it.
    """
    cells: list[Obj | None] = [None] * (grid * grid)
    for o in objects:
        obj = o if isinstance(o, Obj) else Obj(**o)
        for cx, cy in _cells(obj, grid):
            if not (0 <= cx < grid and 0 <= cy < grid):
                raise ValueError(f"object {obj} is not on a {grid} x {grid} lattice; was the dataset written with --grid 0?")
            cells[cy * grid + cx] = obj
    return cells


def patch_halves(grid: int) -> list[tuple[str, str]]:
    """(left|right, top|bottom) of each cell of the lattice in raster order: the halves the position questions ask."""
    return [("left" if col < grid / 2 else "right", "top" if row < grid / 2 else "bottom")
            for row in range(grid) for col in range(grid)]


def row_patches(row: dict, grid: int, index: int = 0) -> list[Obj | None]:
    """`patch_contents` of one dataset sample, with a clear error for samples that carry no scene annotation."""
    if "meta" not in row or "objects" not in row["meta"]:
        raise ValueError(f"sample {row.get('id', index)} has no meta.objects; per-patch scenes need a dataset written "
                         "by python -m training.synthetic")
    return patch_contents(row["meta"]["objects"], grid)


def lattice(data_json: str | Path, vision=None) -> int:
    """The lattice size a synthetic dataset was written with, from the dataset_info.json beside its JSON files; with
    `vision` (a VisionConfig), also checked to be that preset's patch grid."""
    info = Path(data_json).parent / "dataset_info.json"
    if not info.is_file():
        raise FileNotFoundError(f"{info} not found: scene annotations need a dataset written by python -m training.synthetic")
    grid = int(json.loads(info.read_text()).get("grid", 0))
    if grid < 1:
        raise ValueError(f"{info}: the dataset was written with free placement (--grid 0); per-patch scenes need a lattice")
    if vision is not None:
        side = vision.image_size // vision.patch_size
        if grid != side or grid * grid != vision.num_image_tokens:
            raise ValueError(f"{data_json}: the dataset's {grid} x {grid} lattice is not the preset's {side} x {side} "
                             f"patch grid; write it with python -m training.synthetic --image-size {vision.image_size} "
                             f"--grid {side}")
    return grid


def _place(rng: np.random.Generator, objects: list[Obj]) -> tuple[str, float, float, float] | None:
    for _ in range(200):
        size = "big" if rng.random() < 0.5 else "small"
        r = float(rng.uniform(*SIZE_RADIUS[size]))
        x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
        if all(math.hypot(x - o.x, y - o.y) > r + o.r + 0.03 for o in objects):
            return size, x, y, r
    return None


def render(objects: list[Obj], size: int, rng: np.random.Generator) -> Image.Image:
    """Background: a random neutral tone with a vertical gradient and pixel noise; shapes drawn at 2x, downsampled."""
    base = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32)
    tint = rng.uniform(-15, 15, size=3)
    ramp = np.linspace(-1, 1, size)[:, None, None] * rng.uniform(-25, 25)  # (S, 1, 1) vertical gradient
    noise = rng.normal(0, 6, size=(size, size, 3))
    pixels = np.clip(base + tint + ramp + noise, 0, 255).astype(np.uint8)  # (S, S, 3)
    big = Image.fromarray(pixels).resize((2 * size, 2 * size), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    side = 2 * size
    for o in objects:
        draw.polygon(_outline(o.shape, o.x * side, o.y * side, o.r * side), fill=COLOURS[o.colour])
    return big.resize((size, size), Image.BILINEAR)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(radii: list[float], start: float) -> list[tuple[float, float]]:
        step = 2 * math.pi / len(radii)
        return [(cx + q * math.cos(start + k * step), cy + q * math.sin(start + k * step)) for k, q in enumerate(radii)]

    if shape == "circle":
        return ring([r] * 48, 0.0)
    if shape == "square":
        return ring([r * 1.2] * 4, math.pi / 4)  # half side = 0.85 r
    if shape == "triangle":
        return ring([r * 1.1] * 3, -math.pi / 2)
    if shape == "diamond":
        return ring([r * 1.05] * 4, 0.0)
    if shape == "star":
        return ring([r * 1.15, r * 0.45] * 5, -math.pi / 2)
    if shape == "cross":
        a, b = r * 0.95, r * 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return [(cx + px, cy + py) for px, py in pts]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


# ----------------------------------------------------------------------------------------------------------------
# Text


def _where(o: Obj) -> str:
    v, h = o.vertical, o.horizontal
    if v and h:
        return f"at the {v} {h}"
    if v or h:
        return f"on the {h}" if h else f"at the {v}"
    return "in the middle"


def caption(objects: list[Obj], rng: np.random.Generator) -> str:
    parts = [f"a {o.size} {o.colour} {o.shape} {_where(o)}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objects)
    style = int(rng.integers(3))
    if style == 0:
        return f"There {'is' if n == 1 else 'are'} {n} shape{'s' if n > 1 else ''}: {listed}."
    if style == 1:
        return f"The image shows {listed}."
    return f"{listed[0].upper()}{listed[1:]}."


def colour_counts(objects: list[Obj]) -> dict[str, int]:
    """How many objects have each colour that occurs (a colour held by one object can name it)."""
    return {c: sum(o.colour == c for o in objects) for c in {o.colour for o in objects}}


def scene_facts(objects: list[dict | Obj], rng: np.random.Generator) -> str:
    """Every object's attributes, each line led by a way the questions refer to it, then the count of every colour,
    in random order: "star: green, star, big, right, top. red shapes: 2." Read left to right, each attribute after the
    referent can only be predicted by finding the referent's patches in the image, one token after its cue: the
    binding the QA needs (used by stage 0, training/pretrain_llm.py --scene-facts)."""
    objects = [o if isinstance(o, Obj) else Obj(**o) for o in objects]
    colour_count = colour_counts(objects)
    facts = []
    for o in objects:
        refs = [o.shape, f"{o.colour} {o.shape}"] + ([f"{o.colour} object"] if colour_count[o.colour] == 1 else [])
        ref = refs[int(rng.integers(len(refs)))]
        where = [w for w in (o.horizontal, o.vertical) if w]
        facts.append(f"{ref}: " + ", ".join([o.colour, o.shape, o.size, *where]))
    facts += [f"{colour} shapes: {count}" for colour, count in sorted(colour_count.items())]
    return ". ".join(facts[i] for i in rng.permutation(len(facts))) + "."


def questions(objects: list[Obj], rng: np.random.Generator) -> list[dict]:
    """Every answerable (type, question, answer) for this scene, one random phrasing each, shuffled."""
    colour_count = colour_counts(objects)
    found = []
    for o in objects:
        unique_colour = colour_count[o.colour] == 1
        refs = [o.shape, f"{o.colour} {o.shape}"] + ([f"{o.colour} shape"] if unique_colour else [])
        ref = refs[int(rng.integers(len(refs)))]
        found.append(("colour", {"ref": o.shape}, o.colour, o))
        if unique_colour:
            found.append(("shape", {"colour": o.colour}, o.shape, o))
        if o.horizontal:
            found.append(("horizontal", {"ref": ref}, o.horizontal, o))
        if o.vertical:
            found.append(("vertical", {"ref": ref}, o.vertical, o))
        found.append(("size", {"ref": ref}, o.size, o))
    for colour, count in sorted(colour_count.items()):
        found.append(("count", {"colour": colour}, str(count), None))
    out = []
    for kind, slots, answer, obj in found:
        phrasings = QUESTIONS[kind]
        text = phrasings[int(rng.integers(len(phrasings)))].format(**slots)
        out.append({"type": kind, "question": text, "answer": answer, "object": None if obj is None else obj.shape})
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def json_answer(value: dict) -> str:
    """`value` as the JSON-schema decoder writes it (sqllava_edge/structured.py): compact, no whitespace at all,
    keys in the order given (JSON_SCHEMAS lists its properties in the same order)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_question(objects: list[Obj], rng: np.random.Generator) -> dict:
    """A question asking for a JSON answer (JSON_QUESTIONS) about this scene, with its answer (`json_answer`):
    the colour and shape of one object named by its shape or, when its colour is unique, by its colour; or the
    count of one colour present."""
    colour_count = colour_counts(objects)
    if rng.random() < JSON_COUNT_SHARE:
        colour = sorted(colour_count)[int(rng.integers(len(colour_count)))]
        phrasings = JSON_QUESTIONS["count"]
        text = phrasings[int(rng.integers(len(phrasings)))].format(colour=colour)
        return {"type": "json", "question": text, "answer": json_answer({"count": colour_count[colour]}), "object": None}
    o = objects[int(rng.integers(len(objects)))]
    refs = [o.shape] + ([f"{o.colour} object", f"{o.colour} shape"] if colour_count[o.colour] == 1 else [])
    ref = refs[int(rng.integers(len(refs)))]
    phrasings = JSON_QUESTIONS["object"]
    text = phrasings[int(rng.integers(len(phrasings)))].format(ref=ref)
    return {"type": "json", "question": text, "answer": json_answer({"colour": o.colour, "shape": o.shape}),
            "object": o.shape}


def conversation(objects: list[Obj], rng: np.random.Generator, max_turns: int,
                 json_rng: np.random.Generator | None = None, json_rate: float = 0.0) -> tuple[list[dict], list[str]]:
    """A multi-turn LLaVA conversation: half the time a description first, then up to max_turns Q&A pairs. With
    `json_rng`, a conversation without a description opens, at `json_rate`, with one more turn: a question answered in
    JSON. It is drawn from `json_rng` alone and adds to the Q&A turns rather than replacing one, so the description,
    the questions and their answers are the same draws with or without it."""
    qa = questions(objects, rng)
    turns: list[dict] = []
    types: list[str] = []
    if rng.random() < 0.5:
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption(objects, rng)}]
        types.append("describe")
    elif json_rng is not None and json_rng.random() < json_rate:
        item = json_question(objects, json_rng)
        turns += [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": item["answer"]}]
        types.append(item["type"])
    for item in qa[: max_turns - (types[:1] == ["describe"])]:
        turns += [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": item["answer"]}]
        types.append(item["type"])
    turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return turns, types


# ----------------------------------------------------------------------------------------------------------------
# Video: scenes held for a while, then cut to the next (runtimes.watch's tests, benchmark and demo)

SCENE_CUT = 20.0  # grey levels: consecutive scenes of a clip differ at least this much (32 x 32 grey thumbnails)


def scene_clip(scenes: int | list[list[Obj]], frames_per_scene: int, size: int = 112, seed: int = 0
               ) -> tuple[list[Image.Image], list[int]]:
    """Frames of a video of `scenes` (a count of random scenes, or the scenes themselves), each held unchanged for
    `frames_per_scene` frames, and the frame indices where a scene starts. Consecutive scenes are redrawn (random
    ones entirely, given ones on another background) until their thumbnails differ by SCENE_CUT grey levels, so a cut
    is never mistaken for noise."""
    rng = np.random.default_rng([seed, 2])
    frames: list[Image.Image] = []
    starts: list[int] = []
    previous = None
    for i in range(scenes if isinstance(scenes, int) else len(scenes)):
        while True:
            objects = sample_scene(rng, held_out=False, grid=8) if isinstance(scenes, int) else scenes[i]
            image = render(objects, size, rng)
            thumb = np.asarray(image.convert("L").resize((32, 32), Image.BOX), dtype=np.float32)
            if previous is None or np.abs(thumb - previous).mean() > SCENE_CUT:
                break
        previous = thumb
        starts.append(len(frames))
        frames += [image] * frames_per_scene
    return frames, starts


# ----------------------------------------------------------------------------------------------------------------
# Writing the dataset


def build(out: Path, n_train: int, n_eval: int, seed: int, image_size: int = 112, max_turns: int = 10,
          grid: int = 8, json_rate: float = 0.0) -> dict[str, int]:
    from tqdm import tqdm

    stage1, stage2, evaluation = [], [], []
    with atomic_dir(out, overwrite=False) as tmp:
        for split, count in (("train", n_train), ("eval", n_eval)):
            (tmp / "images" / split).mkdir(parents=True)
            for i in tqdm(range(count), desc=f"synthetic {split}", unit="img"):
                rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
                objects = sample_scene(rng, held_out=split == "eval", grid=grid)
                rel = f"{split}/{i:06d}.png"
                render(objects, image_size, rng).save(tmp / "images" / rel)
                meta = {"objects": [asdict(o) for o in objects]}
                if split == "train":
                    prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
                    stage1.append({"id": f"cap-{i}", "image": rel, "conversations": [
                        {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption(objects, rng)}]})
                    json_rng = np.random.default_rng([seed, 3, i]) if json_rate > 0 else None
                    turns, types = conversation(objects, rng, max_turns, json_rng, json_rate)
                    stage2.append({"id": f"qa-{i}", "image": rel, "conversations": turns, "meta": {**meta, "types": types}})
                else:
                    qa = questions(objects, rng)
                    turns = [t for q in qa for t in ({"from": "human", "value": q["question"]},
                                                     {"from": "gpt", "value": q["answer"]})]
                    turns[0]["value"] = "<image>\n" + turns[0]["value"]
                    evaluation.append({"id": f"eval-{i}", "image": rel, "conversations": turns,
                                       "meta": {**meta, "types": [q["type"] for q in qa]}})
        for name, rows in (("stage1.json", stage1), ("stage2.json", stage2), ("eval.json", evaluation)):
            (tmp / name).write_text(json.dumps(rows, indent=1))
        info = {"seed": seed, "n_train": n_train, "n_eval": n_eval, "image_size": image_size,
                "grid": grid, **({"json_rate": json_rate} if json_rate else {}), "held_out_pairs": sorted(map(list, HELD_OUT)), "eval_questions": sum(len(r["meta"]["types"]) for r in evaluation)}
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (must not exist yet)")
    parser.add_argument("--n-train", type=int, default=6000, help="training images (each gives a caption and a Q&A sample)")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out images, each with every answerable question")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a deterministic function of this seed")
    parser.add_argument("--image-size", type=int, default=112, help="side of the square images in pixels")
    parser.add_argument("--grid", type=int, default=8,
                        help="place objects on a GRID x GRID lattice (small = 1 cell, big = 2 x 2 cells); 8 matches the "
                             "tiny preset's 8 x 8 patches (112 px / 14), so every shape is seen whole by patches; 0 = "
                             "anywhere")
    parser.add_argument("--max-turns", type=int, default=10, help="most Q&A pairs in one stage-2 conversation")
    parser.add_argument("--json-rate", type=float, default=0.0, metavar="R",
                        help="share of the stage-2 conversations without a description that open with one more turn, "
                             "a question answered in compact JSON (JSON_QUESTIONS, JSON_SCHEMAS); 0 = none")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder (the dataset is written atomically)")
    if min(args.n_train, args.n_eval) < 0 or args.image_size < 32 or args.max_turns < 1:
        parser.error("need --n-train/--n-eval >= 0, --image-size >= 32 and --max-turns >= 1")
    if not 0.0 <= args.json_rate <= 1.0:
        parser.error(f"--json-rate {args.json_rate}: a share, 0 to 1")
    info = build(args.out, args.n_train, args.n_eval, args.seed, args.image_size, args.max_turns, args.grid,
                 args.json_rate)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
