"""A float simulation of the quantized model, built from the IR's annotations without changing the IR.

Passes that need the quantized model's behaviour before it is written (end-to-end exponent search,
statistics of quantized layer inputs) run this in onnxruntime.  Each planned activation gets
``QuantizeLinear -> DequantizeLinear`` on uint8 codes with its zero point, followed by a float Clip to its
b-bit range and fused bounds, which is exactly the emitted graph's value set.  Weights are replaced by their
quantized values (``q * 2^e``) unless asked otherwise; biases by the corrected float bias.

Activation scales can be graph *inputs* (``scale_inputs=True``): one onnxruntime session then evaluates any
choice of exponents, fed as ``<tensor>__scale`` float32 scalars.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from ptqc import runtime
from ptqc.annotations import ACT, ARCQ, WEIGHT
from ptqc.borders import border_ops, border_table
from ptqc.passes.emit_qdq import container
from ptqc.quant import int_range


@dataclasses.dataclass
class Simulation:
    proto: onnx.ModelProto
    #: value name -> name of its scale input (when scale_inputs)
    scale_inputs: dict[str, str]
    input_name: str


def planned_values(model: ir.Model) -> list[ir.Value]:
    values = [v for v in model.graph.inputs if ACT in v.meta]
    return values + [v for node in model.graph for v in node.outputs if ACT in v.meta]


def build(model: ir.Model, quantize_weights: bool | set[str] = True, scale_inputs: bool = False,
          extra_outputs: list[str] | None = None, quantize_acts: bool = True, weight_inputs: bool = False,
          border_inputs: list[str] | None = None) -> Simulation:
    """The fake-quantized float model.  ``quantize_weights`` may be a set of node names to quantize.

    ``weight_inputs`` turns every weighted layer's weight and bias into graph inputs (fed with
    :func:`weight_feed`), so one session can run any mix of float and quantized layers.

    A tensor with a rounding border (``meta[ACT].border``) is rounded by it, with the writer's ops
    (``ptqc.borders``).  A quantized layer with ARCQ's remainder terms (``meta[ARCQ]``) gets them as the writer
    writes them (needs ``quantize_acts``).  ``border_inputs`` names tensors whose border thresholds are graph inputs instead,
    ``<tensor>__border_table`` (fed with :func:`border_feed`; a border of 0.5 everywhere rounds to nearest).
    """
    proto = ir.serde.serialize_model(model)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    input_name = next(i.name for i in graph.input if i.name not in inits)
    # weights and biases; a Conv/Gemm without a bias input gets one when its quantized form has a bias (the
    # writer adds it the same way), and always when weights are fed, so that any mix can be fed
    for node, proto_node in zip(model.graph, graph.node):
        wq = node.meta.get(WEIGHT)
        if wq is None:
            continue
        quantize = wq.q is not None and (quantize_weights is True or (quantize_weights and node.name in quantize_weights))
        bias_name = added_bias(node)
        if bias_name is not None and (weight_inputs or (quantize and wq.bias is not None and np.any(wq.bias))):
            bias = wq.bias if quantize and wq.bias is not None else np.zeros(const_shape(node)[wq.axis])
            graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32).reshape(-1), bias_name))
            inits[bias_name] = graph.initializer[-1]
            while len(proto_node.input) < 2:
                proto_node.input.append("")
            proto_node.input.append(bias_name)
        if not quantize:
            continue
        w_hat = wq.dequantized().astype(np.float32)
        wname = node.inputs[1].name
        inits[wname].CopyFrom(numpy_helper.from_array(w_hat, wname))
        if (bias_name in inits or (len(node.inputs) > 2 and node.inputs[2] is not None)) and wq.bias is not None:
            bname = bias_name if bias_name in inits else node.inputs[2].name
            bias = wq.computed_bias(node.inputs[0].meta[ACT].exp if ACT in node.inputs[0].meta else None)
            inits[bname].CopyFrom(numpy_helper.from_array(bias.astype(np.float32).reshape(
                numpy_helper.to_array(inits[bname]).shape), bname))
    scale_names: dict[str, str] = {}
    if quantize_acts:
        producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for inp in n.input:
                consumers.setdefault(inp, []).append(n)
        insert_after: dict[int, list[onnx.NodeProto]] = {}
        front: list[onnx.NodeProto] = []
        border_nodes: dict[str, list[onnx.NodeProto]] = {}

        def _border(v: ir.Value, fed) -> str:
            """Add the border ops of ``v`` (after its fused activation) to ``border_nodes``; their output."""
            act = v.meta[ACT]
            zp, lo, hi = container(act)
            lo, hi = lo - zp, hi - zp
            prefix, channels = f"{v.name}__border", int(v.shape[1])
            table = f"{prefix}_table"
            consts, ops = border_ops(prefix, v.name, act.exp, lo, hi, lo, hi, channels, len(v.shape), table)
            if v.name in fed:
                graph.input.append(helper.make_tensor_value_info(table, onnx.TensorProto.FLOAT, [channels * (hi - lo)]))
            else:
                consts[table] = border_table(act.border, lo)
            graph.initializer.extend(numpy_helper.from_array(arr, k) for k, arr in consts.items())
            border_nodes[v.name] = [helper.make_node(op.op_type, op.inputs, [op.output], **op.attrs) for op in ops]
            return ops[-1].output

        for v in planned_values(model):
            act = v.meta[ACT]
            name = v.name
            zp, lo, hi = container(act)
            users = list(consumers.get(name, []))
            s_name = f"{name}__scale"
            if scale_inputs:
                graph.input.append(helper.make_tensor_value_info(s_name, onnx.TensorProto.FLOAT, []))
                scale_names[name] = s_name
            else:
                graph.initializer.append(numpy_helper.from_array(np.array(2.0**act.exp, np.float32), s_name))
            graph.initializer.append(numpy_helper.from_array(np.array(zp, np.uint8), f"{name}__zp"))
            q_in = name
            if act.border is not None or name in (border_inputs or ()):
                if scale_inputs:
                    raise ValueError("rounding borders need fixed activation scales")
                q_in = _border(v, border_inputs or ())
            nodes = [helper.make_node("QuantizeLinear", [q_in, s_name, f"{name}__zp"], [f"{name}__q"]),
                     helper.make_node("DequantizeLinear", [f"{name}__q", s_name, f"{name}__zp"], [f"{name}__dq"])]
            qmin, qmax = int_range(act.bits, act.signed)
            lo_v, hi_v = f"{name}__lo", f"{name}__hi"
            if scale_inputs:
                # the b-bit range depends on the scale: Clip(x, qmin*s, min(qmax*s, clip_hi)), computed in-graph
                graph.initializer.extend([numpy_helper.from_array(np.array(qmin, np.float32), f"{name}__qmin"),
                                          numpy_helper.from_array(np.array(qmax, np.float32), f"{name}__qmax")])
                nodes += [helper.make_node("Mul", [f"{name}__qmin", s_name], [f"{name}__bottom"]),
                          helper.make_node("Mul", [f"{name}__qmax", s_name], [f"{name}__top"])]
                if act.clip_lo is not None and act.clip_lo > qmin * 2.0**act.exp:
                    graph.initializer.append(numpy_helper.from_array(np.array(act.clip_lo, np.float32), f"{name}__floor"))
                    nodes.append(helper.make_node("Max", [f"{name}__bottom", f"{name}__floor"], [lo_v]))
                else:
                    lo_v = f"{name}__bottom"
                top = f"{name}__top"
                if act.clip_hi is not None:
                    graph.initializer.append(numpy_helper.from_array(np.array(act.clip_hi, np.float32), f"{name}__bound"))
                    nodes.append(helper.make_node("Min", [top, f"{name}__bound"], [hi_v]))
                else:
                    hi_v = top
            else:
                s = 2.0**act.exp
                graph.initializer.extend([numpy_helper.from_array(np.array((lo - zp) * s, np.float32), lo_v),
                                          numpy_helper.from_array(np.array((hi - zp) * s, np.float32), hi_v)])
            nodes = [*border_nodes.pop(name, []), *nodes]
            nodes.append(helper.make_node("Clip", [f"{name}__dq", lo_v, hi_v], [f"{name}__sim"]))
            for user in users:
                for i, inp in enumerate(user.input):
                    if inp == name:
                        user.input[i] = f"{name}__sim"
            if name in producers:
                insert_after.setdefault(producers[name], []).extend(nodes)
            else:
                front.extend(nodes)
        _reorder(graph, insert_after, front)
    if quantize_acts:
        _compensations(model, graph, quantize_weights)
    if weight_inputs:
        movable = set()
        for node in model.graph:
            if WEIGHT in node.meta:
                movable.add(node.inputs[1].name)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    movable.add(node.inputs[2].name)
                elif added_bias(node) is not None:
                    movable.add(added_bias(node))
        kept = [i for i in graph.initializer if i.name not in movable]
        for i in graph.initializer:
            if i.name in movable:
                graph.input.append(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
        del graph.initializer[:]
        graph.initializer.extend(kept)
    existing = {o.name for o in graph.output}
    for name in extra_outputs or []:
        if name not in existing:
            graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    proto.ir_version = min(max(proto.ir_version, 8), 10)
    return Simulation(proto, scale_names, input_name)


def _reorder(graph: onnx.GraphProto, insert_after: dict[int, list[onnx.NodeProto]], front=()) -> None:
    """Put ``front`` first and each ``insert_after[i]`` right after the graph's node ``i``."""
    ordered = list(front)
    for i, n in enumerate(graph.node):
        ordered.append(n)
        ordered.extend(insert_after.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)


