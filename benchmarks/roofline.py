"""The decode roofline: tokens/s <= memory bandwidth / bytes of weights read per token (edge-deployment.md 6).

Each decoded token reads every weight matrix once (all layers and the output head) but only one row of the token
embedding table. The KV cache read at the measured context length is reported beside it; it is not part of the
weights-only roofline the targets use.
"""
from __future__ import annotations

import os
from typing import Any

from sqllava_edge.config import LLMConfig

EMBEDDING_TENSOR = "token_embd.weight"  # GGUF name of the input embedding table


def gguf_bytes_per_token(path: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """Weight bytes a decode step reads from a GGUF file (tensor data sizes from its header)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = embedding = 0
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        total += int(tensor.n_bytes)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
        if tensor.name == EMBEDDING_TENSOR:
            embedding = int(tensor.n_bytes)
    if total == 0:
        raise ValueError(f"{path} holds no tensors; it is not a model GGUF")
    per_token = total - embedding + embedding // max(1, vocab_size)  # spec: one embedding row per token
    return {"weights_bytes": total, "embedding_bytes": embedding, "bytes_per_token": per_token,
            "bytes_by_type": types, "source": "GGUF tensor sizes"}


def torch_bytes_per_token(llm) -> dict[str, Any]:
    """The same for a transformers LlamaForCausalLM in its current dtype."""
    total = sum(p.numel() * p.element_size() for p in llm.parameters())
    table = llm.get_input_embeddings().weight
    embedding = table.numel() * table.element_size()
    per_token = total - embedding + embedding // table.shape[0]
    return {"weights_bytes": total, "embedding_bytes": embedding, "bytes_per_token": per_token,
            "source": f"torch parameters ({str(table.dtype).removeprefix('torch.')})"}


def kv_read_bytes(llm: LLMConfig, context: int, bytes_per_value: int = 2) -> int:
    """K and V read by one decode step at `context` positions: 2 * layers * context * kv_heads * head_dim * bytes."""
    return 2 * llm.num_layers * context * llm.num_kv_heads * llm.head_dim * bytes_per_value


def roofline(bandwidth_gbps: float, bytes_per_token: int) -> float:
    """Upper bound on decode tokens/s (edge-deployment.md 6: bandwidth / bytes of weights read per token)."""
    return bandwidth_gbps * 1e9 / bytes_per_token
