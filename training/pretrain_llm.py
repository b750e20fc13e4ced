"""Stage 0 for presets without a pretrained LLM offline: pretrain the base LLM on the dataset's text.

    python -m training.pretrain_llm --data DATA/stage2.json --preset tiny --out RUN [--max-steps N]
    python -m training.pretrain_llm --data DATA/stage2.json --caption-data DATA/stage1.json --scenes --out RUN

SQ-LLaVA starts from Vicuna (docs/spec.md 6.3): a language model that already reads a conversation, follows the template and
takes facts from its context. LoRA on a frozen *random* LLM has none of that to adapt and, in the CPU budget, never
learns to look at the image (training/RESULTS.md). This step makes a stand-in for Vicuna at the preset's shape: a
Llama trained from scratch as a plain language model on the conversations' text, rendered with the training
template. Pass the result to stage 1 as `--llm-base RUN/llm`.

Without --scenes the image placeholder is removed: a text-only model. Measured, that is not enough: stages 1 and 2
then never make the tiny LLM use the image inside the demo budget, because learning to read 64 image tokens is a
slow phase change for a model this small (training/RESULTS.md).

With --scenes (a dataset written by `python -m training.synthetic` on its lattice), the placeholder stays and is
filled with a *symbolic scene*: one vector per image token, in the patch raster order, naming what the generator put
on that patch and where the patch is (the sum of the word embeddings of its colour, shape and size, or of
"background", and of its halves left/right and top/bottom). The LLM learns to describe and answer from the image
slot, the skill Vicuna brings; it still never sees a pixel, so stage 1 has to map the images onto what the LLM reads
there. --caption-data adds the stage-1 captions (rendered `plain`, as stage 1 does) in alternate batches: short
samples in which every object word depends on the scene, which is what makes the reading appear within the budget.
--scene-facts appends to each caption the image's objects once more, each led by a referent as the questions use it
("star: green, star, big, right, top. red shapes: 2."), so that every attribute after it can only be predicted by
finding that object's patches: the binding that answering "What colour is the star?" needs with several shapes
present. Measured, the LLM learns that binding inside the facts, but its QA gains stay within the run-to-run spread
(training/RESULTS.md).

--bind-attention LAYER:HEAD,... teaches that binding directly. Wherever the next token names an attribute of an
object the text has just referred to (the answer to "What colour is the star?", the attributes after a fact's
referent, the shape after a caption phrase's colour; `referent_targets`), the given heads get an extra loss,
--bind-weight x -log(attention mass on that object's patches). Without it the tiny LLM answers as if it pooled the
attributes of every object in the slot (95-100% of the questions on one-object images, about half on four-object
ones); with it (the demo: heads 1:0 and 2:0, weight 0.2) it selects, and held-out QA from perfect scenes rises from
58-67% to 82% (training/RESULTS.md). A pretrained Vicuna brings such heads from its own pretraining; a model trained
from scratch on 2000 images in a few minutes does not find them by itself. The saved model is an ordinary Llama:
the loss shapes its weights, not its architecture. --count-sink S makes a count's target a distribution over the
counted objects (each the same share, whatever its size) and BOS, so that the heads' output carries the number;
measured once (1000 steps, S 1) it left count at the majority answer, so the demo does not use it.

Writes RUN/llm (a transformers Llama folder, safetensors, atomic), RUN/metrics.jsonl and RUN/loss_curve.png. With
scenes, the report gives the token cross-entropy of the last 64 conversations with their own scene and with another
sample's (`scene_use`): equal values mean the LLM does not read the slot. With --eval-data (held-out samples of the
same generator) it also gives `scene_qa`: every question of the first --eval-images held-out images asked on its own,
as training.evaluate asks it, with the image slot filled by the *perfect* scene of that image, and RUN/scene_qa.png
(its curve with --eval-every). That is the ceiling of the whole pipeline: stages 1 and 2 map pixels onto what this
LLM reads, so the final model's QA accuracy stays near it (training/RESULTS.md).

The softmax covers the corpus vocabulary only: the head rows of the other tokens of the 32000 stay exactly zero, so
their logits are 0 and their total mass enters every softmax as one extra logit log(n_unseen). That is the exact
full-vocabulary cross-entropy of such a head at a fraction of its cost (the 32000-way head is most of the FLOPs of
a tiny model), and the saved model is an ordinary Llama whose unseen tokens keep logit 0.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sqllava_edge.config import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from training.modeling import RestrictedHead


def corpus(rows: list[dict[str, Any]], tokenizer, template: str, sq_r: float, rng: random.Random,
           keep_image: bool = False) -> list[list[int]]:
    """Token ids of every conversation, rendered as in training; VUSER turns drawn at sq_r. Without keep_image the
    image placeholder is removed (a text-only sample); with it, it stays as IMAGE_TOKEN_INDEX for a scene."""
    from sqllava_edge.conversation import sq_convert, to_turns, tokenize_conversation

    out = []
    for row in rows:
        conv = row["conversations"]
        if not keep_image:
            conv = [{**t, "value": t["value"].replace(IMAGE_PLACEHOLDER, "").strip()} for t in conv]
        elif not any(IMAGE_PLACEHOLDER in t["value"] for t in conv):
            conv = [{**conv[0], "value": IMAGE_PLACEHOLDER + "\n" + conv[0]["value"]}, *conv[1:]]
        turns = sq_convert(conv, sq_r, rng, keep_image) if sq_r > 0 else to_turns(conv, keep_image)
        if template == "plain":  # as stage 1 renders captions (docs/spec.md 3.5): the first pair, instruction dropped
            turns = turns[:2]
        out.append(tokenize_conversation(tokenizer, template, turns, has_image=keep_image).ids)
    return out


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


def referent_targets(tokenizer, ids: list[int], objects: list, grid: int, groups: bool = False) -> list[tuple]:
    """(position, patches) pairs: at `position` the next token names an attribute of the object(s) the text has
    just referred to, and `patches` are where they are in the image (raster indices on the grid x grid lattice).

    The referent is the last shape named ("What colour is the star?" -> green; "star: green, star, big"), or the
    objects of a colour named as a group ("How many red shapes ...?" -> 2; "Which shape is blue?" -> star). A shape
    word is a target itself after its colour ("a big red star"), after a colon (an answer) or when its object is the
    referent. An attribute word is a target only if it is the referent's ("Is the star big or small?" marks "big"
    only for a big star), a number only if it counts the referent objects. A caption phrase, a new turn or the end of a sentence that is not
    a question forgets the referent.

    groups=True returns (position, patches, per-object patches) triples, the last set only where the next token is a
    count (else None): what --count-sink needs to weigh every counted object alike."""
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
            counted = tuple(patches[i] for i in sorted(target)) if w.isdigit() else None
            out += [(t - 1, where, counted) if groups else (t - 1, where) for t in range(max(first, 1), last + 1)]
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
    def sample_targets(ids: list[int], refs: list[tuple], n_image: int, sink: float = 0.0):
        """One sample's `referent_targets` as (positions in spliced coordinates, the placeholder expanded to n_image
        rows; image start; (N, n_image) patch masks; (N,) sink shares), computed once before training.

        With sink > 0 and refs from referent_targets(..., groups=True), a count target's mask row is instead a target
        distribution: every counted object gets the same share 1 / (k + sink), spread over its patches, and the
        first position (BOS) gets sink / (k + sink). The share left on BOS then says how many objects there are
        (1 / (1 + k) at sink 1), which a head that spreads its attention over the objects' patches cannot show."""
        image = ids.index(IMAGE_TOKEN_INDEX)
        positions = torch.tensor([r[0] + (n_image - 1 if r[0] >= image else 0) for r in refs], dtype=torch.long)
        masks, sinks = torch.zeros(len(refs), n_image), torch.zeros(len(refs))
        for j, ref in enumerate(refs):
            counted = ref[2] if len(ref) > 2 else None
            if sink > 0 and counted:
                for patches in counted:
                    masks[j, list(patches)] = 1.0 / (len(patches) * (len(counted) + sink))
                sinks[j] = sink / (len(counted) + sink)
            else:
                masks[j, list(ref[1])] = 1.0
        return positions, image, masks, sinks

    @staticmethod
    def batch_targets(samples: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]):
        """(rows, positions, image starts, patch masks, sink shares) of a batch of `sample_targets` for `loss`, or
        None."""
        rows = torch.cat([torch.full((len(s[0]),), b, dtype=torch.long) for b, s in enumerate(samples)])
        if not len(rows):
            return None
        positions = torch.cat([s[0] for s in samples])
        starts = torch.cat([torch.full((len(s[0]),), s[1], dtype=torch.long) for s in samples])
        return rows, positions, starts, torch.cat([s[2] for s in samples]), torch.cat([s[3] for s in samples])

    def loss(self, rows: torch.Tensor, positions: torch.Tensor, image_start: torch.Tensor, mask: torch.Tensor,
             sink: torch.Tensor | None = None):
        """Returns (loss, mean mass per head). rows, positions, image_start: (N,); mask: (N, n_image); sink: (N,)
        shares of BOS in a target distribution (rows with sink > 0: cross-entropy to that distribution, the mask
        row holding the patches' shares; other rows: -log of the mass on the mask's patches)."""
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
            if sink is not None and bool((sink > 0).any()):
                spread = -(mask * torch.log(image_probs + 1e-6)).sum(-1) - sink * torch.log(probs[:, 0] + 1e-6)
                per_row = torch.where(sink > 0, spread, per_row)
            total = total + per_row.mean()
            masses.append(round(float(mass.detach().mean()), 4))
        self.captured.clear()
        return total / len(self.heads), masses