def _compensations(model: ir.Model, graph: onnx.GraphProto, quantize_weights: bool | set[str]) -> None:
    """ARCQ's remainder convolutions of every quantized layer that has them, summed into its output (whose name
    stays), as ``emit_qdq`` writes them: the input remainder is the float value after the fused activation minus
    the quantized one, on its ``2^(e - a)`` grid, saturated."""
    index = {n.name: i for i, n in enumerate(graph.node)}
    insert_after: dict[int, list[onnx.NodeProto]] = {}
    for node in model.graph:
        comp = node.meta.get(ARCQ)
        if comp is None or not (quantize_weights is True or (quantize_weights and node.name in quantize_weights)):
            continue
        i = index[node.name]
        conv = graph.node[i]
        x_name, x_sim, w_name = node.inputs[0].name, conv.input[0], conv.input[1]
        out = conv.output[0]
        conv.output[0] = f"{out}__arcq_main"
        attrs = list(conv.attribute)
        terms, new = [conv.output[0]], []
        if comp.q is not None:
            r = f"{node.name}__arcq_remainder_w"
            graph.initializer.append(numpy_helper.from_array(
                comp.weight(node.meta[WEIGHT].axis, comp.q.ndim).astype(np.float32), r))
            new.append(helper.make_node(conv.op_type, [x_sim, r], [f"{out}__arcq_w"]))
            new[-1].attribute.extend(attrs)
            terms.append(new[-1].output[0])
        if comp.act_bits:
            act = node.inputs[0].meta[ACT]
            lo, hi = int_range(comp.act_bits, True)
            step = 2.0 ** (act.exp - comp.act_bits)
            p = f"{node.name}__arcq_dx"
            graph.initializer.extend([numpy_helper.from_array(np.array(step, np.float32), f"{p}_scale"),
                                      numpy_helper.from_array(np.array(128, np.uint8), f"{p}_zp"),
                                      numpy_helper.from_array(np.array(lo * step, np.float32), f"{p}_lo"),
                                      numpy_helper.from_array(np.array(hi * step, np.float32), f"{p}_hi")])
            new += [helper.make_node("Sub", [x_name, x_sim], [f"{p}_float"]),
                    helper.make_node("QuantizeLinear", [f"{p}_float", f"{p}_scale", f"{p}_zp"], [f"{p}_q"]),
                    helper.make_node("DequantizeLinear", [f"{p}_q", f"{p}_scale", f"{p}_zp"], [f"{p}_dq"]),
                    helper.make_node("Clip", [f"{p}_dq", f"{p}_lo", f"{p}_hi"], [p]),
                    helper.make_node(conv.op_type, [p, w_name], [f"{out}__arcq_x"])]
            new[-1].attribute.extend(attrs)
            terms.append(new[-1].output[0])
        for k, t in enumerate(terms[1:]):
            target = out if k == len(terms) - 2 else f"{out}__arcq_sum{k}"
            new.append(helper.make_node("Add", [terms[0] if k == 0 else f"{out}__arcq_sum{k - 1}", t], [target]))
        insert_after[i] = new
    _reorder(graph, insert_after)


