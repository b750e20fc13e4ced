"""Merged LLM -> GGUF (llama architecture) with gguf-py, quantized by llama.cpp, each file validated against PyTorch.

    python -m export.gguf CHECKPOINT --out BUNDLE [--quant f32 q8_0 q4_k_m ...]

Facts (edge-deployment.md sections 2 and 3):
  * f32 / f16 are written directly by gguf-py; every other type is made from the f32 file by llama.cpp's
    `llama_model_quantize`, starting from its default parameters (the struct changed between releases).
  * q_proj / k_proj rows are permuted from transformers' rotate-half RoPE layout to llama.cpp's interleaved one.
  * the vocabulary is the full SentencePiece one (tokens, scores, types) with the special ids, add_bos true, and
    the conversation template as a Jinja `tokenizer.chat_template`, so stock llama.cpp can run the file on text.
    The SDK never lets llama.cpp tokenize: it hands it ids from the bundle's tokenizer (plain caller text, the
    checkpoint's `legacy` setting). Stock llama.cpp on text acts like legacy=true after special tokens and parses
    control-token names in messages (docs/DESIGN.md, "Text after </s>").
  * K-quants work on rows of 256 values; tensors whose rows are not a multiple of 256 get a fallback type from
    llama.cpp (the tiny preset's widths 256 / 768 are multiples, so it is quantized as asked).
Validation right after writing, on a 64-token prompt, llama.cpp (f32 KV cache, no flash attention: the weights'
precision is what is measured) vs the PyTorch module's logits:
  f32 must pick the same argmax at every position (max |diff| recorded); f16 / bf16 / q8_0 need >= 95% top-1
  agreement; the other types' agreement is recorded. A failure raises ExportValidationError.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sqllava_edge.config import LLMConfig
from sqllava_edge.errors import ExportValidationError
from sqllava_edge.fileutil import atomic_path

DIRECT = ("f32", "f16")  # written by gguf-py
# llama.cpp llama_ftype per type made by llama_model_quantize (edge-deployment.md section 2; gguf.LlamaFileType names)
QUANTIZED = {"bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M",
             "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S", "q4_0": "MOSTLY_Q4_0",
             "iq4_nl": "MOSTLY_IQ4_NL"}  # iq4_nl: 4-bit non-linear, blocks of 32, needs no importance matrix
QUANTS = DIRECT + tuple(QUANTIZED)
VALIDATION_TOKENS = 64
MIN_AGREEMENT = {"f32": 1.0, "f16": 0.95, "bf16": 0.95, "q8_0": 0.95}  # top-1 agreement with PyTorch; others: recorded
VALIDATION_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. USER: What is in the picture? "
    "ASSISTANT: A small brown dog is sitting on a wooden bench in a park, next to a red ball and a green bag. "
    "Behind it, two children are flying a kite under a cloudy sky, and a man in a blue coat walks past."
)

# Our (transformers LlamaForCausalLM) tensor names -> gguf-py tensor kinds. "{i}" is the block index.
_TENSORS = {
    "model.embed_tokens.weight": "TOKEN_EMBD",
    "model.norm.weight": "OUTPUT_NORM",
    "lm_head.weight": "OUTPUT",
    "model.layers.{i}.input_layernorm.weight": "ATTN_NORM",
    "model.layers.{i}.self_attn.q_proj.weight": "ATTN_Q",
    "model.layers.{i}.self_attn.k_proj.weight": "ATTN_K",
    "model.layers.{i}.self_attn.v_proj.weight": "ATTN_V",
    "model.layers.{i}.self_attn.o_proj.weight": "ATTN_OUT",
    "model.layers.{i}.post_attention_layernorm.weight": "FFN_NORM",
    "model.layers.{i}.mlp.gate_proj.weight": "FFN_GATE",
    "model.layers.{i}.mlp.up_proj.weight": "FFN_UP",
    "model.layers.{i}.mlp.down_proj.weight": "FFN_DOWN",
}


def check_quants(quants: Sequence[str]) -> list[str]:
    """Normalised, de-duplicated quant names; ValueError listing the valid ones for anything else."""
    names = [str(q).lower() for q in quants]
    unknown = [q for q in names if q not in QUANTS]
    if unknown or not names:
        raise ValueError(f"unknown GGUF quant type(s) {unknown or '(none given)'}; valid: {', '.join(QUANTS)}")
    return list(dict.fromkeys(names))


def export_gguf(
    model_or_llm,
    tokenizer,
    out_dir: str | os.PathLike,
    quants: Sequence[str] = ("f16",),
    template: str | None = None,
    *,
    validate: bool = True,
    strict: bool = True,
    keys: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Write out_dir/llm/model.<quant>.gguf for each quant, validate each, return their manifest artifact dicts.

    `model_or_llm`: a merged SQLLaVA or a transformers LlamaForCausalLM (no LoRA adapters attached); it is not
    changed. `out_dir` is the bundle folder: artifact paths are relative to it. `template`: the conversation template
    written as the GGUF chat template (default: the model config's). `keys`: quant -> inputs_key for the manifest.
    strict=False records a below-tolerance agreement (validation "passed": false) instead of raising; randomly
    initialised models need it for q8_0, their near-uniform logits (top-2 gap ~0.2 std) flip under any quantization.
    """
    from sqllava_edge.bundle import Artifact

    quants = check_quants(quants)
    llm, config, template = _unwrap(model_or_llm, template)
    out_dir = Path(out_dir)
    (out_dir / "llm").mkdir(parents=True, exist_ok=True)
    prompt = validation_prompt(tokenizer, VALIDATION_TOKENS)
    reference = torch_logits(llm, prompt) if validate else None
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-work-", dir=out_dir))
    artifacts = []
    try:
        need_f32 = "f32" in quants or any(q in QUANTIZED for q in quants)
        f32_path = (out_dir if "f32" in quants else scratch) / "llm" / "model.f32.gguf"
        if need_f32:
            write_gguf(llm, config, tokenizer, f32_path, "f32", template, log=log)
        for quant in quants:
            path = out_dir / "llm" / f"model.{quant}.gguf"
            if quant == "f16":
                write_gguf(llm, config, tokenizer, path, "f16", template, log=log)
            elif quant in QUANTIZED:
                log(f"[gguf] quantizing to {quant} with llama.cpp")
                quantize_gguf(f32_path, path, quant)
            try:
                report = validate_gguf(path, quant, prompt, reference, strict=strict, log=log) if validate else {}
            except ExportValidationError:
                path.unlink(missing_ok=True)  # never leave a file that failed its validation
                raise
            rel = path.relative_to(out_dir).as_posix()
            artifact = Artifact.from_files(out_dir, "llm_gguf", rel, [rel], quant, report,
                                           inputs_key=(keys or {}).get(quant, ""))
            artifacts.append(artifact.to_dict())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return artifacts


