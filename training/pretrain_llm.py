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
filled with a *symbolic scene* (training/scenes.py: what is on each patch and where, as a sum of word embeddings).
--caption-data adds the stage-1 captions (rendered `plain`, as stage 1 does) in alternate batches: short samples in
which every object word depends on the scene, which is what makes the reading appear within the budget.
--scene-facts appends the image's objects to each caption once more, each led by a referent; --bind-attention
LAYER:HEAD,... trains those heads to look at the referent's patches (--bind-weight x -log of their attention mass
there). --json-from F reads the conversations' JSON-answer turns (`python -m training.synthetic --json-rate`) only
from the fraction F of the steps on, once the scene reading has formed. What each of them measured:
training/scenes.py and training/RESULTS.md.

Writes RUN/llm (a transformers Llama folder, safetensors, atomic), RUN/metrics.jsonl and RUN/loss_curve.png. With
scenes, the report gives `scene_use` (training.scenes.scene_use: the token cross-entropy with the sample's own
scene and with another sample's). With --eval-data (held-out samples of the same generator) it also gives
`scene_qa` (training.scenes.SceneQA on the first --eval-images held-out images) and RUN/scene_qa.png (its curve
with --eval-every): the ceiling of the whole pipeline.

The loss is training.loss.lm_loss, as in stages 1 and 2, through a RestrictedHead. The softmax covers the corpus
vocabulary only: the head rows of the other tokens of the 32000 stay exactly zero, so their logits are 0 and their
total mass enters every softmax as one extra logit log(n_unseen). That is the exact full-vocabulary cross-entropy of
such a head at a fraction of its cost (the 32000-way head is most of the FLOPs of a tiny model), and the saved model
is an ordinary Llama whose unseen tokens keep logit 0.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sqllava_edge.config import IMAGE_PLACEHOLDER
from training.loss import RestrictedHead, lm_loss
from training.scenes import (BindAttention, SceneEmbedder, SceneQA, plot_scene_qa, referent_targets, scene_use,
                             scene_words, with_scene_facts)


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


def without_json_turns(row: dict[str, Any]) -> dict[str, Any]:
    """`row` without its JSON-answer turns (meta.types "json", training.synthetic): what stage 0 reads before
    --json-from."""
    types = row.get("meta", {}).get("types")
    if not types or "json" not in types:
        return row
    conv = row["conversations"]
    keep = [t for j, kind in enumerate(types) if kind != "json" for t in conv[2 * j: 2 * j + 2]]
    if IMAGE_PLACEHOLDER in conv[0]["value"] and IMAGE_PLACEHOLDER not in keep[0]["value"]:
        keep[0] = {**keep[0], "value": IMAGE_PLACEHOLDER + "\n" + keep[0]["value"]}
    return {**row, "conversations": keep, "meta": {**row["meta"], "types": [k for k in types if k != "json"]}}


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
    from training.state import MetricsLog, plot_loss, stage0_start, stage0_step, warmup_cosine

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
    json_from = round(args.json_from * args.max_steps)
    plain_rows = [without_json_turns(r) for r in rows] if json_from > 0 else rows
    sources = [corpus(plain_rows, tokenizer, args.template, args.sq_r, rng, keep_image=args.scenes)]
    if captions:
        sources.append(corpus(captions, tokenizer, "plain", 0.0, rng, keep_image=args.scenes))
    # From step json_from on, the conversations come with their JSON turns (same rows, same order and scenes).
    late = corpus(rows, tokenizer, args.template, args.sq_r, rng, keep_image=args.scenes) \
        if 0 < json_from < args.max_steps and any(r is not p for r, p in zip(rows, plain_rows)) else None
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

        def targets(src, srows):
            return [BindAttention.sample_targets(ids, referent_targets(tokenizer, ids, r["meta"]["objects"], grid),
                                                 n_image) for ids, r in zip(src, srows)]

        bind_refs = [targets(src, srows) for src, srows in zip(sources, sample_rows)]
        late_refs = targets(late, rows) if late is not None else None
        n_sup = sum(len(x[0]) for src in bind_refs for x in src)
        print(f"--bind-attention: {n_sup} supervised positions in {sum(len(s) for s in sources)} samples", flush=True)
    held_out = None
    if args.eval_data:  # main() requires --scenes with it
        held_out = SceneQA(tokenizer, load_samples(args.eval_data)[: args.eval_images], grid, embed_scene)
    vocab = {t for src in sources + ([late] if late else []) for ids in src for t in ids if t >= 0} \
        | {config.llm.eos_token_id}
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
        if late is not None and step == json_from + 1:
            sources[0] = late
            if bind_refs is not None:
                bind_refs[0] = late_refs
            bar.write(f"step {step}: the conversations' JSON-answer turns join the corpus")
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
        loss_sum, n = lm_loss(hidden, batch.labels, head_rows, restricted)
        n = int(n)
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
        grad_norm, lr = stage0_step(optimizer, scheduler, params)
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


def _heads(text: str) -> list[tuple[int, int]]:
    try:
        heads = [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        heads = []
    if not heads or any(len(h) != 2 for h in heads):
        raise argparse.ArgumentTypeError(f"{text!r}: give LAYER:HEAD pairs, comma separated, e.g. 1:0,2:0")
    return heads


def main(argv: list[str] | None = None) -> Path:
    from training.state import add_stage0_options, check_stage0_loop

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
    parser.add_argument("--json-from", type=float, default=0.0, metavar="FRACTION",
                        help="the conversations' JSON-answer turns (training.synthetic) are read from this fraction "
                             "of the steps on: 0 = from the start, 1 = never. A late start lets the scene reading "
                             "form on the short answers first (training/RESULTS.md)")
    parser.add_argument("--bind-weight", type=float, default=0.2, help="weight of the --bind-attention loss")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="held-out synthetic samples (eval.json; needs --scenes): report the QA accuracy on their "
                             "perfect scenes, the ceiling of the whole pipeline")
    parser.add_argument("--eval-images", type=int, default=20, help="held-out images of --eval-data to ask about")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0 = at the end only)")
    parser.add_argument("--compact-vocab", action=argparse.BooleanOptionalAction, default=True,
                        help="train only the embedding and head rows the corpus uses, as parameters of their own: "
                             "the same model (those are the only rows with a gradient), several times faster "
                             "(CompactVocab)")
    add_stage0_options(parser)
    args = parser.parse_args(argv)
    check_stage0_loop(parser, args)
    if args.eval_data and not args.scenes:
        parser.error("--eval-data scores the LLM on perfect scenes: pass --scenes too")
    if args.scene_facts and not (args.scenes and args.caption_data):
        parser.error("--scene-facts extends the captions with what the symbolic scenes hold: pass --scenes and "
                     "--caption-data too")
    if not 0.0 <= args.json_from <= 1.0:
        parser.error(f"--json-from {args.json_from}: a fraction of the steps, 0 to 1")
    if args.bind_attention and not args.scenes:
        parser.error("--bind-attention points heads at the referent's patches of the symbolic scene: pass --scenes too")
    if args.eval_images < 1 or args.eval_every < 0:
        parser.error("--eval-images must be >= 1 and --eval-every >= 0")
    return pretrain(args)


if __name__ == "__main__":
    main()
