"""Stage 0's symbolic scenes (training/pretrain_llm.py --scenes): what fills the image slot while the stand-in LLM
learns to read it, the --bind-attention loss that points heads at the referent's patches, and the scores of how
well the LLM reads the slot.

A symbolic scene (a dataset written by `python -m training.synthetic` on its lattice) is one vector per image token,
in the patch raster order, naming what the generator put on that patch and where the patch is: the sum of the word
embeddings of its colour, shape and size, or of "background", and of its halves left/right and top/bottom
(`scene_words`, `SceneEmbedder`). The LLM learns to describe and answer from the image slot, the skill Vicuna
brings; it never sees a pixel, so stage 1 has to map the images onto what the LLM reads there.

`with_scene_facts` (--scene-facts) appends to each caption the image's objects once more, each led by a referent
as the questions use it ("star: green, star, big, right, top. red shapes: 2."), so that every attribute after it
can only be predicted by finding that object's patches. Measured, the LLM learns that binding inside the facts, but
its QA gains stay within the run-to-run spread (training/RESULTS.md); the demo recipe keeps the flag.

`BindAttention` (--bind-attention LAYER:HEAD,...) teaches that binding directly. Wherever the next token names an
attribute of an object the text has just referred to (`referent_targets`), the given heads get an extra loss,
--bind-weight x -log(attention mass on that object's patches). Without it the tiny LLM answers as if it pooled the
attributes of every object in the slot; with it (the demo: heads 1:0 and 2:0, weight 0.2) it selects, and held-out
QA from perfect scenes rises from 58-67% to 82% (training/RESULTS.md). The saved model is an ordinary Llama: the
loss shapes its weights, not its architecture.

`scene_use`: the token cross-entropy of the last samples with their own scene and with another sample's (equal
values: the LLM does not read the slot). `SceneQA`: every question of held-out images asked on its own with the
slot filled by the *perfect* scene, the ceiling of the whole pipeline (stages 1 and 2 map pixels onto what this LLM
reads).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sqllava_edge.config import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from training.loss import RestrictedHead, lm_loss


def with_scene_facts(captions: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Captions with the image's `training.synthetic.scene_facts` appended to each answer (--scene-facts). A caption
    describes the objects; the facts after it then ask, per object, for the attributes of the one a referent names:
    the binding that the QA needs, which a caption, listing every object, does not ask for."""
    import numpy as np

    from training.synthetic import scene_facts

    rng = np.random.default_rng(seed)
    out = []
    for row in captions:
        if "objects" not in row.get("meta", {}):
            raise ValueError(f"caption sample {row.get('id', '?')} has no meta.objects; --scene-facts needs a dataset "
                             "written by python -m training.synthetic")
        first, answer = row["conversations"][:2]
        facts = scene_facts(row["meta"]["objects"], rng)
        out.append({**row, "conversations": [first, {**answer, "value": f"{answer['value']} {facts}"}]})
    return out


SCENE_BACKGROUND = "background"


def scene_words(rows: list[dict[str, Any]], grid: int) -> list[list[tuple[str, ...]]]:
    """Per sample, per patch (raster order): the words a symbolic scene sums for it: what is there (colour, shape,
    size, or "background") and which half of the image the patch is in (left/right, top/bottom)."""
    from training.synthetic import patch_halves, row_patches

    halves = patch_halves(grid)
    return [[((SCENE_BACKGROUND,) if o is None else (o.colour, o.shape, o.size)) + where
             for o, where in zip(row_patches(row, grid, i), halves)] for i, row in enumerate(rows)]