def _unwrap(model_or_llm, template: str | None):
    """(HF LlamaForCausalLM, LLMConfig, template name) from an SQLLaVA or a bare LlamaForCausalLM."""
    from sqllava_edge.model import SQLLaVA

    if isinstance(model_or_llm, SQLLaVA):
        llm, config, default_template = model_or_llm.llm, model_or_llm.config.llm, model_or_llm.config.template
    else:
        llm, config, default_template = model_or_llm, llm_config_from_hf(model_or_llm.config), "v1"
    if hasattr(llm, "peft_config"):
        raise ValueError("the LLM still carries LoRA adapters; merge them first (export.merge, or "
                         "load_checkpoint(folder, merge_lora=True))")
    return llm, config, template or default_template


def llm_config_from_hf(hf_config) -> LLMConfig:
    """Our LLMConfig from a transformers LlamaConfig (plain RoPE only)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported by this GGUF export")
    return LLMConfig(vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
                     intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
                     num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
                     max_position_embeddings=hf_config.max_position_embeddings, rms_norm_eps=hf_config.rms_norm_eps,
                     rope_theta=float(rope.get("rope_theta", 10000.0)), bos_token_id=hf_config.bos_token_id,
                     eos_token_id=hf_config.eos_token_id, pad_token_id=hf_config.pad_token_id or 0)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half Q/K rows -> llama.cpp's interleaved pairs (edge-deployment.md section 3)."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_head
    w = weight.reshape(n_head, 2, head_dim // 2, in_dim)  # (heads, half, pair, in)
    return w.swapaxes(1, 2).reshape(out_dim, in_dim)  # (heads * pair * half, in): pairs interleaved


def gguf_tensors(llm, config: LLMConfig, dtype: str):
    """Yield (gguf name, numpy array) for every LLM tensor: Q/K permuted, matrices in `dtype`, norms in f32."""
    import gguf

    state = {k: v for k, v in llm.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    templates = {}
    for ours, kind in _TENSORS.items():
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]] + ".weight"
        for i in range(config.num_layers) if "{i}" in ours else [None]:
            templates[ours.format(i=i)] = name.format(bid=i)
    missing, unknown = sorted(set(templates) - set(state)), sorted(set(state) - set(templates))
    if missing or unknown:
        raise ValueError(f"the LLM's tensors do not match a Llama with {config.num_layers} layers "
                         f"(missing {missing[:4]}, unexpected {unknown[:4]})")
    for ours, name in templates.items():
        array = state[ours].detach().float().cpu().numpy()
        if ours.endswith("q_proj.weight"):
            array = permute_rope(array, config.num_heads)
        elif ours.endswith("k_proj.weight"):
            array = permute_rope(array, config.num_kv_heads)
        if array.ndim == 2 and dtype == "f16":
            array = array.astype(np.float16)
        yield name, np.ascontiguousarray(array)


def write_gguf(llm, config: LLMConfig, tokenizer, path: Path, dtype: str, template: str,
               log: Callable[[str], None] = print) -> Path:
    """Write an f32 or f16 llama GGUF of `llm` to `path` atomically."""
    import gguf

    log(f"[gguf] writing {path.name}")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(f"sqllava-edge {config.num_layers}-layer llama")
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16))
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_heads)
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        add_vocab(writer, tokenizer, config, template)
        writer.add_string("sqllava_edge.template", template)
        for name, array in gguf_tensors(llm, config, dtype):
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
    return path


def quantize_gguf(src: Path, dst: Path, quant: str) -> Path:
    """llama.cpp's llama_model_quantize from default parameters (edge-deployment.md section 2), atomically."""
    import ctypes

    import gguf

    from runtimes.llamacpp import import_llama_cpp, set_llama_logging

    llama_cpp = import_llama_cpp()
    set_llama_logging(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, QUANTIZED[quant]))
    params.nthread = os.cpu_count() or 1
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {src.name} -> {quant} failed with code {rc}")
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary and chat template

