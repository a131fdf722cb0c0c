"""Write the quantized model as a QDQ graph that stock onnxruntime runs and Netron shows.

Guarantees after the pass:

* Weights are int8 initializers whose values lie in the layer's signed b-bit range, behind a per-channel
  DequantizeLinear with scales ``2**e``.  Biases are int32 at scale ``2**(e_in + e_w[c])`` (exactly
  ``x_scale * w_scale``, as onnxruntime's integer kernels require).
* Every planned activation goes through ``QuantizeLinear -> [Clip] -> DequantizeLinear`` with a scalar
  scale ``2**e`` in a uint8 container: zero point 0 for unsigned tensors, 128 for signed ones (so the codes
  are exactly the signed b-bit integers).  Below 8 bits, or where a fused Relu/Clip bounds the range, an
  integer Clip on the uint8 codes saturates at the b-bit range: the graph computes exactly what b-bit
  hardware computes, and onnxruntime still fuses Conv into QLinearConv around it.
* A fused Relu/Clip node is removed; its effect is that saturation (exact, since rounding is monotone).
* Graph input and output names are unchanged; logits stay float.
* Each quantized node's ``doc_string`` and ``metadata_props`` give bit widths, exponents and shifts.
* A tensor with an AQuant rounding border (``meta[ACT].border``) gets the border's ops between its float
  value and its QuantizeLinear (``_border_nodes``; ``metadata_props["ptqc.role"] = "border"``): they put the
  value exactly on its grid, so the QuantizeLinear only stores the code.  onnxruntime then runs that
  tensor's producer in float.
* A Conv with ARCQ's remainder terms (``meta[ARCQ]``, ``compensate_remainders``) gets them as ops tagged
  ``ptqc.role = "arcq"``: the weight remainder's codes behind their own per-channel DequantizeLinear and a Conv
  of the quantized input with them; the input remainder (the float value after its fused Relu/Clip minus its
  quantized value, through ``QuantizeLinear -> Clip -> DequantizeLinear`` at ``2^(e_in - a)``, once per tensor)
  and a Conv of it with the layer's quantized weights; and the Adds that sum the three accumulators before the
  layer's output quantizer.  onnxruntime then runs those Convs in float.
* With ``rounding="half-up"``, every requantization that shifts right gets an ``Add`` of half an accumulator
  LSB per channel before its QuantizeLinear (0 on channels that shift left): QuantizeLinear's round-half-even
  of ``acc + 1/2`` then never sees a tie and equals ``(acc + 2^(m-1)) >> m``, the shift hardware's rule.  It
  costs one Add per such op, and onnxruntime no longer fuses those Convs into QLinearConv.
"""

from __future__ import annotations

__all__ = ["EmitQdqPass", "container"]

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from ptqc.annotations import ACT, ARCQ, WEIGHT, ActQuant
from ptqc.borders import border_ops, border_prefix, border_table
from ptqc.passes.fold_batchnorm import new_initializer
from ptqc.quant import int_range

logger = logging.getLogger(__name__)


def container(act: ActQuant) -> tuple[int, int, int]:
    """uint8 zero point and the [lo, hi] code range (in uint8 codes) of an activation quantizer."""
    zp = 128 if act.signed else 0
    qmin, qmax = int_range(act.bits, act.signed)
    s = 2.0**act.exp
    if act.clip_lo is not None:
        qmin = max(qmin, int(np.round(act.clip_lo / s)))
    if act.clip_hi is not None:
        qmax = min(qmax, int(np.round(act.clip_hi / s)))
    qmax = max(qmax, qmin)
    return zp, qmin + zp, qmax + zp


def _fmt_range(arr: np.ndarray) -> str:
    lo, hi = int(arr.min()), int(arr.max())
    return str(lo) if lo == hi else f"{lo}..{hi}"


