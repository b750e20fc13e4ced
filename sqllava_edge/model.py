"""The SQ-LLaVA module: CLIP vision tower -> prototype extractor + projector -> Llama, top to bottom.

Spec: docs/spec.md section 1 (shapes, the prototype extractor formulas of 1.4.2, the splice of 1.5).
Composition, not mixins: `SQLLaVA(config, vision, projector, llm)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sqllava_edge.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig


# ----------------------------------------------------------------------------------------------------------------
# Vision tower


def hf_clip_config(vision: VisionConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        layer_norm_eps=vision.layer_norm_eps,
        hidden_act="quick_gelu",  # OpenAI CLIP
        attn_implementation="sdpa",
        architectures=["CLIPVisionModel"],  # config.json names the class: tools that read the folder need it
    )


class VisionTower(nn.Module):
    """transformers' CLIPVisionModel, run only up to the selected layer (docs/spec.md 1.2); CLS dropped for "patch"."""

    def __init__(self, config: VisionConfig, clip: nn.Module | None = None):
        super().__init__()
        from transformers import CLIPVisionModel

        self.config = config
        self.clip = clip if clip is not None else CLIPVisionModel(hf_clip_config(config))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.clip.embeddings.patch_embedding.weight.dtype
        x = self.clip.embeddings(pixel_values.to(dtype))  # (B, 1+P, D)
        x = self.clip.pre_layrnorm(x)  # hidden_states[0]
        for layer in self.clip.encoder.layers[: self.config.layers_used]:  # later layers never run
            x = layer(x, None)
        if self.config.select_feature == "patch":
            x = x[:, 1:]  # (B, P, D): drop CLS
        return x


# ----------------------------------------------------------------------------------------------------------------
# Projectors


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)  # docs/spec.md 1.4.1: mlp.1 is QuickGELU, not nn.GELU


