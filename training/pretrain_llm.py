"""Stage 0 for presets without a pretrained LLM offline: pretrain the base LLM on the dataset's text, no images.

    python -m training.pretrain_llm --data DATA/stage2.json --preset tiny --out RUN [--max-steps N]

SQ-LLaVA starts from Vicuna (spec 6.3): a language model that already reads a conversation, follows the template and
copies facts from its context. LoRA on a frozen *random* LLM has none of that to adapt and, in the CPU budget, never
learns to look at the image (training/RESULTS.md). This step makes a stand-in for Vicuna at the preset's shape: a
Llama trained from scratch as a plain language model on the conversations' text, rendered with the training
template and the image placeholder removed. It never sees an image, so everything visual is still learned by
stages 1 and 2; pass the result to stage 1 as `--llm-base RUN/llm`.

Writes RUN/llm (a transformers Llama folder, safetensors, atomic), RUN/metrics.jsonl and RUN/loss_curve.png.

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

from sqllava_edge.config import IMAGE_PLACEHOLDER


def corpus(rows: list[dict[str, Any]], tokenizer, template: str, sq_r: float, rng: random.Random) -> list[list[int]]:
    """Token ids of every conversation, rendered as in training but without the image; VUSER turns drawn at sq_r."""
    from sqllava_edge.conversation import sq_convert, to_turns, tokenize_conversation

    out = []
    for row in rows:
        conv = [{**t, "value": t["value"].replace(IMAGE_PLACEHOLDER, "").strip()} for t in row["conversations"]]
        turns = sq_convert(conv, sq_r, rng, False) if sq_r > 0 else to_turns(conv, False)
        out.append(tokenize_conversation(tokenizer, template, turns, has_image=False).ids)
    return out


class RestrictedHead:
    """Cross-entropy through the rows `vocab` of a head whose other rows are zero (see the module docstring)."""

    def __init__(self, vocab: list[int], vocab_size: int, device):
        self.vocab = torch.tensor(sorted(set(vocab)), device=device)
        self.index = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        self.index[self.vocab] = torch.arange(len(self.vocab), device=device)
        unseen = vocab_size - len(self.vocab)
        self.bucket = math.log(unseen) if unseen else None

    def loss_sum(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight[self.vocab].T  # (N, V')
        if self.bucket is not None:
            logits = torch.cat([logits, logits.new_full((len(logits), 1), self.bucket)], dim=1)
        return F.cross_entropy(logits.float(), self.index[targets], reduction="sum")


def pretrain(args) -> Path:
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    from sqllava_edge.config import get_preset
    from sqllava_edge.fileutil import atomic_dir
    from sqllava_edge.model import hf_llama_config
    from sqllava_edge.tokenizer import default_tokenizer
    from training.data import load_samples
    from training.state import MetricsLog, plot_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "llm").exists():
        raise FileExistsError(f"{out}/llm exists; choose a new --out or delete it")
    config = get_preset(args.preset)
    tokenizer = default_tokenizer()
    rows = [r for path in args.data for r in load_samples(path)]
    if not rows:
        raise ValueError(f"{', '.join(map(str, args.data))}: no samples")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    texts = corpus(rows, tokenizer, args.template, args.sq_r, rng)
    vocab = {t for ids in texts for t in ids} | {config.llm.eos_token_id}
    model = LlamaForCausalLM(hf_llama_config(config.llm))
    head = model.lm_head.weight
    restricted = RestrictedHead(sorted(vocab), config.llm.vocab_size, head.device)
    with torch.no_grad():  # unseen rows start at zero and stay there: the loss reads only the corpus rows, so their
        head[restricted.index < 0] = 0.0  # gradient is exactly zero and AdamW (no decay) never moves them
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, int(0.03 * args.max_steps))
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.max_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", None)
    order: list[int] = []
    bar = tqdm(total=args.max_steps, desc="stage 0 (LLM text pretraining)", unit="step", disable=not args.progress)
    start = time.time()
    for step in range(1, args.max_steps + 1):
        batch = []
        while len(batch) < args.batch_size:
            if not order:
                order = list(range(len(texts)))
                rng.shuffle(order)
            batch.append(texts[order.pop()])
        width = max(map(len, batch))
        ids = torch.tensor([b + [config.llm.pad_token_id] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        keep_pos = mask[:, 1:].bool()
        loss_sum = restricted.loss_sum(hidden[keep_pos], head, ids[:, 1:][keep_pos])
        n = int(keep_pos.sum())
        (loss_sum / n).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_sum.item() / n
        log.write({"step": step, "loss": loss, "lr": {"llm": lr}, "grad_norm": grad_norm, "trained_tokens": n,
                   "elapsed": time.time() - start})
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
    bar.close()
    with atomic_dir(out / "llm") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps({
            "trainer": "python -m training.pretrain_llm", "preset": config.name, "data": [str(p) for p in args.data],
            "steps": args.max_steps, "corpus_vocab": len(vocab), "final_loss": loss}, indent=2))
    plot_loss(log.records(), out / "loss_curve.png", f"stage 0: {config.name} LLM text pretraining")
    print(json.dumps({"stage": 0, "steps": args.max_steps, "wall_s": round(time.time() - start, 1),
                      "final_loss": round(loss, 4), "corpus_vocab": len(vocab)}), flush=True)
    return out / "llm"


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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--max-steps and --batch-size must be >= 1 and --lr > 0")
    return pretrain(args)


if __name__ == "__main__":
    main()