def accumulator_exps(v: ir.Value) -> np.ndarray | None:
    """Exponent of the accumulator LSB (per output channel) of the op that produces ``v`` before its
    requantization, from the annotations (None for a graph input)."""
    act: ActQuant = v.meta[ACT]
    src = act.fused.inputs[0] if act.fused is not None else v
    node = src.producer()
    if node is None:
        return None
    if WEIGHT in node.meta:
        e_in = node.inputs[0].meta[ACT].exp
        main = e_in + np.asarray(node.meta[WEIGHT].exps, np.int64)
        comp = node.meta.get(ARCQ)
        exps = main
        # ARCQ's remainder terms sum into the same accumulator, at their own (finer) scales
        if comp is not None and comp.q is not None:
            exps = np.minimum(exps, e_in + np.asarray(comp.exps, np.int64))
        if comp is not None and comp.act_bits:
            exps = np.minimum(exps, main - comp.act_bits)
        return exps
    exps = [i.meta[ACT].exp for i in node.inputs if i is not None and ACT in i.meta]
    return np.array([min(exps)], np.int64) if exps else None


def _border_nodes(graph: ir.Graph, act: ActQuant, src: ir.Value, name: str, lo: int, hi: int) -> list[ir.Node]:
    """AQuant's rounding border as ONNX ops (``ptqc.borders``), from the float tensor ``src`` to ``2^e * q``,
    exactly on the grid, so the QuantizeLinear after it only stores the code."""
    s = 2.0**act.exp
    u_lo = lo if act.clip_lo is None else max(lo, act.clip_lo / s)
    u_hi = hi if act.clip_hi is None else min(hi, act.clip_hi / s)
    channels = act.border.shape[0]
    rank = len(src.shape) if src.shape is not None else 4
    prefix = border_prefix(name)
    consts, ops = border_ops(prefix, src.name, act.exp, lo, hi, u_lo, u_hi, channels, rank, f"{prefix}_table")
    consts[f"{prefix}_table"] = border_table(act.border, lo)
    values = {src.name: src, **{k: new_initializer(graph, k, arr) for k, arr in consts.items()}}
    nodes = []
    for op in ops:
        node = ir.node(op.op_type, [values[i] for i in op.inputs], attributes=op.attrs,
                       name=f"{op.output}_{op.op_type}")
        node.outputs[0].name = op.output
        node.metadata_props["ptqc.role"] = "border"
        node.metadata_props["ptqc.tensor"] = name
        node.doc_string = "ptqc: AQuant rounding border (code k + 1[u >= k + B[c, k]])"
        values[op.output] = node.outputs[0]
        nodes.append(node)
    return nodes


def _tag(node: ir.Node, layer: str, doc: str) -> ir.Node:
    """Mark ``node`` as part of ARCQ's remainder compensation of ``layer`` (what ``ptqc inspect`` checks)."""
    node.metadata_props["ptqc.role"] = "arcq"
    node.metadata_props["ptqc.layer"] = layer
    node.doc_string = doc if doc.startswith("ptqc:") else f"ptqc: ARCQ remainder compensation of {layer}: {doc}"
    return node