class CompactVocab:
    """The embedding and head rows that can get a gradient, trained as small parameters of their own (`--compact-vocab`).

    A tiny LLM's 32000-row embedding and head are most of its parameters, but a corpus uses a few hundred tokens. With
    the full tables, every embedding lookup's backward writes a dense (32000, H) gradient (the symbolic scenes alone
    make one lookup per scene word, ~25 per step: measured, filling those zeros was half the step time) and AdamW
    updates 16 M values per step that never move. Rows outside `embed_ids` / `head_ids` get an exactly-zero gradient
    at every step, and AdamW without weight decay leaves such a row where it is (m = v = 0, so its update is 0), so
    training only the listed rows computes the same model (to float summation order). `write_back` copies them into
    the full tables before anything reads the model (evaluation, saving)."""

    def __init__(self, model, embed_ids, head_ids):
        embed_table, head_table = model.get_input_embeddings().weight, model.lm_head.weight
        self.embed_ids = torch.tensor(sorted(set(embed_ids)), device=embed_table.device)
        self.head_ids = torch.tensor(sorted(set(head_ids)), device=head_table.device)
        self.remap = torch.full((len(embed_table),), -1, dtype=torch.long, device=embed_table.device)
        self.remap[self.embed_ids] = torch.arange(len(self.embed_ids), device=embed_table.device)
        self.embed = torch.nn.Parameter(embed_table.detach()[self.embed_ids].clone())
        self.head = torch.nn.Parameter(head_table.detach()[self.head_ids].clone())
        embed_table.requires_grad_(False)
        head_table.requires_grad_(False)
        self.model = model

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding of token ids (any shape), all of them among `embed_ids`."""
        rows = self.remap[ids]
        if bool((rows < 0).any()):
            missing = sorted(set(ids[rows < 0].tolist()))[:5]
            raise ValueError(f"token ids {missing} are not in the compact vocabulary; build it from every text used")
        return F.embedding(rows, self.embed)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The model's trainable parameters with the compact rows in place of the full tables."""
        full = {id(self.model.get_input_embeddings().weight), id(self.model.lm_head.weight)}
        return [p for p in self.model.parameters() if id(p) not in full] + [self.embed, self.head]

    @torch.no_grad()
    def write_back(self) -> None:
        self.model.get_input_embeddings().weight[self.embed_ids] = self.embed.detach()
        self.model.lm_head.weight[self.head_ids] = self.head.detach()