def pooling_matrix(num_tokens: int, num_centers: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The fixed (N, L) averaging matrix equal to AdaptiveAvgPool1d(N) over L tokens (docs/spec.md 1.4.2 step 2).

    Row n averages tokens [floor(n*L/N), ceil((n+1)*L/N)): one MatMul, no adaptive pooling op in exported graphs.
    Computed in float64 and rounded once to `dtype` (default: torch's default dtype).
    """
    rows = torch.zeros(num_centers, num_tokens, dtype=torch.float64, device="cpu")
    for n in range(num_centers):
        start = (n * num_tokens) // num_centers
        end = -((-(n + 1) * num_tokens) // num_centers)  # ceil
        rows[n, start:end] = 1.0 / (end - start)
    return rows.to(device=device, dtype=dtype or torch.get_default_dtype())


class PrototypeExtractor(nn.Module):
    """SQ-LLaVA's "cluster" projector: soft-EM prototypes, hard sigmoid-similarity dispatch, QuickGELU MLP.

    Exactly docs/spec.md 1.4.2, quirks included (keys normalised over tokens, unnormalised M-step, `c` re-applied every
    iteration, aggregation / (count + 1) with the pooled feature centre, s_l applied twice, ln_1 unused).
    Steps 5-6 use one-hot matmuls instead of the reference's dense (B, N, L, D) broadcast.
    """

    def __init__(self, channels: int, channels_out: int, num_centers: int, num_tokens: int, iterations: int,
                 keep_unused_ln: bool = True):
        super().__init__()
        self.num_centers = num_centers
        self.iterations = iterations
        self.sim_alpha = nn.Parameter(torch.ones(1, 1, 1))
        self.sim_beta = nn.Parameter(torch.zeros(1, 1, 1))
        self.c = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.f = nn.Linear(channels, channels)
        if keep_unused_ln:
            self.ln_1 = nn.LayerNorm(channels)  # exists in the reference state dict, never used (docs/spec.md 1.4.1)
        self.mlp = nn.Sequential(nn.Linear(channels, channels_out), QuickGELU(), nn.Linear(channels_out, channels_out))
        self.num_tokens = num_tokens
        self.register_buffer("pool", pooling_matrix(num_tokens, num_centers, self.c.weight.dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        """After a cast or move (.double(), .half(), .to(device)), rebuild the pooling matrix in the buffer's new dtype:
        casting the old buffer would keep its rounding (1/3 in float32 is not 1/3 in float64)."""
        super()._apply(fn, recurse)
        self.pool = pooling_matrix(self.num_tokens, self.num_centers, self.pool.dtype, self.pool.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        pool = self.pool.to(x.dtype)  # (N, L)
        feats = self.f(x)  # (B, L, D)  "value"
        keys = F.normalize(self.v(x), dim=1)  # (B, L, D), normalised along the token axis (docs/spec.md 8.3)
        centers = pool @ x  # (B, N, D)  pooled initial centres C0
        center_feats = pool @ feats  # (B, N, D)  CF
        for _ in range(self.iterations):  # soft-EM, docs/spec.md 1.4.2 step 3
            query = F.normalize(self.c(centers), dim=-1)  # (B, N, D)
            assign = torch.softmax(query @ keys.transpose(1, 2), dim=1)  # (B, N, L), softmax over centres
            centers = assign @ feats  # (B, N, D), unnormalised M-step
        # Step 4: hard assignment with sigmoid(beta + alpha * cos(C_n, x_l)).
        cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)  # (B, N, L)
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)  # (B, N, L)
        best = sim.argmax(dim=1)  # (B, L)
        ids = torch.arange(self.num_centers, device=x.device).view(1, -1, 1)
        onehot = (ids == best.unsqueeze(1)).to(x.dtype)  # (B, N, L)
        weight = (sim * onehot).sum(dim=1)  # (B, L): s_l
        # Step 5: A_n = (sum_{a(l)=n} s_l F_l + CF_n) / (count_n + 1)
        summed = (onehot * weight.unsqueeze(1)) @ feats  # (B, N, D)
        agg = (summed + center_feats) / (onehot.sum(dim=-1, keepdim=True) + 1.0)
        # Step 6: out_l = x_l + s_l * A_{a(l)}
        out = x + weight.unsqueeze(-1) * (onehot.transpose(1, 2) @ agg)  # (B, L, D)
        return self.mlp(out)  # (B, L, H), step 7


def build_projector(config: ModelConfig) -> nn.Module:
    d, h = config.vision.hidden_size, config.llm.hidden_size
    p: ProjectorConfig = config.projector
    if p.type == "cluster":
        return PrototypeExtractor(d, h, p.num_centers, config.vision.num_image_tokens, p.em_iterations, p.keep_unused_ln)
    if p.type == "mlp2x_gelu":  # LLaVA-1.5 (docs/spec.md 1.4.3)
        return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h))
    if p.type == "linear":
        return nn.Linear(d, h)
    if p.type == "identity":
        if d != h:
            raise ValueError(f"identity projector needs vision width == LLM width, got {d} and {h}")
        return nn.Identity()
    raise ValueError(f"unknown projector type {p.type!r}")


# ----------------------------------------------------------------------------------------------------------------
# LLM


def hf_llama_config(llm: LLMConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
        rope_theta=llm.rope_theta,
        bos_token_id=llm.bos_token_id,
        eos_token_id=llm.eos_token_id,
        pad_token_id=llm.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        architectures=["LlamaForCausalLM"],  # llama.cpp's convert_hf_to_gguf.py refuses a config.json without it
    )


# ----------------------------------------------------------------------------------------------------------------
# The image splice (docs/spec.md 1.5), a pure function


@dataclass
class SplicedBatch:
    inputs_embeds: torch.Tensor  # (B, T, H), right-padded with zeros
    attention_mask: torch.Tensor  # (B, T) long, 1 = real position
    labels: torch.Tensor | None  # (B, T), IGNORE_INDEX at image rows, padding and masked text


def splice_image_embeddings(
    input_ids: Sequence[torch.Tensor],
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    image_embeds: torch.Tensor | None,
    labels: Sequence[torch.Tensor] | None = None,
) -> SplicedBatch:
    """Replace each IMAGE_TOKEN_INDEX in the (unpadded) rows by the next image's rows of `image_embeds` (Ni, T, H).

    Placeholders consume images in order across the batch (one image per placeholder; the reference's reuse of
    the first image for several placeholders, docs/spec.md 8.16, is not reproduced). Rows are right-padded.
    """
    total = sum(int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in input_ids)
    given = 0 if image_embeds is None else image_embeds.shape[0]
    if total != given:
        raise ValueError(f"the prompts hold {total} image placeholder(s) but {given} image(s) were given")
    rows, row_labels, next_image = [], [], 0
    for i, ids in enumerate(input_ids):
        is_image = ids == IMAGE_TOKEN_INDEX
        text = embed_tokens(ids.clamp(min=0))  # (n, H); image slots embedded as id 0, then replaced
        lab = labels[i] if labels is not None else None
        pieces, lab_pieces, start = [], [], 0
        for pos in torch.nonzero(is_image).flatten().tolist():
            pieces += [text[start:pos], image_embeds[next_image].to(text.dtype)]
            if lab is not None:
                fill = torch.full((image_embeds.shape[1],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)
                lab_pieces += [lab[start:pos], fill]
            next_image, start = next_image + 1, pos + 1
        pieces.append(text[start:])
        rows.append(torch.cat(pieces))
        if lab is not None:
            lab_pieces.append(lab[start:])
            row_labels.append(torch.cat(lab_pieces))
    length = max(r.shape[0] for r in rows)
    hidden = rows[0].shape[1]
    embeds = rows[0].new_zeros(len(rows), length, hidden)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
    out_labels = None
    if labels is not None:
        out_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
        if out_labels is not None:
            out_labels[i, : row.shape[0]] = row_labels[i]
    return SplicedBatch(embeds, mask, out_labels)


# ----------------------------------------------------------------------------------------------------------------
# The whole model


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    attention_mask: torch.Tensor  # (B, T)
    cache: object | None = None  # the LLM's KV cache (transformers Cache) with use_cache


class SQLLaVA(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionTower, projector: nn.Module, llm: nn.Module):
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.llm = llm

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int | None = None) -> "SQLLaVA":
        """Random weights (for tests, benchmarks and training from scratch)."""
        from transformers import LlamaForCausalLM

        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config, VisionTower(config.vision), build_projector(config), LlamaForCausalLM(hf_llama_config(config.llm)))
        return model.to(dtype)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, T, H): the rows that replace each image placeholder."""
        feats = self.vision(pixel_values.to(self.device))  # (B, T, D)
        proj_dtype = next(self.projector.parameters(), feats).dtype
        return self.projector(feats.to(proj_dtype))

    def prepare_inputs(self, input_ids, pixel_values=None, labels=None, image_embeds=None) -> SplicedBatch:
        ids = _rows(input_ids)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        lab = _rows(labels) if labels is not None else None
        ids = [r.to(self.device) for r in ids]
        lab = [r.to(self.device) for r in lab] if lab is not None else None
        return splice_image_embeddings(ids, self.embed_tokens, image_embeds, lab)

    def forward(self, input_ids, pixel_values=None, image_embeds=None, use_cache: bool = False) -> ModelOutput:
        """input_ids: a list of 1-D tensors (unpadded rows) or a 2-D tensor of equal-length rows. The training loss
        is training.loss.lm_loss (on the decoder's hidden states, through prepare_inputs' labels)."""
        batch = self.prepare_inputs(input_ids, pixel_values, image_embeds=image_embeds)
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=use_cache)
        return ModelOutput(out.logits, batch.attention_mask, out.cache if use_cache else None)


def _rows(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() == 1:
            return [x]
        return list(x)
    return [torch.as_tensor(r, dtype=torch.long) for r in x]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