def _input_remainder(graph: ir.Graph, v: ir.Value, src: ir.Value, dq: ir.Value, bits: int, layer: str) -> ir.Value:
    """The remainder of activation ``v`` (the float value ``src`` its quantizer reads, dequantized as ``dq``) below
    its grid, as ``bits``-bit signed codes at ``2^(e - bits)``: ``Clip(src, fused bounds) - dq`` through its own
    QuantizeLinear, integer Clip and DequantizeLinear."""
    act: ActQuant = v.meta[ACT]
    name = f"{v.name}_remainder{bits}"
    nodes = []
    value = src
    if act.clip_lo is not None or act.clip_hi is not None:
        bounds = [None if b is None else new_initializer(graph, f"{name}_{side}", np.array(b, np.float32))
                  for side, b in (("lo", act.clip_lo), ("hi", act.clip_hi))]
        clip = ir.node("Clip", [src, *bounds], name=f"{name}_Clip")
        clip.outputs[0].name = f"{name}_clipped"
        nodes.append(_tag(clip, layer, "the value the fused activation gives"))
        value = clip.outputs[0]
    sub = ir.node("Sub", [value, dq], name=f"{name}_Sub")
    sub.outputs[0].name = f"{name}_float"
    nodes.append(_tag(sub, layer, f"what the requantization to 2^{act.exp} discards"))
    scale = new_initializer(graph, f"{name}_scale", np.array(2.0 ** (act.exp - bits), np.float32))
    zero = new_initializer(graph, f"{name}_zero_point", np.array(128, np.uint8))
    lo, hi = int_range(bits, True)
    q = ir.node("QuantizeLinear", [sub.outputs[0], scale, zero], name=f"{name}_QuantizeLinear")
    q.outputs[0].name = f"{name}_quantized"
    lo_v = new_initializer(graph, f"{name}_clip_lo", np.array(lo + 128, np.uint8))
    hi_v = new_initializer(graph, f"{name}_clip_hi", np.array(hi + 128, np.uint8))
    sat = ir.node("Clip", [q.outputs[0], lo_v, hi_v], name=f"{name}_saturate")
    sat.outputs[0].name = f"{name}_saturated"
    sat.doc_string = f"ptqc: integer saturation to codes [{lo}, {hi}]"
    rdq = ir.node("DequantizeLinear", [sat.outputs[0], scale, zero], name=f"{name}_DequantizeLinear")
    rdq.outputs[0].name = f"{name}_DequantizeLinear_Output"
    note = f"ptqc: {bits}-bit signed remainder of {v.name}, scale 2^{act.exp - bits}, codes [{lo}, {hi}]"
    q.doc_string = rdq.doc_string = note
    for n in (q, rdq):
        _tag(n, layer, note)
        n.metadata_props.update({"ptqc.bits": str(bits), "ptqc.signed": "1", "ptqc.exp": str(act.exp - bits)})
    nodes += [q, sat, rdq]
    graph.insert_after(dq.producer(), nodes)
    return rdq.outputs[0]


def _compensation(graph: ir.Graph, node: ir.Node, written: dict[str, tuple[ir.Value, ir.Value, ir.Value]],
                  remainders: dict[str, ir.Value]) -> None:
    """ARCQ's remainder convolutions of ``node`` (``meta[ARCQ]``), summed into its accumulator before its output
    quantizer."""
    comp = node.meta[ARCQ]
    wq = node.meta[WEIGHT]
    x_dq, w_dq = node.inputs[0], node.inputs[1]
    attrs = {k: a for k, a in node.attributes.items()}
    label = node.name or node.outputs[0].name
    terms, new = [node.outputs[0]], []
    if comp.q is not None:
        base = f"{label}_remainder_weights"
        r_init = new_initializer(graph, f"{base}_quantized", comp.q.astype(np.int8))
        r_scale = new_initializer(graph, f"{base}_scale", np.exp2(comp.exps).astype(np.float32))
        r_zero = new_initializer(graph, f"{base}_zero_point", np.zeros(comp.exps.shape, np.int8))
        rdq = ir.node("DequantizeLinear", [r_init, r_scale, r_zero], attributes={"axis": wq.axis},
                      name=f"{base}_DequantizeLinear")
        rdq.outputs[0].name = f"{base}_DequantizeLinear_Output"
        rdq.metadata_props.update({"ptqc.bits": str(comp.bits), "ptqc.exp": " ".join(map(str, comp.exps))})
        conv = ir.node(node.op_type, [x_dq, rdq.outputs[0]], attributes=attrs, name=f"{label}_arcq_weights")
        conv.outputs[0].name = f"{label}_arcq_weights_out"
        new += [_tag(rdq, label, f"{comp.bits}-bit weight remainder W - W_hat, per-channel scale "
                                 f"2^[{_fmt_range(comp.exps)}]"),
                _tag(conv, label, "quantized input x weight remainder")]
        terms.append(conv.outputs[0])
    if comp.act_bits:
        v, src, dq = next(w for w in written.values() if w[2] is x_dq)
        key = f"{v.name}/{comp.act_bits}"
        if key not in remainders:
            remainders[key] = _input_remainder(graph, v, src, dq, comp.act_bits, label)
        conv = ir.node(node.op_type, [remainders[key], w_dq], attributes=attrs, name=f"{label}_arcq_input")
        conv.outputs[0].name = f"{label}_arcq_input_out"
        new.append(_tag(conv, label, "input remainder x quantized weights"))
        terms.append(conv.outputs[0])
    uses = list(node.outputs[0].uses())
    total = terms[0]
    for i, t in enumerate(terms[1:]):
        add = ir.node("Add", [total, t], name=f"{label}_arcq_sum{i}")
        add.outputs[0].name = f"{label}_arcq_sum{i}_out"
        new.append(_tag(add, label, "sum of the accumulators (aligned by shifts)"))
        total = add.outputs[0]
    for use in uses:
        use.node.replace_input_with(use.idx, total)
    for key, (v, src, dq) in written.items():
        if src is node.outputs[0]:  # a later input remainder is taken from the whole sum
            written[key] = (v, total, dq)
    graph.insert_after(node, new)
    node.doc_string += (f"\nARCQ: + {len(terms) - 1} remainder convolution(s) summed into the accumulator before "
                        "requantization")
    node.metadata_props["ptqc.arcq"] = (f"weights {comp.bits if comp.q is not None else 0} bits, "
                                        f"input {comp.act_bits} bits; score {comp.score:.4g}, error {comp.error:.4g}")