def pretrain(args) -> Path:
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    from sqllava_edge.config import get_preset
    from sqllava_edge.fileutil import atomic_dir
    from sqllava_edge.model import hf_llama_config, splice_image_embeddings
    from sqllava_edge.tokenizer import default_tokenizer
    from training.data import load_samples
    from training.modeling import decoder_hidden, shared_prefix
    from training.speed import adamw_kwargs
    from training.state import MetricsLog, plot_loss, stage0_start, warmup_cosine

    out = stage0_start(args.out, "llm", args.threads)
    config = get_preset(args.preset)
    tokenizer = default_tokenizer()
    rows = [r for path in args.data for r in load_samples(path)]
    captions = [r for path in args.caption_data for r in load_samples(path)]
    meta = {r["image"]: r["meta"] for r in rows if "image" in r and "meta" in r}
    captions = [{**r, "meta": meta[r["image"]]} if "meta" not in r and r.get("image") in meta else r for r in captions]
    if not rows:
        raise ValueError(f"{', '.join(map(str, args.data))}: no samples")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    if args.scene_facts:  # main() requires --scenes and --caption-data with it
        captions = with_scene_facts(captions, args.seed)
    sources = [corpus(rows, tokenizer, args.template, args.sq_r, rng, keep_image=args.scenes)]
    if captions:
        sources.append(corpus(captions, tokenizer, "plain", 0.0, rng, keep_image=args.scenes))
    texts = sources[0]
    scenes, embed_scene, source_scenes = None, None, [None] * len(sources)
    if args.scenes:
        from training.synthetic import lattice

        grid = lattice(args.data[0], config.vision)
        words = [scene_words(rows, grid)] + ([scene_words(captions, grid)] if captions else [])
        embed_scene = SceneEmbedder(tokenizer, {w for sc in words for s in sc for p in s for w in p},
                                    config.llm.hidden_size)
        source_scenes = [embed_scene.index(sc) for sc in words]  # (N, T, W) word indices per source
        scenes = source_scenes[0]
    bind, bind_refs = None, None
    if args.bind_attention:  # main() requires --scenes with it
        sample_rows = [rows] + ([captions] if captions else [])
        n_image = grid * grid
        bind_refs = [[BindAttention.sample_targets(ids, referent_targets(tokenizer, ids, r["meta"]["objects"], grid,
                                                                         groups=args.count_sink > 0),
                                                   n_image, args.count_sink) for ids, r in zip(src, srows)]
                     for src, srows in zip(sources, sample_rows)]
        n_sup = sum(len(x[0]) for src in bind_refs for x in src)
        print(f"--bind-attention: {n_sup} supervised positions in {sum(len(s) for s in sources)} samples", flush=True)
    held_out = None
    if args.eval_data:  # main() requires --scenes with it
        held_out = SceneQA(tokenizer, load_samples(args.eval_data)[: args.eval_images], grid, embed_scene)
    vocab = {t for src in sources for ids in src for t in ids if t >= 0} | {config.llm.eos_token_id}
    model = LlamaForCausalLM(hf_llama_config(config.llm))
    head = model.lm_head.weight
    restricted = RestrictedHead(sorted(vocab), config.llm.vocab_size, head.device)
    with torch.no_grad():  # unseen rows start at zero and stay there: the loss reads only the corpus rows, so their
        head[restricted.index < 0] = 0.0  # gradient is exactly zero and AdamW (no decay) never moves them
    if bind_refs is not None:
        bind = BindAttention(model, args.bind_attention)
    model.train()
    embedding, head_rows, compact = model.get_input_embeddings(), head, None
    params = list(model.parameters())
    if args.compact_vocab:
        scene_ids = [t for ids in embed_scene.ids for t in ids.tolist()] if embed_scene is not None else []
        compact = CompactVocab(model, {0} | vocab | set(scene_ids), restricted.vocab.tolist())  # 0: image slots
        embedding, head_rows, params = compact, compact.head, compact.parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98),
                                  **adamw_kwargs(args.fused_adamw))
    scheduler = warmup_cosine(optimizer, args.max_steps)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", None)
    orders: list[list[int]] = [[] for _ in sources]
    bar = tqdm(total=args.max_steps, desc="stage 0 (LLM pretraining)", unit="step", disable=not args.progress)
    start = time.time()
    for step in range(1, args.max_steps + 1):
        k = (step - 1) % len(sources)  # conversations and captions take turns, one source per batch
        order, picked = orders[k], []
        while len(picked) < args.batch_size:
            if not order:
                order.extend(range(len(sources[k])))
                rng.shuffle(order)
            picked.append(order.pop())
        ids = [torch.tensor(sources[k][i]) for i in picked]
        images = embed_scene(embedding, source_scenes[k][picked]) if args.scenes else None
        # Every text token is a target; image rows and padding are not (splice marks them IGNORE_INDEX).
        batch = splice_image_embeddings(ids, embedding, images, [r.clamp(min=0) for r in ids])
        if bind is not None:
            bind.active = True
        hidden = decoder_hidden(model.model, batch.inputs_embeds, batch.attention_mask, shared_prefix(ids))
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        loss_sum = restricted.loss_sum(hidden[:, :-1][keep], head_rows, targets[keep])
        n = int(keep.sum())
        total = loss_sum / n
        extra = {}
        if bind is not None:
            bind.active = False
            picked_targets = bind.batch_targets([bind_refs[k][i] for i in picked])
            if picked_targets is not None:
                bind_loss, masses = bind.loss(*picked_targets)
                total = total + args.bind_weight * bind_loss
                extra = {"bind_loss": float(bind_loss.detach()), "bind_mass": masses}
            bind.captured.clear()
        total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_sum.item() / n
        log.write({"step": step, "loss": loss, "lr": {"llm": lr}, "grad_norm": grad_norm, "trained_tokens": n,
                   "elapsed": time.time() - start, "cpu_s": time.process_time(), **extra})
        bar.set_postfix(loss=f"{loss:.3f}", **({"bind": f"{extra['bind_mass'][0]:.2f}"} if extra else {}))
        bar.update(1)
        if held_out is not None and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            if compact is not None:
                compact.write_back()
            qa = held_out(model)
            log.write({"step": step, "scene_qa": qa})
            bar.write(f"step {step}: held-out scene QA {qa['accuracy']:.1%} {qa['per_type']}")
    bar.close()
    if compact is not None:
        compact.write_back()
    report = {"stage": 0, "steps": args.max_steps, "wall_s": round(time.time() - start, 1), "final_loss": round(loss, 4),
              "corpus_vocab": len(vocab), "scenes": bool(args.scenes)}
    if scenes is not None:
        report["scene_use"] = scene_use(model, restricted, texts, scenes, embed_scene)
    if held_out is not None:
        report["scene_qa"] = held_out(model)
    with atomic_dir(out / "llm") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps({
            "trainer": "python -m training.pretrain_llm", "preset": config.name, "data": [str(p) for p in args.data],
            "caption_data": [str(p) for p in args.caption_data],
            **report}, indent=2))
    what = "LLM pretraining on text + symbolic scenes" if args.scenes else "LLM text pretraining"
    plot_loss(log.records(), out / "loss_curve.png", f"stage 0: {config.name} {what}")
    if held_out is not None:
        plot_scene_qa(log.records() + [{"step": args.max_steps, "scene_qa": report["scene_qa"]}],
                      out / "scene_qa.png", f"stage 0: {config.name}, QA on perfect held-out scenes")
    print(json.dumps(report), flush=True)
    return out / "llm"


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
                targets = spliced.labels[:, 1:]
                keep = targets != IGNORE_INDEX
                totals[k] += restricted.loss_sum(hidden[:, :-1][keep], model.lm_head.weight, targets[keep]).item()
            count += int(keep.sum())
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


