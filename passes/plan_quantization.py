"""Decide what gets quantized, to how many bits, signed or unsigned, and which tensors share a scale.

Guarantees after the pass:

* Every weighted op (Conv, Gemm, MatMul with a constant weight) has ``node.meta[WEIGHT]``: its weight bit
  width and output-channel axis.  Gemm ``alpha``/``beta`` are folded into the weights and bias, and a 2-D
  Gemm bias becomes 1-D.
* Every float activation that an integer op reads or writes has ``value.meta[ACT]`` (bits, signedness,
  sharing group), except the graph outputs, which stay float.
* A Relu or Clip that is the only consumer of a Conv/Gemm/MatMul/Add output is *fused*: its output carries
  the quantizer, with the clip bounds recorded, and the pre-activation tensor has none.  The writer turns it
  into integer saturation.
* A tensor is unsigned when the graph proves it is non-negative (after Relu, Clip(lo >= 0), or ops that
  keep non-negativity); otherwise signed.
* Values that must share one exponent (inputs and output of MaxPool, Flatten, Reshape, Concat, ...) carry
  the same group id.
* With the first/last-layer policy, the first layer's weights, input and output (after its fused activation)
  and the last layer's weights and input are 8-bit, and so is the tensor a pooling (through shape-only ops)
  turns into the last layer's input.  This is the academic convention: BRECQ's ``set_first_last_layer_to_8bit``
  (which RAPQ reuses) sets module 0's output quantizer and module -2's (the last conv, before the pooling) to
  8 bits.
* A layer output that only Adds read (the branch of a residual sum) has ``max(act_bits, residual_bits)`` bits.
"""

from __future__ import annotations

