"""The vision tower's attention as one onnxruntime operator per layer, rewritten in an exported ONNX graph.

torch.onnx's dynamo exporter writes scaled dot-product attention as plain ops: per layer three projections
Add(MatMul(X, W), b), Reshape + Transpose into heads, both sides scaled by Mul(., s), MatMul, Softmax, MatMul with V,
Transpose + Reshape back to (B, S, D). onnxruntime's CPU provider runs that as separate kernels and does not fuse it
(its transformer optimizer does not match the exported pattern either, benchmarks/RESULTS.md). Two rewrites:

  * `fuse_multihead`: Q, K, V stay three MatMuls; everything from them to the (B, S, D) result becomes
    com.microsoft.MultiHeadAttention (num_heads from the head Reshape, scale = s * s).
  * `pack_qkv` (after fuse_multihead): where Q, K and V are projections of one X, one MatMul over the concatenated
    weights, split into Q, K, V for the same MultiHeadAttention: one GEMM instead of three. (Or, into="Attention",
    com.microsoft.Attention over the packed weights, which onnxruntime's dynamic quantizer makes QAttention: as
    fast, measured, benchmarks/RESULTS.md.)

The int8 export (export.onnx.quantize_int8) quantizes the rewritten graph: on a 2-core AVX-512 VNNI CPU the bench-1b
tower ran 6-10% faster than with the exported attention (benchmarks/RESULTS.md).

Both are contrib ops of onnxruntime: graphs holding them are for onnxruntime, not for TensorRT, so only the int8 graph
(a CPU graph) holds them; the fp32 and fp16 graphs, which export.trt builds engines from, keep the exported ops. Patterns that do not match exactly (other layouts, masks, a non-scalar scale) are left
as they are; each function returns how many layers it rewrote.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CONTRIB = "com.microsoft"


def _graph_maps(graph):
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


def _constant(name: str, graph, producer) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute:
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _heads_source(name: str, producer) -> tuple[str | None, str | None]:
    """Follow Reshape / Transpose back from a per-head tensor to the (B, S, D) tensor they rearrange
    -> (that tensor, the shape input of the first Reshape met on the way back), or (None, None)."""
    shape = None
    while (node := producer.get(name)) is not None and node.op_type in ("Reshape", "Transpose"):
        if node.op_type == "Reshape":
            shape = node.input[1]
        name = node.input[0]
    return (name, shape) if shape is not None else (None, None)


def _unscaled(name: str, graph, producer) -> tuple[str, float | None]:
    node = producer.get(name)
    if node is not None and node.op_type == "Mul":
        scale = _constant(node.input[1], graph, producer)
        if scale is not None and scale.size == 1:
            return node.input[0], float(scale.reshape(()))
    return name, None


def _only_consumer(name: str, consumers, op_type: str):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _replace_nodes(model, new_nodes: list, replaced_outputs: set[str]) -> None:
    """Put `new_nodes` in, drop the nodes whose outputs they now produce, then every node and initializer nothing
    reads any more; nodes stay in topological order."""
    graph = model.graph
    nodes = [n for n in graph.node if not set(n.output) & replaced_outputs] + new_nodes
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("attention rewrite left a node whose inputs nothing produces")
        pending = rest
    needed = {out.name for out in graph.output}
    alive = []
    for node in reversed(ordered):
        if set(node.output) & needed:
            alive.append(node)
            needed.update(name for name in node.input if name)
    alive.reverse()
    del graph.node[:]
    graph.node.extend(alive)
    kept = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == CONTRIB for op in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))


def fuse_multihead(model) -> int:
    """Rewrite each exported attention (module docstring) into com.microsoft.MultiHeadAttention, in place."""
    from onnx import helper

    graph = model.graph
    producer, consumers = _graph_maps(graph)
    new_nodes, replaced = [], set()
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        scores = producer.get(softmax.input[0])
        if scores is None or scores.op_type != "MatMul":
            continue
        (q_heads, q_scale), (k_heads, k_scale) = (_unscaled(name, graph, producer) for name in scores.input)
        weighted = _only_consumer(softmax.output[0], consumers, "MatMul")
        if q_scale is None or k_scale is None or weighted is None or weighted.input[0] != softmax.output[0]:
            continue
        back = _only_consumer(weighted.output[0], consumers, "Transpose")
        merged = back and _only_consumer(back.output[0], consumers, "Reshape")
        if not merged or list(helper.get_attribute_value(back.attribute[0])) != [0, 2, 1, 3]:
            continue
        (q, q_shape), (k, _), (v, _) = (_heads_source(name, producer) for name in (q_heads, k_heads, weighted.input[1]))
        shape = _constant(q_shape, graph, producer) if q_shape else None
        if None in (q, k, v) or shape is None or shape.size != 4 or shape[2] <= 0:
            continue
        new_nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], [merged.output[0]], domain=CONTRIB,
                                          name=f"attention_{len(new_nodes)}", num_heads=int(shape[2]),
                                          scale=q_scale * k_scale))
        replaced.add(merged.output[0])
    if new_nodes:
        _replace_nodes(model, new_nodes, replaced)
    return len(new_nodes)


def pack_qkv(model, into: str = "MultiHeadAttention") -> int:
    """Where a MultiHeadAttention's Q, K and V are Add(MatMul(X, W), b) of one X, project them with one MatMul over the
    concatenated weights, in place. into="MultiHeadAttention": MatMul, Add, Split, then the same attention node;
    into="Attention": com.microsoft.Attention(X, [Wq | Wk | Wv], [bq | bk | bv]), which onnxruntime's dynamic
    quantizer turns into QAttention."""
    from onnx import helper, numpy_helper

    if into not in ("MultiHeadAttention", "Attention"):
        raise ValueError(f"into must be 'MultiHeadAttention' or 'Attention', not {into!r}")
    graph = model.graph
    producer, _ = _graph_maps(graph)
    weights = {init.name for init in graph.initializer}
    new_nodes, new_weights, replaced = [], [], set()
    for node in [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == CONTRIB]:
        projections = []
        for name in node.input[:3]:
            add = producer.get(name)
            if add is None or add.op_type != "Add":
                break
            matmuls = [i for i in add.input if getattr(producer.get(i), "op_type", None) == "MatMul"]
            biases = [i for i in add.input if i in weights]
            if len(matmuls) != 1 or len(biases) != 1 or producer[matmuls[0]].input[1] not in weights:
                break
            x, w = producer[matmuls[0]].input
            projections.append((x, _constant(w, graph, producer), _constant(biases[0], graph, producer)))
        if len(projections) != 3 or len({x for x, _, _ in projections}) != 1:
            continue
        x = projections[0][0]
        prefix = node.name or f"attention_{len(replaced)}"
        w, b = f"{prefix}.qkv_weight", f"{prefix}.qkv_bias"
        new_weights += [numpy_helper.from_array(np.concatenate([p[1] for p in projections], axis=1), w),
                        numpy_helper.from_array(np.concatenate([p[2] for p in projections], axis=0), b)]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if into == "Attention":
            new_nodes.append(helper.make_node("Attention", [x, w, b], list(node.output), domain=CONTRIB, name=prefix,
                                              num_heads=attrs["num_heads"], scale=attrs["scale"]))
        else:
            sizes = f"{prefix}.qkv_sizes"
            new_weights.append(numpy_helper.from_array(np.array([p[1].shape[1] for p in projections], np.int64), sizes))
            q, k, v = (f"{prefix}.{part}" for part in "qkv")
            new_nodes += [helper.make_node("MatMul", [x, w], [f"{prefix}.qkv_product"], name=f"{prefix}.qkv_matmul"),
                          helper.make_node("Add", [f"{prefix}.qkv_product", b], [f"{prefix}.qkv"], name=f"{prefix}.qkv_add"),
                          helper.make_node("Split", [f"{prefix}.qkv", sizes], [q, k, v], name=f"{prefix}.qkv_split", axis=-1),
                          helper.make_node("MultiHeadAttention", [q, k, v], list(node.output), domain=CONTRIB,
                                           name=prefix, **attrs)]
        replaced.update(node.output)
    if replaced:
        graph.initializer.extend(new_weights)
        _replace_nodes(model, new_nodes, replaced)
    return len(replaced)


def write_rewritten(fp32_path, out_path, pack: str | None = "MultiHeadAttention") -> int:
    """`fp32_path` with `fuse_multihead` and, unless `pack` is None, `pack_qkv(into=pack)` applied, saved to `out_path`
    (weights in <out_path>.data) when any layer was rewritten -> the number of layers rewritten (0: nothing written)."""
    import onnx

    model = onnx.load(str(fp32_path))
    layers = fuse_multihead(model)
    if layers:
        if pack is not None:
            pack_qkv(model, into=pack)
        onnx.save(model, str(out_path), save_as_external_data=True, location=Path(out_path).name + ".data")
    return layers