def _heads(text: str) -> list[tuple[int, int]]:
    try:
        heads = [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        heads = []
    if not heads or any(len(h) != 2 for h in heads):
        raise argparse.ArgumentTypeError(f"{text!r}: give LAYER:HEAD pairs, comma separated, e.g. 1:0,2:0")
    return heads


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.pretrain_llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="LLaVA JSON files whose text to learn")
    parser.add_argument("--preset", default="tiny", help="model preset whose LLM shape to build")
    parser.add_argument("--out", type=Path, required=True, help="run folder; the model goes to OUT/llm")
    parser.add_argument("--max-steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW LR (3%% warm-up, cosine to 0)")
    parser.add_argument("--template", default="v1_sq", help="conversation template the text is rendered with")
    parser.add_argument("--sq-r", type=float, default=0.5, help="share of later human turns rendered as VUSER turns")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the order and the VUSER draws")
    parser.add_argument("--caption-data", type=Path, nargs="*", default=[],
                        help="caption files (stage1.json) rendered as stage 1 does (plain); batches alternate with --data")
    parser.add_argument("--scenes", action="store_true",
                        help="fill the image slot with the sample's symbolic scene (synthetic datasets on a lattice)")
    parser.add_argument("--scene-facts", action="store_true",
                        help="append to each caption every object's attributes, each led by how a question names the "
                             "object (training.synthetic.scene_facts), a direct signal for the binding the QA needs "
                             "(needs --scenes and --caption-data)")
    parser.add_argument("--bind-attention", type=_heads, default=None, metavar="LAYER:HEAD[,...]",
                        help="train these attention heads (0-based) to look at the referent's image patches wherever "
                             "the next token names one of its attributes (needs --scenes; the demo uses 1:0,2:0)")
    parser.add_argument("--bind-weight", type=float, default=0.2, help="weight of the --bind-attention loss")
    parser.add_argument("--count-sink", type=float, default=0.0, metavar="S",
                        help="at a count, the --bind-attention target is a distribution instead: each counted object "
                             "1/(k+S) of the attention, BOS S/(k+S), so the heads' output says how many (0 = off)")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="held-out synthetic samples (eval.json; needs --scenes): report the QA accuracy on their "
                             "perfect scenes, the ceiling of the whole pipeline")
    parser.add_argument("--eval-images", type=int, default=20, help="held-out images of --eval-data to ask about")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0 = at the end only)")
    parser.add_argument("--compact-vocab", action=argparse.BooleanOptionalAction, default=True,
                        help="train only the embedding and head rows the corpus uses, as parameters of their own: "
                             "the same model (those are the only rows with a gradient), several times faster "
                             "(CompactVocab)")
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                        help="PyTorch's fused AdamW kernel (default: on where this torch has it; training/speed.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--max-steps and --batch-size must be >= 1 and --lr > 0")
    if args.eval_data and not args.scenes:
        parser.error("--eval-data scores the LLM on perfect scenes: pass --scenes too")
    if args.scene_facts and not (args.scenes and args.caption_data):
        parser.error("--scene-facts extends the captions with what the symbolic scenes hold: pass --scenes and "
                     "--caption-data too")
    if args.bind_attention and not args.scenes:
        parser.error("--bind-attention points heads at the referent's patches of the symbolic scene: pass --scenes too")
    if args.count_sink < 0 or (args.count_sink and not args.bind_attention):
        parser.error("--count-sink is a share of the attention given to BOS at counts (>= 0) and needs --bind-attention")
    if args.eval_images < 1 or args.eval_every < 0:
        parser.error("--eval-images must be >= 1 and --eval-every >= 0")
    return pretrain(args)


if __name__ == "__main__":
    main()