def border_feed(model: ir.Model, names: list[str], borders: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Feeds for ``build(..., border_inputs=names)``: each tensor's thresholds from ``borders[name]`` (channels
    x levels), or round to nearest (0.5) where it has none."""
    feed = {}
    values = {v.name: v for v in planned_values(model)}
    for name in names:
        zp, lo, hi = container(values[name].meta[ACT])
        border = (borders or {}).get(name)
        if border is None:
            border = np.full((int(values[name].shape[1]), hi - lo), 0.5)
        feed[f"{name}__border_table"] = border_table(border, lo - zp)
    return feed


def added_bias(node: ir.Node) -> str | None:
    """Name of the bias input the simulation gives a Conv/Gemm that has none (None: it has one, or is a MatMul)."""
    if node.op_type not in ("Conv", "Gemm") or (len(node.inputs) > 2 and node.inputs[2] is not None):
        return None
    return f"{node.inputs[1].name}__bias"


def const_shape(node: ir.Node) -> tuple[int, ...]:
    return tuple(node.inputs[1].const_value.shape)


def scale_feed(model: ir.Model, sim: Simulation, exps: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Feed dict of the scale inputs: the annotated exponents, overridden by ``exps``."""
    feed = {}
    values = {v.name: v for v in planned_values(model)}
    for name, s_name in sim.scale_inputs.items():
        e = (exps or {}).get(name, values[name].meta[ACT].exp)
        feed[s_name] = np.array(2.0**e, np.float32)
    return feed