__all__ = ["PlanQuantizationPass"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.annotations import (
    ACT,
    FUSABLE_ACTS,
    INTEGER_OPS,
    PASSTHROUGH_OPS,
    WEIGHT,
    WEIGHTED_OPS,
    ActQuant,
    WeightQuant,
)
from ptqc.config import QuantConfig, layer_widths
from ptqc.errors import PtqcError
from ptqc.passes.fold_batchnorm import const, new_initializer

logger = logging.getLogger(__name__)

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
_SHARES_SCALE = PASSTHROUGH_OPS + ("Pad",)
_POOLS = ("GlobalAveragePool", "AveragePool", "ReduceSum", "ReduceMean")
_KEEPS_SIGN = _SHARES_SCALE + ("Concat", "ReduceSum", "GlobalAveragePool", "AveragePool", "Add")


def weight_axis(node: ir.Node) -> int | None:
    """Output-channel axis of a weighted node's weight, or None when it is not a quantizable weighted op."""
    if node.op_type not in WEIGHTED_OPS or len(node.inputs) < 2 or const(node.inputs[1]) is None:
        return None
    w = const(node.inputs[1])
    if node.op_type == "Conv":
        return 0 if w.ndim >= 3 else None
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1  # MatMul: [K, N]


def clip_bounds(node: ir.Node) -> tuple[float | None, float | None] | None:
    """Float bounds of a Relu/Clip with constant bounds, else None."""
    if node.op_type == "Relu":
        return 0.0, None
    lo = hi = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const(node.inputs[1])
        if arr is None:
            return None
        lo = float(arr)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        arr = const(node.inputs[2])
        if arr is None:
            return None
        hi = float(arr)
    return lo, hi


def is_float_activation(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in _FLOATS and ir.convenience.get_const_tensor(value) is None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class PlanQuantizationPass(ir.passes.InPlacePass):
    """Annotate weights and activations with their quantizers (exponents come later)."""

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.config = config

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        graph.sort()
        nodes = list(graph)
        for node in nodes:
            if node.op_type == "Gemm":
                self._canonical_gemm(graph, node)

        weighted = {}
        kept_float = set()
        for node in nodes:
            axis = weight_axis(node)
            if axis is not None and node.name in self.config.keep_float:
                kept_float.add(node)
                node.metadata_props["ptqc.keep_float"] = "1"
                node.doc_string = "ptqc: kept float on request (--keep-float): float weights and arithmetic"
            elif axis is not None:
                weighted[node] = axis
        unknown = sorted(set(self.config.keep_float) - {n.name for n in kept_float})
        if unknown:
            raise PtqcError(f"--keep-float: no quantizable layer named {unknown[0]!r}; `ptqc inspect` on a compiled "
                            f"model, or `ptqc sensitivity`, lists the layer names")
        both = sorted(set(self.config.keep_float) & set(self.config.layer_bits))
        if both:
            raise PtqcError(f"layer {both[0]!r} is both kept float and given a bit width")

        # fused activations: Relu/Clip as the only consumer of an op that requantizes
        fused_pre: set[ir.Value] = set()
        fused_post: dict[ir.Value, tuple[ir.Node, float | None, float | None]] = {}
        for node in nodes:
            if node.op_type not in FUSABLE_ACTS:
                continue
            x = node.inputs[0]
            prod = x.producer() if x is not None else None
            bounds = clip_bounds(node)
            if prod is None or bounds is None or len(x.uses()) != 1 or x in graph.outputs:
                continue
            if prod not in weighted and prod not in kept_float and prod.op_type != "Add":
                continue
            fused_pre.add(x)
            fused_post[node.outputs[0]] = (node, bounds[0], bounds[1])

        # signedness, proven from the graph
        unsigned: dict[ir.Value, bool] = {}
        for node in nodes:
            for out in node.outputs:
                if node.op_type in FUSABLE_ACTS:
                    b = clip_bounds(node)
                    unsigned[out] = b is not None and b[0] is not None and b[0] >= 0
                elif node.op_type in _KEEPS_SIGN:
                    data = [v for v in node.inputs if is_float_activation(v)]
                    unsigned[out] = bool(data) and all(unsigned.get(v, False) for v in data)
                else:
                    unsigned[out] = False

        # which values get a quantizer
        candidates = [v for v in graph.inputs if is_float_activation(v)]
        for node in nodes:
            candidates.extend(v for v in node.outputs if is_float_activation(v))
        planned: list[ir.Value] = []
        for v in candidates:
            if self._feeds_only_outputs(graph, v) or v in fused_pre or not v.uses():
                continue
            prod = v.producer()
            produced_int = prod is None or (prod.op_type in INTEGER_OPS and prod not in kept_float)
            read_int = any(u.node.op_type in INTEGER_OPS and u.node not in kept_float
                           and (u.node not in weighted or u.idx == 0) for u in v.uses())
            # a tensor only kept-float layers read stays float, so those layers see their input unrounded
            only_float_readers = all(u.node in kept_float for u in v.uses())
            if read_int or (produced_int and not only_float_readers):
                planned.append(v)

        first, last = self._first_last(graph, nodes, {**weighted, **dict.fromkeys(kept_float, 0)})
        bits_of: dict[ir.Value, int] = {v: self.config.act_bits for v in planned}
        residual = [v for v in planned if v.producer() in weighted and all(u.node.op_type == "Add" for u in v.uses())]
        for v in residual:
            bits_of[v] = max(self.config.act_bits, self.config.residual_bits)

        def quantized_output(node: ir.Node) -> ir.Value:
            """The tensor that carries a layer's output quantizer: its fused Relu/Clip's output, if it has one."""
            out = node.outputs[0]
            return out.uses()[0].node.outputs[0] if out in fused_pre else out

        for node in kept_float:
            # the tensors around a layer kept float that stay quantized (integer ops also read them, e.g. a
            # residual Add) get 8 bits: the layer was kept float for precision, which a narrow grid beside it
            # would undo, and no layer setting reaches them once their reader or writer is float
            for v in (node.inputs[0], quantized_output(node)):
                if v in bits_of:
                    bits_of[v] = 8
        unknown = sorted(set(self.config.layer_bits) - {n.name for n in weighted})
        if unknown:
            raise PtqcError(f"no quantizable layer named {unknown[0]!r}; `ptqc inspect` on a compiled model, or "
                            f"`ptqc sensitivity`, lists the layer names")
        overridden: set[ir.Value] = set()
        for node, axis in weighted.items():
            role = "first" if node in first else "last" if node in last else ""
            bits = self.config.weight_bits
            if role and self.config.first_last_8bit:
                bits = 8
                data = node.inputs[0]
                if data in bits_of:
                    bits_of[data] = 8
                if role == "last":
                    for v in self._pooled_into(data):
                        if v in bits_of:
                            bits_of[v] = 8
                elif (out := quantized_output(node)) in bits_of:
                    bits_of[out] = 8
            if node.name in self.config.layer_bits:
                bits, a_bits = layer_widths(self.config.layer_bits[node.name])
                data = node.inputs[0]
                if data in bits_of:
                    # a tensor read by several overridden layers takes the widest request
                    bits_of[data] = max(bits_of[data], a_bits) if data in overridden else a_bits
                    overridden.add(data)
                out = quantized_output(node)
                if out in bits_of and all(u.node not in weighted and u.node not in kept_float for u in out.uses()):
                    # no layer's setting reaches an output only Adds (pooling, ...) read, e.g. a residual
                    # branch: the layer that writes it decides, and never lowers it
                    bits_of[out] = max(bits_of[out], a_bits)
                    overridden.add(out)
            if (bits == 8 and role == "first" and self.config.pair_safe_first and bits_of.get(node.inputs[0]) == 8
                    and not unsigned.get(node.inputs[0], False)):
                bits = 7  # |w| <= 64: 255 * (64 + 64) fits int16, so onnxruntime's u8 x s8 pairs cannot saturate
            node.meta[WEIGHT] = WeightQuant(bits=bits, axis=axis, role=role, bias=self._bias(node, axis))
            if node.name in self.config.layer_bits:
                node.meta[WEIGHT].methods.append(f"bits={self.config.layer_bits[node.name]}")
            if bits == 7 and role == "first" and self.config.pair_safe_first:
                node.meta[WEIGHT].methods.append("pair_safe")

        # sharing groups
        uf = _UnionFind()
        index = {v: i for i, v in enumerate(planned)}
        for node in nodes:
            if node.op_type in _SHARES_SCALE or node.op_type == "Concat":
                members = [v for v in (*node.inputs, *node.outputs) if v in index]
                if node.op_type != "Concat":
                    members = [v for v in (node.inputs[0], node.outputs[0]) if v in index]
                    if len(members) < 2:
                        continue
                for a in members[1:]:
                    uf.union(index[members[0]], index[a])
        group_bits: dict[int, int] = {}
        group_unsigned: dict[int, bool] = {}
        for v in planned:
            g = uf.find(index[v])
            group_bits[g] = max(group_bits.get(g, 0), bits_of[v])
            group_unsigned[g] = group_unsigned.get(g, True) and unsigned.get(v, False)
        for v in planned:
            g = uf.find(index[v])
            act = ActQuant(bits=group_bits[g], signed=not group_unsigned[g], group=g)
            if v in fused_post:
                act.fused, act.clip_lo, act.clip_hi = fused_post[v]
            v.meta[ACT] = act
        logger.info(
            "planned %d activation quantizers (%d fused activations, %d residual branches) and %d weighted layers",
            len(planned), len(fused_post), len(residual), len(weighted),
        )
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _feeds_only_outputs(graph: ir.Graph, v: ir.Value) -> bool:
        """True for the logits and tensors that reach them through shape-only ops: these stay float."""
        if v in graph.outputs:
            return True
        uses = v.uses()
        return bool(uses) and all(
            u.node.op_type in PASSTHROUGH_OPS and u.idx == 0 and PlanQuantizationPass._feeds_only_outputs(graph, u.node.outputs[0])
            for u in uses
        )

    @staticmethod
    def _pooled_into(v: ir.Value | None) -> list[ir.Value]:
        """The tensors ``v`` is computed from through pooling and shape-only ops (the last conv's output that a
        global pooling feeds into the classifier)."""
        out = []
        while v is not None and v.producer() is not None and v.producer().op_type in _POOLS + PASSTHROUGH_OPS:
            v = v.producer().inputs[0]
            out.append(v)
        return out

    @staticmethod
    def _bias(node: ir.Node, axis: int) -> np.ndarray:
        n_out = const(node.inputs[1]).shape[axis]
        b = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if b is None:
            return np.zeros(n_out)
        return np.broadcast_to(b.astype(np.float64).reshape(-1), (n_out,)).copy()

    @staticmethod
    def _first_last(graph: ir.Graph, nodes: list[ir.Node], weighted: dict) -> tuple[set, set]:
        # first: weighted nodes reading a graph input through shape-only ops
        first = set()
        inputs = set(graph.inputs)
        for node in weighted:
            v = node.inputs[0]
            while v is not None and v not in inputs:
                p = v.producer()
                if p is None or p.op_type not in _SHARES_SCALE:
                    break
                v = p.inputs[0]
            if v in inputs:
                first.add(node)
        # last: weighted nodes with no weighted node downstream
        below: dict[ir.Node, bool] = {}
        for node in reversed(nodes):
            users = [u.node for out in node.outputs for u in out.uses()]
            below[node] = any(u in weighted or below.get(u, False) for u in users)
        last = {n for n in weighted if not below[n]}
        return first, last

    @staticmethod
    def _canonical_gemm(graph: ir.Graph, node: ir.Node) -> None:
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        w = const(node.inputs[1]) if len(node.inputs) > 1 else None
        name = node.name or node.outputs[0].name
        if alpha != 1.0 and w is not None:
            node.replace_input_with(1, new_initializer(graph, f"{name}_W_alpha", (w * alpha).astype(w.dtype)))
            node.attributes.pop("alpha", None)
        c = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if c is not None and (beta != 1.0 or c.ndim != 1) and w is not None:
            n_out = w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1]
            if c.size in (1, n_out):
                c1 = np.broadcast_to(c.reshape(-1) * beta, (n_out,)).astype(c.dtype)
                node.replace_input_with(2, new_initializer(graph, f"{name}_C", c1))
                node.attributes.pop("beta", None)