class EmitQdqPass(ir.passes.InPlacePass):
    """Rewrite the annotated float graph into power-of-two QDQ form."""

    def __init__(self, rounding: str = "half-even"):
        super().__init__()
        self.rounding = rounding

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = [v for v in graph.inputs if ACT in v.meta]
        values += [v for node in list(graph) for v in node.outputs if ACT in v.meta]
        acc_exps = {v.name: accumulator_exps(v) for v in values} if self.rounding == "half-up" else {}
        for node in list(graph):
            if WEIGHT in node.meta:
                self._weights(graph, node)
        offsets = 0
        written: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
        for v in values:
            offsets += self._activation(graph, v, acc_exps.get(v.name), written)
        for node in graph:
            if WEIGHT in node.meta:
                self._document(node)
        remainders: dict[str, ir.Value] = {}
        for node in [n for n in graph if ARCQ in n.meta]:
            _compensation(graph, node, written, remainders)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        model.metadata_props["ptqc.rounding"] = self.rounding
        logger.info("wrote %d activation quantizers (%d half-up rounding offsets)", len(values), offsets)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _activation(graph: ir.Graph, v: ir.Value, acc_exp: np.ndarray | None = None,
                    written: dict[str, tuple[ir.Value, ir.Value, ir.Value]] | None = None) -> int:
        """Write ``v``'s quantizer; ``written[v.name]`` becomes (``v``, the float value its QuantizeLinear reads
        before any border or rounding op, its dequantized value)."""
        act: ActQuant = v.meta[ACT]
        zp, lo, hi = container(act)
        name = v.name
        scale = new_initializer(graph, f"{name}_scale", np.array(2.0**act.exp, dtype=np.float32))
        zero = new_initializer(graph, f"{name}_zero_point", np.array(zp, dtype=np.uint8))
        uses = list(v.uses())
        fused = act.fused
        src = fused.inputs[0] if fused is not None else v
        new_nodes = []
        shift = None if acc_exp is None else acc_exp - act.exp
        if act.border is not None:
            # the border decides each rounding exactly (u >= k + B), so no half-up offset is needed
            new_nodes = _border_nodes(graph, act, src, name, lo - zp, hi - zp)
            shift = None
        if shift is not None and np.any(shift < 0):
            half = np.where(shift < 0, np.exp2((acc_exp - 1).astype(np.float64)), 0.0).astype(np.float32)
            rank = len(src.shape) if src.shape is not None else 0
            if half.size > 1 or rank >= 2:
                half = half.reshape((-1,) + (1,) * max(rank - 2, 0)) if half.size > 1 else half.reshape(())
            offset = new_initializer(graph, f"{name}_round_half_up", half)
            add = ir.node("Add", [src, offset], name=f"{name}_RoundHalfUp")
            add.outputs[0].name = f"{name}_round_half_up_out"
            add.doc_string = "ptqc: + half an accumulator LSB, so QuantizeLinear rounds ties up (shift hardware's rule)"
            add.metadata_props["ptqc.role"] = "rounding"
            new_nodes.append(add)
            src_q = add.outputs[0]
        else:
            src_q = new_nodes[-1].outputs[0] if new_nodes else src
        q = ir.node("QuantizeLinear", [src_q, scale, zero], name=f"{name}_QuantizeLinear")
        q.outputs[0].name = f"{name}_quantized"
        new_nodes.append(q)
        codes = q.outputs[0]
        if (lo, hi) != (0, 255):
            lo_v = new_initializer(graph, f"{name}_clip_lo", np.array(lo, dtype=np.uint8))
            hi_v = new_initializer(graph, f"{name}_clip_hi", np.array(hi, dtype=np.uint8))
            clip = ir.node("Clip", [codes, lo_v, hi_v], name=f"{name}_saturate")
            clip.outputs[0].name = f"{name}_saturated"
            clip.doc_string = f"ptqc: integer saturation to codes [{lo - zp}, {hi - zp}]"
            new_nodes.append(clip)
            codes = clip.outputs[0]
        dq = ir.node("DequantizeLinear", [codes, scale, zero], name=f"{name}_DequantizeLinear")
        dq.outputs[0].name = f"{name}_DequantizeLinear_Output"
        dq.outputs[0].shape = v.shape
        dq.outputs[0].type = v.type
        new_nodes.append(dq)
        kind = "signed" if act.signed else "unsigned"
        note = f"ptqc: {act.bits}-bit {kind}, scale 2^{act.exp}, codes [{lo - zp}, {hi - zp}]"
        if fused is not None:
            note += f"; fused {fused.op_type}"
        q.doc_string = dq.doc_string = note
        meta = {"ptqc.bits": str(act.bits), "ptqc.signed": str(int(act.signed)), "ptqc.exp": str(act.exp),
                "ptqc.tensor": name}
        if np.any(np.asarray(act.rescale) != 1.0):
            # this tensor is rescale x the float model's (clip range absorbed into the weights)
            meta["ptqc.fp_scale"] = ",".join(repr(float(r)) for r in np.ravel(act.rescale))
        q.metadata_props.update(meta)
        dq.metadata_props.update(meta)
        anchor = src.producer()
        if anchor is None:
            first = next(iter(graph))
            graph.insert_before(first, new_nodes)
        else:
            graph.insert_after(anchor, new_nodes)
        for use in uses:
            if fused is None and use.node.metadata_props.get("ptqc.keep_float") == "1":
                continue  # a layer kept float reads the float tensor, not its rounded copy
            use.node.replace_input_with(use.idx, dq.outputs[0])
        if fused is not None:
            graph.remove(fused, safe=True)
        if written is not None:
            written[name] = (v, src, dq.outputs[0])
        return int(src_q is not src and act.border is None)

    @staticmethod
    def _weights(graph: ir.Graph, node: ir.Node) -> None:
        wq = node.meta[WEIGHT]
        e_in = node.inputs[0].meta[ACT].exp
        w_value = node.inputs[1]
        wname = w_value.name
        w_init = new_initializer(graph, f"{wname}_quantized", wq.q.astype(np.int8))
        w_scale = new_initializer(graph, f"{wname}_scale", np.exp2(wq.exps).astype(np.float32))
        w_zero = new_initializer(graph, f"{wname}_zero_point", np.zeros(wq.exps.shape, dtype=np.int8))
        wdq = ir.node("DequantizeLinear", [w_init, w_scale, w_zero], attributes={"axis": wq.axis},
                      name=f"{wname}_DequantizeLinear")
        wdq.outputs[0].name = f"{wname}_DequantizeLinear_Output"
        wdq.doc_string = f"ptqc: {wq.bits}-bit signed weights, per-channel scale 2^[{_fmt_range(wq.exps)}]"
        wdq.metadata_props.update({"ptqc.bits": str(wq.bits), "ptqc.exp": " ".join(map(str, wq.exps))})
        if wq.offset is not None:
            used = ", ".join(f"{z:g}" for z in sorted(set(wq.offset.tolist())))
            wdq.doc_string += (f"; per-channel grid offset z in {{{used}}}: a row holds 2^e (k + z) for {wq.bits}-bit "
                               f"codes k (a zero point of -z steps), a half-integer z as the odd 2(k + z) at 2^(e-1)")
            wdq.metadata_props["ptqc.offset"] = " ".join(f"{z:g}" for z in wq.offset)
        new_nodes = [wdq]
        if wq.bias_q is not None and (np.any(wq.bias_q) or (len(node.inputs) > 2 and node.inputs[2] is not None)):
            has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
            bname = node.inputs[2].name if has_bias else f"{node.name or node.outputs[0].name}_bias"
            if not has_bias:
                node.resize_inputs(3)
            b_exps = e_in + wq.exps
            b_init = new_initializer(graph, f"{bname}_quantized", wq.bias_q.astype(np.int32))
            b_scale = new_initializer(graph, f"{bname}_scale", np.exp2(b_exps).astype(np.float32))
            b_zero = new_initializer(graph, f"{bname}_zero_point", np.zeros(b_exps.shape, dtype=np.int32))
            bdq = ir.node("DequantizeLinear", [b_init, b_scale, b_zero], attributes={"axis": 0},
                          name=f"{bname}_DequantizeLinear")
            bdq.outputs[0].name = f"{bname}_DequantizeLinear_Output"
            bdq.doc_string = f"ptqc: int32 bias at the accumulator scale 2^[{_fmt_range(b_exps)}]"
            new_nodes.append(bdq)
            node.replace_input_with(2, bdq.outputs[0])
        graph.insert_before(node, new_nodes)
        node.replace_input_with(1, wdq.outputs[0])

    @staticmethod
    def _document(node: ir.Node) -> None:
        """Bit widths, exponents and requantization shifts where Netron shows them."""
        wq = node.meta[WEIGHT]
        e_in = node.inputs[0].producer().metadata_props.get("ptqc.exp")
        out_exp = None
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0].node.metadata_props.get("ptqc.role") == "rounding":
            uses = list(uses[0].node.outputs[0].uses())
        border = len(uses) == 1 and uses[0].node.metadata_props.get("ptqc.role") == "border"
        seen = set()
        while uses and any(u.node.metadata_props.get("ptqc.role") == "border" for u in uses):
            # through a rounding border's ops to the QuantizeLinear after them
            nxt = []
            for u in uses:
                if u.node.metadata_props.get("ptqc.role") == "border" and u.node not in seen:
                    seen.add(u.node)
                    nxt.extend(u.node.outputs[0].uses())
                elif u.node.op_type == "QuantizeLinear":
                    nxt.append(u)
            uses = nxt
        for use in uses:
            if use.node.op_type == "QuantizeLinear":
                out_exp = int(use.node.metadata_props["ptqc.exp"])
        lines = [f"ptqc: {wq.role + ' layer, ' if wq.role else ''}w{wq.bits} per-channel, input scale 2^{e_in}"]
        props = {"ptqc.weight_bits": str(wq.bits), "ptqc.input_exp": str(e_in), "ptqc.methods": " ".join(wq.methods)}
        if wq.methods:
            lines.append("methods: " + ", ".join(wq.methods))
        if out_exp is not None and e_in is not None:
            shifts = int(e_in) + wq.exps - out_exp
            lines.append(f"requant: acc * 2^({_fmt_range(shifts)}) -> output scale 2^{out_exp} (shift per channel"
                         + (", rounded at AQuant borders)" if border else ")"))
            props["ptqc.output_exp"] = str(out_exp)
            props["ptqc.requant_shift"] = " ".join(map(str, shifts))
        else:
            lines.append("output: float (accumulator dequantized)")
        node.doc_string = "\n".join(lines)
        node.metadata_props.update(props)