class SceneEmbedder:
    """Symbolic scenes -> (B, T, H) image rows: per patch the sum of its words' (mean token) embeddings, rescaled to
    norm sqrt(H) (unit RMS per channel, the scale image tokens have after the projector). Computed from the live
    embedding table, so the words' embeddings learn from both uses. `index` turns scenes into word indices once;
    the per-step call is then one gather per word slot."""

    def __init__(self, tokenizer, words: set[str], hidden: int):
        self.words = sorted(words)
        self.ids = [torch.tensor(tokenizer.encode(w)) for w in self.words]
        self.norm = math.sqrt(hidden)

    def index(self, scenes: list[list[tuple[str, ...]]]) -> torch.Tensor:
        """(N, T, W) word indices; a patch with fewer than W words is padded with the index of a zero vector."""
        position = {w: i for i, w in enumerate(self.words)}
        width = max(len(patch) for scene in scenes for patch in scene)
        pad = len(self.words)
        return torch.tensor([[[position[w] for w in patch] + [pad] * (width - len(patch)) for patch in scene]
                             for scene in scenes])

    def __call__(self, embedding: torch.nn.Embedding, index: torch.Tensor) -> torch.Tensor:
        table = torch.stack([embedding(ids).mean(0) for ids in self.ids])  # (V', H)
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])  # the padding word
        words = table[index]  # (B, T, W, H)
        rows = words[:, :, 0]
        for k in range(1, words.shape[2]):  # left to right, as the words are listed
            rows = rows + words[:, :, k]
        return rows * (self.norm / rows.norm(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------------------------------------------
# --bind-attention: a direct signal for selecting the referent's patches

_REFERENT_NOUNS = {"object", "objects", "shape", "shapes"}
_RESETS = {"a", "user", "vuser"}  # a caption phrase ("a big red star ..."), a new turn


def token_words(tokenizer, ids: list[int]) -> list[tuple[str, int, int]]:
    """(word, first token, last token) of a token sequence: lower-case words rebuilt from their pieces
    ("diam" + "ond"), punctuation as words of its own, and "<sep>" for BOS, "</s>" and the image placeholder."""
    specials = {tokenizer.bos_id, tokenizer.eos_id}
    pieces = tokenizer.hf.convert_ids_to_tokens([max(i, 0) for i in ids])
    words: list[list] = []
    for t, (i, piece) in enumerate(zip(ids, pieces)):
        body = piece.lstrip("\u2581")
        if i < 0 or i in specials:
            words.append(["<sep>", t, t])
        elif body == "" or body.isalnum():
            continues = (not piece.startswith("\u2581") and words and words[-1][0] != "<sep>"
                         and (words[-1][0] == "" or words[-1][0].isalnum()))
            if continues:
                words[-1][0] += body.lower()
                words[-1][2] = t
            else:
                words.append([body.lower(), t, t])
        else:
            words.append([body, t, t])
    return [(w, first, last) for w, first, last in words]


def referent_targets(tokenizer, ids: list[int], objects: list, grid: int) -> list[tuple]:
    """(position, patches) pairs: at `position` the next token names an attribute of the object(s) the text has
    just referred to, and `patches` are where they are in the image (raster indices on the grid x grid lattice).

    The referent is the last shape named ("What colour is the star?" -> green; "star: green, star, big"), or the
    objects of a colour named as a group ("How many red shapes ...?" -> 2; "Which shape is blue?" -> star). A shape
    word is a target itself after its colour ("a big red star"), after a colon (an answer) or when its object is the
    referent. An attribute word is a target only if it is the referent's ("Is the star big or small?" marks "big"
    only for a big star), a number only if it counts the referent objects. A caption phrase, a new turn or the end of a sentence that is not
    a question forgets the referent."""
    from training.synthetic import ANSWERS, Obj, patch_contents

    objs = [o if isinstance(o, Obj) else Obj(**o) for o in objects]
    cells = patch_contents(objs, grid)
    patches = [tuple(p for p, o in enumerate(cells) if o == obj) for obj in objs]
    by_shape = {o.shape: i for i, o in enumerate(objs)}
    colours = set(ANSWERS["colour"])
    attribute = {**{c: "colour" for c in colours}, **{s: "size" for s in ANSWERS["size"]},
                 **{h: "horizontal" for h in ANSWERS["horizontal"]}, **{v: "vertical" for v in ANSWERS["vertical"]}}
    words = token_words(tokenizer, ids)

    def word(k: int, skip_separators: bool = False) -> str:
        while skip_separators and k < len(words) and words[k][0] in ("<sep>", ""):
            k += 1
        return words[k][0] if 0 <= k < len(words) else ""

    out: list[tuple[int, tuple[int, ...]]] = []
    referent: frozenset[int] = frozenset()
    for k, (w, first, last) in enumerate(words):
        prev, nxt = word(k - 1), word(k + 1)
        target: frozenset[int] = frozenset()
        if w in by_shape:
            if prev in colours or prev == ":" or referent == {by_shape[w]}:
                target = frozenset({by_shape[w]})
        elif referent and w in attribute:
            if all(getattr(objs[i], attribute[w]) == w for i in referent):
                target = referent
        elif referent and w.isdigit() and int(w) == len(referent):
            target = referent
        if target:
            where = tuple(sorted(p for i in target for p in patches[i]))
            out += [(t - 1, where) for t in range(max(first, 1), last + 1)]
        if w in by_shape:
            referent = frozenset({by_shape[w]})
        elif w in colours and (nxt in _REFERENT_NOUNS or nxt == "?" or prev == "are"):
            referent = frozenset(i for i, o in enumerate(objs) if o.colour == w)
        elif (w in _RESETS and (w != "a" or word(k + 2) in colours)) or (w == "." and word(k + 1, True) != "assistant"):
            referent = frozenset()
    return out


class BindAttention:
    """The --bind-attention loss: at every `referent_targets` position, -log of the attention mass that the given
    heads put on the referent's image rows (mean over positions and heads).

    The heads' attention is recomputed from their inputs, caught by a forward pre-hook while `active` (with a shared
    prefix the decoder runs twice; the two calls are joined). The keys are computed from *detached* inputs: the loss
    trains the heads' query and key maps and, through the queries, what the layers below bring to the text
    positions, but it cannot move the image rows or the word vectors they are made of to fit the keys (measured:
    with that path open, the LLM read colours far worse, training/RESULTS.md)."""

    def __init__(self, model, heads: list[tuple[int, int]]):
        config = model.config
        for layer, head in heads:
            if not (0 <= layer < config.num_hidden_layers and 0 <= head < config.num_attention_heads):
                raise ValueError(f"--bind-attention {layer}:{head}: the model has layers 0-{config.num_hidden_layers - 1} "
                                 f"and heads 0-{config.num_attention_heads - 1}")
        self.model, self.heads, self.active = model, heads, False
        self.captured: dict[int, list] = {}
        for layer in sorted({layer for layer, _ in heads}):
            model.model.layers[layer].self_attn.register_forward_pre_hook(self._hook(layer), with_kwargs=True)

    def _hook(self, layer: int):
        def grab(module, args, kwargs):
            if self.active:
                self.captured.setdefault(layer, []).append((kwargs["hidden_states"], kwargs["position_embeddings"]))
        return grab

    @staticmethod
    def sample_targets(ids: list[int], refs: list[tuple], n_image: int):
        """One sample's `referent_targets` as (positions in spliced coordinates, the placeholder expanded to n_image
        rows; image start; (N, n_image) patch masks), computed once before training."""
        image = ids.index(IMAGE_TOKEN_INDEX)
        positions = torch.tensor([r[0] + (n_image - 1 if r[0] >= image else 0) for r in refs], dtype=torch.long)
        masks = torch.zeros(len(refs), n_image)
        for j, ref in enumerate(refs):
            masks[j, list(ref[1])] = 1.0
        return positions, image, masks

    @staticmethod
    def batch_targets(samples: list[tuple[torch.Tensor, int, torch.Tensor]]):
        """(rows, positions, image starts, patch masks) of a batch of `sample_targets` for `loss`, or None."""
        rows = torch.cat([torch.full((len(s[0]),), b, dtype=torch.long) for b, s in enumerate(samples)])
        if not len(rows):
            return None
        positions = torch.cat([s[0] for s in samples])
        starts = torch.cat([torch.full((len(s[0]),), s[1], dtype=torch.long) for s in samples])
        return rows, positions, starts, torch.cat([s[2] for s in samples])

    def loss(self, rows: torch.Tensor, positions: torch.Tensor, image_start: torch.Tensor, mask: torch.Tensor):
        """Returns (loss, mean mass per head). rows, positions, image_start: (N,); mask: (N, n_image), the patches
        of each position's referent; per position, -log of the head's attention mass on them."""
        from transformers.models.llama.modeling_llama import rotate_half

        total, masses = 0.0, []
        columns = image_start[:, None] + torch.arange(mask.shape[1])[None, :]
        for layer, head in self.heads:
            calls = self.captured[layer]
            batch = calls[-1][0].shape[0]
            hidden = torch.cat([h.expand(batch, -1, -1) for h, _ in calls], dim=1)  # (B, T, H)
            cos = torch.cat([pe[0] for _, pe in calls], dim=1)[0]  # (T, d): the same positions in every row
            sin = torch.cat([pe[1] for _, pe in calls], dim=1)[0]
            attn = self.model.model.layers[layer].self_attn
            d = attn.head_dim
            kv_head = head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
            q = attn.q_proj(hidden[rows, positions])[:, head * d:(head + 1) * d]  # (N, d)
            q = q * cos[positions] + rotate_half(q) * sin[positions]
            k = attn.k_proj(hidden.detach())[..., kv_head * d:(kv_head + 1) * d]  # (B, T, d)
            k = k * cos + rotate_half(k) * sin
            scores = torch.einsum("nd,ntd->nt", q, k[rows]) * attn.scaling  # (N, T)
            later = torch.arange(k.shape[1])[None, :] > positions[:, None]
            probs = scores.masked_fill(later, float("-inf")).float().softmax(-1)
            image_probs = probs.gather(1, columns)
            mass = (image_probs * (mask > 0)).sum(-1)
            per_row = -torch.log(mass + 1e-6)
            total = total + per_row.mean()
            masses.append(round(float(mass.detach().mean()), 4))
        self.captured.clear()
        return total / len(self.heads), masses

def scene_use(model, restricted: RestrictedHead, texts, scenes, embed_scene, n: int = 64, batch: int = 16) -> dict:
    """Token cross-entropy of the last n samples with their own scene vs another sample's: how much the LLM reads
    the image slot (equal values: not at all)."""
    from sqllava_edge.model import splice_image_embeddings
    from training.modeling import decoder_hidden

    embedding = model.get_input_embeddings()
    idx = list(range(max(0, len(texts) - n), len(texts)))
    totals, count = [0.0, 0.0], 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(idx), batch):
            rows = idx[start:start + batch]
            if len(rows) < 2:
                break
            ids = [torch.tensor(texts[i]) for i in rows]
            images = embed_scene(embedding, scenes[rows])
            for k, imgs in enumerate((images, images.roll(1, 0))):
                spliced = splice_image_embeddings(ids, embedding, imgs, [r.clamp(min=0) for r in ids])
                hidden = decoder_hidden(model.model, spliced.inputs_embeds, spliced.attention_mask)
                loss_sum, tokens = lm_loss(hidden, spliced.labels, model.lm_head.weight, restricted)
                totals[k] += loss_sum.item()
            count += int(tokens)
    model.train()
    return {"own_scene_ce": round(totals[0] / max(count, 1), 4), "other_scene_ce": round(totals[1] / max(count, 1), 4)}


class SceneQA:
    """QA accuracy of the LLM reading *perfect* symbolic scenes: every question of `rows` (synthetic samples with
    meta.types) asked on its own in training.evaluate's prompt, scored teacher-forced (right iff the argmax over the
    full vocabulary is the answer at every answer token and at "</s>", i.e. what greedy decoding would say). The
    ceiling that stages 1 and 2 can carry over to pixels. Questions are tokenized and scenes indexed once; each call
    scores the model as it is now."""

    def __init__(self, tokenizer, rows, grid: int, embed_scene, template: str = "v1_sq", batch: int = 32):
        from sqllava_edge.conversation import Turn, tokenize_conversation
        from training.synthetic import QUESTION_GROUP

        self.items = []  # (ids, labels, scene row, question group)
        for i, row in enumerate(rows):
            turns = row["conversations"]
            pairs = [(turns[j]["value"], turns[j + 1]["value"]) for j in range(0, len(turns) - 1, 2)]
            for (question, answer), kind in zip(pairs, row["meta"]["types"]):
                if kind not in QUESTION_GROUP:
                    continue  # descriptions
                question = question.replace(IMAGE_PLACEHOLDER, "").strip()
                conv = tokenize_conversation(tokenizer, template, [Turn("user", question, image=True),
                                                                   Turn("assistant", answer)], has_image=True)
                self.items.append((torch.tensor(conv.ids), torch.tensor(conv.labels), i, QUESTION_GROUP[kind]))
        self.index = embed_scene.index(scene_words(rows, grid))
        self.embed_scene = embed_scene
        self.batch = batch

    def __call__(self, model) -> dict:
        from collections import Counter

        from sqllava_edge.model import splice_image_embeddings
        from training.modeling import decoder_hidden

        embedding = model.get_input_embeddings()
        right, total = Counter(), Counter()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(self.items), self.batch):
                chunk = self.items[start:start + self.batch]
                images = self.embed_scene(embedding, self.index[[c[2] for c in chunk]])
                spliced = splice_image_embeddings([c[0] for c in chunk], embedding, images, [c[1] for c in chunk])
                hidden = decoder_hidden(model.model, spliced.inputs_embeds, spliced.attention_mask)
                targets = spliced.labels[:, 1:]
                guess = model.lm_head(hidden[:, :-1]).argmax(-1)
                ok = ((guess == targets) | (targets == IGNORE_INDEX)).all(dim=1)
                for c, good in zip(chunk, ok.tolist()):
                    total[c[3]] += 1
                    right[c[3]] += good
        model.train(was_training)
        n = sum(total.values())
        return {"questions": n, "accuracy": round(sum(right.values()) / max(n, 1), 4),
                "per_type": {k: round(right[k] / total[k], 4) for k in sorted(total)}}


def plot_scene_qa(records: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Held-out scene-QA accuracy per question type against the step, to a PNG (headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["scene_qa"]) for r in records if "scene_qa" in r]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [step for step, _ in points]
    ax.plot(steps, [qa["accuracy"] for _, qa in points], "k-o", lw=2, label="all")
    for kind in points[-1][1]["per_type"]:
        ax.plot(steps, [qa["per_type"].get(kind, float("nan")) for _, qa in points], "-", marker=".", alpha=0.7,
                label=kind)
    ax.set(xlabel="optimizer step", ylabel="exact-match accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