_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6  # SentencePiece / GGUF token types


def spm_vocab(tokenizer) -> tuple[list[str], list[float], list[int], str]:
    """(tokens, scores, types, source) of the tokenizer's SentencePiece vocabulary, for `tokenizer.ggml.*`.

    The Llama-2 vocabulary (the one SQ-LLaVA uses) is recognised and copied with its real piece scores from the
    llama.cpp vocab gguf. Any other vocabulary gets scores derived from the id order (SentencePiece BPE ids are in
    merge-priority order) and types from the special / byte tokens; a tokenizer.json alone does not keep scores.
    """
    hf = tokenizer.hf
    tokens = hf.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    if len(tokens) == 32000:
        from sqllava_edge.vocab import read_spm_vocab

        reference = read_spm_vocab()
        if list(reference.tokens) == tokens:
            return tokens, list(reference.scores), list(reference.types), "llama-2 sentencepiece (scores exact)"
    special = set(hf.all_special_ids)
    types, scores, rank = [], [], 0
    for i, token in enumerate(tokens):
        if i == tokenizer.unk_id:
            kind = _UNKNOWN
        elif i in special:
            kind = _CONTROL
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = _BYTE
        else:
            kind = _NORMAL
        types.append(kind)
        scores.append(-float(rank) if kind == _NORMAL else 0.0)
        rank += kind == _NORMAL
    return tokens, scores, types, "derived from the tokenizer's id order (scores approximate)"