def layer_arrays(node: ir.Node, quantized: bool) -> dict[str, np.ndarray]:
    """Weight (and bias) of one layer as fed to a ``weight_inputs`` simulation: float, or quantized."""
    from ptqc.passes.fold_batchnorm import const

    wq = node.meta[WEIGHT]
    w = const(node.inputs[1])
    if quantized:
        w = wq.dequantized()
    feed = {node.inputs[1].name: np.asarray(w, np.float32)}
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = const(node.inputs[2])
        feed[node.inputs[2].name] = (wq.bias if quantized else b).astype(np.float32).reshape(b.shape)
    elif added_bias(node) is not None:
        rows = const_shape(node)[wq.axis]
        bias = wq.bias if quantized and wq.bias is not None else np.zeros(rows)
        feed[added_bias(node)] = bias.astype(np.float32).reshape(-1)
    return feed


def cut_model(proto: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The part of ``proto`` that computes ``outputs`` once the values ``inputs`` are given, as a model whose
    inputs are ``inputs`` followed by whatever graph inputs of ``proto`` that part still reads (fed weights;
    the data input itself when some path to ``outputs`` goes around ``inputs``).  Nodes keep their order.  The
    loader admits no control-flow op, so every read is a node input."""
    graph = proto.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    stop, needed, stack = set(inputs), set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in stop or name not in producer or producer[name] in needed:
            continue
        node = graph.node[producer[name]]
        needed.add(producer[name])
        stack.extend(i for i in node.input if i)
    nodes = [n for i, n in enumerate(graph.node) if i in needed]
    reads = {i for n in nodes for i in n.input} | set(outputs)
    declared = {v.name: v for v in graph.input}
    new_inputs = [declared.get(name) or helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                  for name in inputs]
    inits = [t for t in graph.initializer if t.name in reads]
    init_names = {t.name for t in inits}
    new_inputs += [v for v in graph.input if v.name in reads and v.name not in stop and v.name not in init_names]
    sub = helper.make_graph(nodes, f"{graph.name}_cut", new_inputs,
                            [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(sub, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


class CutInputs:
    """The simulated-quantized and float values of one tensor for a fixed list of batches, moved forward through
    the network from tensor to tensor, for passes that fix layers in topological order (GPTQ on quantized
    inputs, AdaRound, block reconstruction).

    The simulation computes the layers in ``fed`` with the weights fed to it, float or quantized, and
    :meth:`fix` switches one to its current integer weights and bias, so what a tensor's readers see accounts
    for every layer fixed before it moved there.  Each :meth:`advance` runs only the part of the network between
    the current tensor and the next (:func:`cut_model`), so over a whole pass each batch goes through each model
    about once, not once per visited layer (MobileNetV2 block reconstruction on 512 images: 263 s of
    onnxruntime before, 421 -> 177 s for the pass).  When the current tensor is a cut (every path from the
    input passes through it), the next step needs nothing else; otherwise the part also recomputes from the
    data input, which is kept, and the values stay exact.  Sessions run without onnxruntime's arena, so memory
    goes back to the system after each run.

    Memory: the values of the current tensor (quantized and float) for every batch, plus the batches.
    """

    def __init__(self, model: ir.Model, fed: list[ir.Node], quantized: bool, batches: list[np.ndarray],
                 border_inputs: list[str] | None = None):
        graph = model.graph
        self.input_name = next(v.name for v in graph.inputs if v.name not in graph.initializers)
        self._sim = build(model, weight_inputs=True, border_inputs=border_inputs).proto
        self._float = ir.serde.serialize_model(model)
        self._model = model
        #: fed arrays: every layer's weight and bias, and the thresholds of the ``border_inputs`` tensors
        self.weights: dict[str, np.ndarray] = border_feed(model, border_inputs) if border_inputs else {}
        for node in fed:
            self.weights.update(layer_arrays(node, quantized=quantized))
        self.batches = [np.ascontiguousarray(b, np.float32) for b in batches]
        #: the tensor the values are of; its quantized values are the simulation's ``<name>__sim``
        self.name = self.input_name
        self._q_name = self.input_name  # the graph input itself before the first advance
        self.x_q: list[np.ndarray] = list(self.batches)
        self.x_f: list[np.ndarray] = list(self.batches)

    def _run(self, proto: onnx.ModelProto, start: str, values: list[np.ndarray], outputs: list[str],
             what: str) -> list[list[np.ndarray]]:
        session = runtime.make_session(cut_model(proto, [start], outputs), arena=False, what=what)
        wanted = {i.name for i in session.get_inputs()}
        weights = {k: v for k, v in self.weights.items() if k in wanted}
        got = []
        for x, raw in zip(values, self.batches):
            feed = {start: x, **weights}
            if self.input_name in wanted:
                feed[self.input_name] = raw
            got.append(runtime.run(session, feed, outputs))
        return got

    def advance(self, name: str) -> None:
        """Move to tensor ``name``: its quantized value is what its readers see in the simulation, with every
        layer fixed so far.  Cheap when ``name`` comes after the current tensor and that is a cut; any other
        tensor is computed from the data input (or as much of it as the path needs)."""
        q_name = f"{name}__sim"
        if q_name != self._q_name:
            self.x_q = [r[0] for r in self._run(self._sim, self._q_name, self.x_q, [q_name], "a part of the simulated model")]
        if name != self.name:
            self.x_f = [r[0] for r in self._run(self._float, self.name, self.x_f, [name], "a part of the float model")]
        self.name, self._q_name = name, q_name

    def floats(self, names: list[str]) -> list[list[np.ndarray]]:
        """The float model's values of ``names`` (tensors after the current one), per batch."""
        return self._run(self._float, self.name, self.x_f, names, "a part of the float model")

    def set_border(self, name: str, border: np.ndarray) -> None:
        """From the next :meth:`advance` on, the simulation rounds tensor ``name`` (one of the ``border_inputs``)
        at ``border`` (channels x levels)."""
        self.weights.update(border_feed(self._model, [name], {name: border}))

    def fix(self, layer: ir.Node) -> None:
        """From the next :meth:`advance` on, the simulation computes ``layer`` with its integer weights and bias."""
        self.weights.update(layer_arrays(layer, quantized=True))