def chat_template_jinja(template: str) -> str:
    """The conversation template (sqllava_edge.conversation, docs/spec.md 3.2 separator style "two") as a Jinja chat template.

    Renders exactly what `conversation.render` renders for the same turns: `system + sep`, then per message i
    `ROLE: content` + (sep after even, sep2 after odd i), a vuser question followed by "</s>" before its separator,
    and a message whose content is None as the open turn `ROLE:`. Roles user / assistant / vuser; a first "system"
    message replaces the template's system text; add_generation_prompt appends `ASSISTANT:`.
    """
    from sqllava_edge.conversation import EOS_TEXT, get_template

    conv = get_template(template)
    if conv.style != "two":
        raise ValueError(f"template {template!r} (style {conv.style!r}) is not a chat format; use v1, v1_sq or llava_v1")
    lit = _jinja_literal
    lines = [
        "{%- set roles = " + lit(dict(conv.roles)) + " -%}",
        "{%- set system = " + lit(conv.system) + " -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set messages = messages[1:] -%}{%- endif -%}",
        "{{- system ~ " + lit(conv.sep) + " -}}",
        "{%- for message in messages -%}",
        "{%- if message['role'] not in roles -%}"
        "{{- raise_exception('role ' ~ message['role'] ~ ' is not one of " + ", ".join(conv.roles) + "') -}}{%- endif -%}",
        "{%- set sep = " + lit(conv.sep) + " if loop.index0 % 2 == 0 else " + lit(conv.sep2) + " -%}",
        "{%- if message['content'] is none -%}{{- roles[message['role']] ~ ':' -}}",
        "{%- elif message['role'] == 'vuser' -%}{{- roles['vuser'] ~ ': ' ~ message['content'] ~ " + lit(EOS_TEXT)
        + " ~ sep -}}",
        "{%- else -%}{{- roles[message['role']] ~ ': ' ~ message['content'] ~ sep -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- roles['assistant'] ~ ':' -}}{%- endif -%}",
    ]
    return "\n".join(lines)


def _jinja_literal(value) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)  # JSON strings and objects are valid Jinja literals


def add_vocab(writer, tokenizer, config: LLMConfig, template: str) -> str:
    """The `tokenizer.ggml.*` keys (edge-deployment.md section 3) and the chat template; returns the vocab source."""
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the LLM's vocabulary is "
                         f"{config.vocab_size}; export with the checkpoint's own tokenizer")
    tokens, scores, types, source = spm_vocab(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template_jinja(template))
    return source


# ----------------------------------------------------------------------------------------------------------------
# Validation


def validation_prompt(tokenizer, n: int) -> list[int]:
    """BOS + a fixed English text, `n` ids long (the text repeats if it tokenizes shorter)."""
    text_ids = tokenizer.encode(VALIDATION_TEXT, add_bos=False)
    ids = [tokenizer.bos_id]
    while len(ids) < n:
        ids += text_ids
    return ids[:n]


def torch_logits(llm, ids: Sequence[int]) -> np.ndarray:
    """(n, V) float32 logits of the PyTorch LLM at every position of one prompt."""
    import torch

    with torch.inference_mode():
        device = llm.get_input_embeddings().weight.device
        out = llm(input_ids=torch.tensor([list(ids)], device=device))
    return out.logits[0].float().cpu().numpy()


def compare_logits(ours: np.ndarray, reference: np.ndarray) -> dict:
    """Top-1 agreement and max |diff| of two (n, V) logit matrices."""
    agree = ours.argmax(-1) == reference.argmax(-1)
    return {"positions": int(len(agree)), "top1_agreement": round(float(agree.mean()), 4),
            "argmax_mismatches": int((~agree).sum()), "max_abs_diff": float(np.abs(ours - reference).max()),
            "reference_logit_std": round(float(reference.std()), 4)}


def validate_gguf(path: Path, quant: str, prompt: Sequence[int], reference: np.ndarray, strict: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Run `path` in llama.cpp on `prompt`, compare with the PyTorch logits; below MIN_AGREEMENT raise (strict)."""
    from runtimes.llamacpp import LlamaCppLLM

    with LlamaCppLLM(path, n_ctx=max(len(prompt), 64), n_seq_max=1, kv_type="f32", flash_attn=False) as llm:
        logits = llm.prefill(0, tokens=prompt, all_logits=True)  # (n, V)
    report = {"prompt_tokens": len(prompt), "kv_cache": "f32", "flash_attn": False, **compare_logits(logits, reference)}
    need = MIN_AGREEMENT.get(quant)
    if need is not None:
        report["min_top1_agreement"] = need
        report["passed"] = report["top1_agreement"] >= need
    log(f"[gguf] {path.name}: top-1 agreement {report['top1_agreement']:.2%} over {len(prompt)} positions, "
        f"max |diff| {report['max_abs_diff']:.3g}")
    if need is not None and strict and not report["passed"]:
        raise ExportValidationError(
            f"{path.name}: tensor 'logits' top-1 agreement with PyTorch {report['top1_agreement']:.2%} is below the "
            f"tolerance {need:.0%} ({report['argmax_mismatches']} of {len(prompt)} positions differ, "
            f"max |diff| {report['max_abs_diff']:.3g})")
    return report
