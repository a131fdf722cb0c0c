"""Where the accuracy went: per-layer error of a ptqc QDQ model against its float model, on real inputs.

Everything is measured in one onnxruntime session over a combined graph holding three things side by side:

* the float model, prepared as the compiler saw it (BatchNorm folded, global pooling as ReduceSum), so its
  tensors carry the names the QDQ model's quantizers record (``ptqc.tensor`` metadata);
* the QDQ model itself, every name prefixed with ``q/``: the *accumulated* error of each quantized tensor;
* for every weighted layer, a copy of its input quantizer, weights, bias and output quantizer fed with the
  float model's input of that layer: the error of that layer *alone*, with no upstream error.

Definitions (all sums over every element of every report sample):

* SQNR = 10 log10(sum fp^2 / sum (fp - q)^2) dB, with ``fp`` the float tensor scaled by the factor the
  compiler multiplied it by (``ptqc.fp_scale``, from absorbing a clip range into the weights; 1 otherwise).
* For each activation quantizer with scale 2^e and codes [lo, hi], on the float values: the clipping ratio
  is the fraction outside [lo 2^e, hi 2^e]; the clipping error is sum (fp - clip(fp))^2 and the rounding
  error sum (clip(fp) - q(fp))^2, where q is the quantizer alone.  They add up to the quantizer's own error.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
from onnx import helper

from ptqc import progress, runtime
from ptqc.borders import border_tensor, border_value
from ptqc.data import Dataset
from ptqc.errors import PtqcError

logger = logging.getLogger(__name__)

Q_PREFIX = "q/"
ALONE_PREFIX = "alone/"
#: float values per tensor kept for the histogram figures
SAMPLE_CAP = 60_000


@dataclasses.dataclass
class TensorStats:
    """One quantized activation tensor."""

    name: str
    bits: int
    signed: bool
    exp: int
    lo: int  # code range, zero point removed
    hi: int
    #: one factor, or one per channel (axis 1) where equalize_channels scaled channels separately
    fp_scale: float | tuple[float, ...] = 1.0
    sqnr_db: float = math.nan  # accumulated: the QDQ model against the float model
    quant_sqnr_db: float = math.nan  # this quantizer alone, on the float values
    clip_ratio: float = 0.0
    clip_error: float = 0.0  # mean squared clipping error of the quantizer alone
    round_error: float = 0.0  # mean squared rounding error of the quantizer alone
    signal: float = 0.0  # mean square of the float values

    @property
    def range(self) -> tuple[float, float]:
        return self.lo * 2.0**self.exp, self.hi * 2.0**self.exp


@dataclasses.dataclass
class LayerStats:
    """One weighted layer (Conv/Gemm/MatMul)."""

    name: str
    op: str
    weight_bits: int
    input_tensor: str
    output_tensor: str  # the quantized tensor it writes, or its float output (the logits)
    input_bits: int
    output_bits: int | None
    input_exp: int
    weight_exps: list[int]
    output_exp: int | None
    shifts: list[int]
    methods: list[str]
    sqnr_alone_db: float = math.nan
    sqnr_db: float = math.nan  # accumulated, at the layer's output

    @property
    def shift_range(self) -> str:
        if not self.shifts:
            return ""
        lo, hi = min(self.shifts), max(self.shifts)
        return str(lo) if lo == hi else f"{lo}..{hi}"

    @property
    def weight_exp_range(self) -> str:
        lo, hi = min(self.weight_exps), max(self.weight_exps)
        return str(lo) if lo == hi else f"{lo}..{hi}"


@dataclasses.dataclass
class Report:
    model: str
    quantized: str
    samples: int
    logit_snr_db: float
    agreement: float  # top-1 agreement with the float model, %
    layers: list[LayerStats]
    tensors: dict[str, TensorStats]
    settings: dict[str, str]
    hints: list[str] = dataclasses.field(default_factory=list)
    #: float values (scaled like the quantized tensor) sampled per tensor, for histograms
    samples_of: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    #: layers left in float (``--keep-float`` or ``--max-drop``'s float fallback): not in ``layers``
    kept_float: list[str] = dataclasses.field(default_factory=list)
    #: which samples the figures come from (``measurement_data``'s description), or "" when not said
    measured_on: str = ""

    def worst_layers(self, n: int = 5) -> list[LayerStats]:
        """The ``n`` layers with the lowest SQNR alone (the ones that lose most by themselves)."""
        ranked = [layer for layer in self.layers if math.isfinite(layer.sqnr_alone_db)]
        return sorted(ranked, key=lambda layer: layer.sqnr_alone_db)[:n]

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("samples_of")
        out["worst_layers"] = [layer.name for layer in self.worst_layers()]
        return out


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB; infinite for zero noise."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# ----------------------------------------------------------------------------------------------------------
# Reading the QDQ model
# ----------------------------------------------------------------------------------------------------------

def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _const(graph_inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    t = graph_inits.get(name)
    return None if t is None else onnx.numpy_helper.to_array(t)


def read_quantizers(q: onnx.ModelProto) -> tuple[dict[str, TensorStats], dict[str, onnx.NodeProto]]:
    """Every activation quantizer the compiler wrote: tensor name -> stats skeleton, and -> its DequantizeLinear."""
    inits = {i.name: i for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    tensors, dqs = {}, {}
    for n in q.graph.node:
        meta = _meta(n)
        if n.op_type != "DequantizeLinear" or "ptqc.tensor" not in meta:
            continue
        name = meta["ptqc.tensor"]
        zp = int(_const(inits, n.input[2]).reshape(-1)[0]) if len(n.input) > 2 else 0
        lo, hi = 0, 255
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "Clip":
            lo, hi = int(_const(inits, src.input[1])), int(_const(inits, src.input[2]))
        tensors[name] = TensorStats(name, int(meta["ptqc.bits"]), meta["ptqc.signed"] == "1", int(meta["ptqc.exp"]),
                                    lo - zp, hi - zp, _parse_scale(meta.get("ptqc.fp_scale", "1.0")))
        dqs[name] = n
    if not tensors:
        raise PtqcError("the quantized model has no ptqc quantizers (was it written by ptqc compile?)")
    return tensors, dqs


def read_layers(q: onnx.ModelProto, tensors: dict[str, TensorStats]) -> list[LayerStats]:
    """Every weighted layer with its bits, exponents, shifts and methods, in graph order."""
    producer = {o: n for n in q.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = []
    for n in q.graph.node:
        meta = _meta(n)
        if "ptqc.weight_bits" not in meta:
            continue
        in_dq = producer[n.input[0]]
        in_name = _meta(in_dq)["ptqc.tensor"]
        w_dq = producer[n.input[1]]
        w_exps = [int(e) for e in _meta(w_dq)["ptqc.exp"].split()]
        out_name, out_dq = _output_quantizer(n, consumers)
        out_exp = tensors[out_name].exp if out_dq is not None else None
        shifts = [int(s) for s in meta.get("ptqc.requant_shift", "").split()]
        layers.append(LayerStats(
            n.name, n.op_type, int(meta["ptqc.weight_bits"]), in_name, out_name, tensors[in_name].bits,
            tensors[out_name].bits if out_dq is not None else None, tensors[in_name].exp, w_exps, out_exp, shifts,
            meta.get("ptqc.methods", "").split()))
    return layers


def _users(consumers, name: str) -> list[onnx.NodeProto]:
    """The readers of ``name`` on the layer's own path: without the ops that take ARCQ's input remainder from it."""
    return [u for u in consumers.get(name, [])
            if not (_meta(u).get("ptqc.role") == "arcq" and u.op_type in ("Clip", "Sub"))]


def _arcq_sum(users: list[onnx.NodeProto]) -> onnx.NodeProto | None:
    """The Add that sums a layer's accumulator with ARCQ's remainder terms, when it is ``users``' only node."""
    if len(users) == 1 and users[0].op_type == "Add" and _meta(users[0]).get("ptqc.role") == "arcq":
        return users[0]
    return None


def _output_quantizer(layer: onnx.NodeProto, consumers) -> tuple[str, onnx.NodeProto | None]:
    """(tensor name, DequantizeLinear) of the quantizer a layer writes, or (its float output, None)."""
    out = layer.output[0]
    seen = out
    while True:
        users = _users(consumers, seen)
        if (add := _arcq_sum(users)) is not None:
            seen = add.output[0]  # ARCQ's remainder accumulators are summed before the quantizer
            continue
        if len(users) == 1 and (tensor := border_tensor(users[0])) is not None:
            seen = border_value(tensor)  # the rounding border's ops end in front of the QuantizeLinear
            continue
        if len(users) != 1 or users[0].op_type not in ("Add", "QuantizeLinear", "Clip", "DequantizeLinear"):
            return out, None
        user = users[0]
        if user.op_type == "Add" and _meta(user).get("ptqc.role") != "rounding":
            return out, None
        if user.op_type == "DequantizeLinear":
            return _meta(user)["ptqc.tensor"], user
        seen = user.output[0]


# ----------------------------------------------------------------------------------------------------------
# The combined graph
# ----------------------------------------------------------------------------------------------------------

def prepare_float(model: str | onnx.ModelProto) -> onnx.ModelProto:
    """The float model as the compiler sees it before quantizing: loaded, BatchNorm folded, pooling as sums."""
    import onnx_ir as ir

    from ptqc import loader, writer
    from ptqc.passes.fold_batchnorm import FoldBatchNormPass
    from ptqc.passes.gap_to_sum import GapToSumPass

    irm = loader.load(model)
    ir.passes.PassManager([FoldBatchNormPass(), GapToSumPass()])(irm)
    return writer.to_proto(irm)


def _prefixed(q: onnx.ModelProto, keep: set[str]) -> tuple[list, list]:
    """The QDQ graph's nodes and initializers with every name except ``keep`` (the graph input) prefixed."""
    def ren(name: str) -> str:
        return name if (not name or name in keep) else Q_PREFIX + name

    nodes = []
    for n in q.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = Q_PREFIX + n.name
        m.input[:] = [ren(i) for i in n.input]
        m.output[:] = [ren(o) for o in n.output]
        nodes.append(m)
    inits = []
    for t in q.graph.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = ren(t.name)
        inits.append(c)
    return nodes, inits


def _alone_branch(layer: LayerStats, q: onnx.ModelProto, tensors: dict[str, TensorStats], fp_names: set[str],
                  producer, consumers) -> tuple[list, list, str, str]:
    """Nodes computing ``layer`` alone from the float input; returns (nodes, initializers, output, reference)."""
    node = next(n for n in q.graph.node if n.name == layer.name)
    tag = ALONE_PREFIX + layer.name + "/"
    nodes, inits = [], []
    # input quantizer chain: Q -> [Clip] -> DQ, reading the float tensor (times its compiler rescale)
    in_dq = producer[node.input[0]]
    chain = [in_dq]
    while chain[0].op_type != "QuantizeLinear":
        chain.insert(0, producer[chain[0].input[0]])
    src = layer.input_tensor
    if src not in fp_names:
        raise PtqcError(f"the float model has no tensor {src!r}; was the quantized model compiled from it?")
    if tensors[src].fp_scale != 1.0:
        factor = np.asarray(tensors[src].fp_scale, np.float32)
        dims = [] if factor.ndim == 0 else [factor.size, 1, 1]
        k = helper.make_tensor(tag + "in_scale", onnx.TensorProto.FLOAT, dims, factor.ravel().tolist())
        inits.append(k)
        nodes.append(helper.make_node("Mul", [src, k.name], [tag + "in_scaled"], name=tag + "in_scale"))
        src = tag + "in_scaled"
    prev = src
    for i, n in enumerate(chain):
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = tag + n.name
        m.input[:] = [prev] + [Q_PREFIX + x for x in n.input[1:]]
        m.output[:] = [tag + f"in{i}"]
        prev = m.output[0]
        nodes.append(m)
    # the layer: weights and bias from the prefixed QDQ graph
    x_q = prev
    m = onnx.NodeProto()
    m.CopyFrom(node)
    m.name = tag + node.name
    m.input[:] = [prev] + [Q_PREFIX + x if x else "" for x in node.input[1:]]
    m.output[:] = [tag + "acc"]
    nodes.append(m)
    prev = m.output[0]
    out = node.output[0]
    prev, out = _alone_arcq(node, q, producer, consumers, tag, src, x_q, prev, nodes)
    # output quantizer chain (rounding Add, Q, Clip, DQ)
    reference = node.output[0]  # the float model's name of the layer's output
    if layer.output_bits is not None:
        reference = layer.output_tensor
        i = 0
        while True:
            user = _users(consumers, out)[0]
            tensor = border_tensor(user)
            if tensor is not None:
                # copy the border's ops (a small DAG) with this branch's names
                rename = {out: prev}
                for b in q.graph.node:
                    if border_tensor(b) != tensor:
                        continue
                    m = onnx.NodeProto()
                    m.CopyFrom(b)
                    m.name = tag + b.name
                    m.input[:] = [rename.get(x, Q_PREFIX + x) for x in b.input]
                    m.output[:] = [tag + x for x in b.output]
                    rename[b.output[0]] = m.output[0]
                    nodes.append(m)
                out = border_value(tensor)
                prev = rename[out]
                continue
            m = onnx.NodeProto()
            m.CopyFrom(user)
            m.name = tag + user.name
            m.input[:] = [prev] + [Q_PREFIX + x for x in user.input[1:]]
            m.output[:] = [tag + f"out{i}"]
            nodes.append(m)
            prev, out, i = m.output[0], user.output[0], i + 1
            if user.op_type == "DequantizeLinear":
                break
    return nodes, inits, prev, reference


def _alone_arcq(node: onnx.NodeProto, q: onnx.ModelProto, producer, consumers, tag: str, src: str, x_q: str,
                acc: str, nodes: list) -> tuple[str, str]:
    """ARCQ's remainder terms of ``node`` in its layer-alone branch: the remainder convs read the branch's quantized
    input ``x_q``, the input remainder is taken from the float input ``src``, and the Adds sum them into ``acc``.
    Returns (the branch's sum, the QDQ graph's tensor it stands for); (acc, node's output) without ARCQ."""
    out, prev = node.output[0], acc
    add = _arcq_sum(consumers.get(out, []))
    if add is None:
        return prev, out
    rename = {node.input[0]: x_q, out: acc}

    def copy(n: onnx.NodeProto) -> None:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = tag + n.name
        m.input[:] = [rename.get(x, Q_PREFIX + x if x else "") for x in n.input]
        m.output[:] = [tag + x for x in n.output]
        rename[n.output[0]] = m.output[0]
        nodes.append(m)

    while True:
        for term in add.input:
            if term in rename:
                continue
            conv = producer[term]
            if conv.input[0] != node.input[0]:
                # the input remainder: [Clip ->] Sub(value, DQ) -> Q -> Clip -> DQ, from the float input
                chain, x = [], conv.input[0]
                while producer[x].op_type != "Sub":
                    chain.insert(0, producer[x])
                    x = producer[x].input[0]
                sub = producer[x]
                chain.insert(0, sub)
                first = producer.get(sub.input[0])
                if first is not None and first.op_type == "Clip" and _meta(first).get("ptqc.role") == "arcq":
                    chain.insert(0, first)
                    rename[first.input[0]] = src
                else:
                    rename[sub.input[0]] = src
                rename[sub.input[1]] = x_q
                for n in chain:
                    copy(n)
            copy(conv)
        copy(add)
        prev, out = rename[add.output[0]], add.output[0]
        add = _arcq_sum(consumers.get(out, []))
        if add is None:
            return prev, out


def build_analysis_model(fp: onnx.ModelProto, q: onnx.ModelProto, tensors: dict[str, TensorStats],
                         dqs: dict[str, onnx.NodeProto], layers: list[LayerStats]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]], dict[str, tuple[str, str]], tuple[str, str]]:
    """The combined float + QDQ + layer-alone graph.

    Returns the model, ``{tensor: (float output, quantized output)}``, ``{layer: (float reference, alone
    output)}`` and the (float, quantized) logits.
    """
    fp_names = {i.name for i in fp.graph.input} | {o for n in fp.graph.node for o in n.output}
    inputs = {i.name for i in fp.graph.input}
    producer = {o: n for n in q.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    q_nodes, q_inits = _prefixed(q, inputs)
    graph = onnx.GraphProto()
    graph.CopyFrom(fp.graph)
    graph.node.extend(q_nodes)
    graph.initializer.extend(q_inits)
    del graph.output[:]
    outputs: list[str] = []
    pairs: dict[str, tuple[str, str]] = {}
    for name in tensors:
        if name not in fp_names:
            raise PtqcError(f"the float model has no tensor {name!r}; was the quantized model compiled from it?")
        pairs[name] = (name, Q_PREFIX + dqs[name].output[0])
    alone: dict[str, tuple[str, str]] = {}
    for layer in layers:
        nodes, inits, out, ref = _alone_branch(layer, q, tensors, fp_names, producer, consumers)
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        if ref not in fp_names:
            raise PtqcError(f"the float model has no tensor {ref!r}; was the quantized model compiled from it?")
        alone[layer.name] = (ref, out)
    logits = (fp.graph.output[0].name, Q_PREFIX + q.graph.output[0].name)
    for name in dict.fromkeys([*(x for p in pairs.values() for x in p), *(x for p in alone.values() for x in p), *logits]):
        if name in inputs:
            continue
        outputs.append(name)
        graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    model = helper.make_model(graph, opset_imports=list(q.opset_import), ir_version=q.ir_version)
    return model, pairs, alone, logits


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------

class _Acc:
    """Streamed sums for one comparison."""

    __slots__ = ("n", "noise", "signal")

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.n = 0

    def add(self, ref: np.ndarray, other: np.ndarray) -> None:
        r = ref.astype(np.float64, copy=False)
        self.signal += float(np.dot(r.ravel(), r.ravel()))
        d = (r - other).ravel()
        self.noise += float(np.dot(d, d))
        self.n += r.size

    @property
    def db(self) -> float:
        return sqnr_db(self.signal, self.noise)


def quantizer_split(x: np.ndarray, t: TensorStats) -> tuple[float, float, int]:
    """(summed clipping error, summed rounding error, clipped count) of ``t``'s quantizer on float values ``x``."""
    s = 2.0**t.exp
    x = x.astype(np.float64, copy=False).ravel()
    lo, hi = t.range
    clipped = np.clip(x, lo, hi)
    q = np.clip(np.round(x / s), t.lo, t.hi) * s  # round half to even, like QuantizeLinear
    c = x - clipped
    r = clipped - q
    return float(np.dot(c, c)), float(np.dot(r, r)), int(np.count_nonzero(c))


def _parse_scale(text: str) -> float | tuple[float, ...]:
    values = tuple(float(x) for x in text.split(","))
    return values[0] if len(values) == 1 else values


def channel_factor(fp_scale: float | tuple[float, ...], ndim: int) -> float | np.ndarray:
    """``fp_scale`` shaped to multiply an (N, C, ...) tensor."""
    if isinstance(fp_scale, float):
        return fp_scale
    return np.asarray(fp_scale).reshape([1, -1] + [1] * (ndim - 2))


def measurement_data(calib, pre, samples: int, skip: int) -> tuple[Dataset, str]:
    """The data a report measures on: the ``samples`` after the first ``skip`` of ``calib`` when it has more
    than ``skip``, else its first ``samples``; and a description of which, for the page.

    ``skip`` is the number of samples the model was calibrated on.  GPTQ and the reconstruction passes fit
    the model to them, so there it looks better than on unseen data: MobileNetV2 w4a4, GPTQ and the blocks on
    128 images, agreed with FP32 on 84% of them and on 66% of the 744 after its 256 (docs/design.md).
    """
    from ptqc.data import open_dataset

    data = open_dataset(calib, pre, limit=skip + samples)
    if skip and len(data) > skip:
        rest = data.after(skip)
        return rest, f"{len(rest)} held-out samples (after the first {skip}, which the model was calibrated on)"
    data = open_dataset(calib, pre, limit=samples)
    if not skip:
        return data, f"the first {len(data)} samples"
    return data, (f"the first {len(data)} samples, with no more than the {skip} the model was calibrated on: if "
                  "they are those, the figures are better than on unseen data")


def analyse(model: str | onnx.ModelProto, quantized: str | onnx.ModelProto, data: Dataset, samples: int = 32,
            batch_size: int = 8, measured_on: str = "") -> Report:
    """Measure every quantized tensor and weighted layer of ``quantized`` against ``model`` on ``samples``
    inputs from ``data`` (described by ``measured_on``, for the page)."""
    from ptqc.loader import read_model

    q = read_model(quantized) if not isinstance(quantized, onnx.ModelProto) else quantized
    fp = prepare_float(model)
    tensors, dqs = read_quantizers(q)
    layers = read_layers(q, tensors)
    by_name = {layer.name: layer for layer in layers}
    combined, pairs, alone, logits = build_analysis_model(fp, q, tensors, dqs, layers)
    session = runtime.make_session(combined, arena=False, what="the report's analysis graph", fuse=False)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    acc = {name: _Acc() for name in tensors}
    quant = {name: _Acc() for name in tensors}
    split = {name: [0.0, 0.0, 0] for name in tensors}
    lay = {name: _Acc() for name in alone}
    logit_acc = _Acc()
    agree = seen = 0
    kept: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    rng = np.random.default_rng(0)
    limit = min(samples, len(data))
    if limit < 1:
        raise PtqcError("the report needs at least one sample")
    for batch in progress.batches(data.batches(batch_size), "report", total=limit):
        batch = batch[: limit - seen]
        if not len(batch):
            break
        outs = dict(zip(names, runtime.run(session, {input_name: batch}, names)))
        outs[input_name] = batch
        for name, (f, qn) in pairs.items():
            t = tensors[name]
            ref = outs[f].astype(np.float64) * channel_factor(t.fp_scale, outs[f].ndim)
            if not np.isfinite(ref).all():
                raise PtqcError(f"NaN or Inf in the float model's tensor {name} on the report data")
            acc[name].add(ref, outs[qn])
            c, r, k = quantizer_split(ref, t)
            split[name][0] += c
            split[name][1] += r
            split[name][2] += k
            quant[name].signal += float(np.dot(ref.ravel(), ref.ravel()))
            quant[name].noise += c + r
            quant[name].n += ref.size
            flat = ref.ravel()
            take = min(flat.size, max(1, SAMPLE_CAP // max(1, -(-limit // batch_size))))
            kept[name].append(flat[rng.choice(flat.size, take, replace=False)].astype(np.float32))
        for name, (ref_name, out) in alone.items():
            layer = by_name[name]
            scale = tensors[layer.output_tensor].fp_scale if layer.output_bits is not None else 1.0
            lay[name].add(outs[ref_name].astype(np.float64) * channel_factor(scale, outs[ref_name].ndim), outs[out])
        logit_acc.add(outs[logits[0]], outs[logits[1]])
        agree += int(np.sum(outs[logits[0]].reshape(len(batch), -1).argmax(1) == outs[logits[1]].reshape(len(batch), -1).argmax(1)))
        seen += len(batch)
        if seen >= limit:
            break
    for name, t in tensors.items():
        n = max(acc[name].n, 1)
        t.sqnr_db = acc[name].db
        t.quant_sqnr_db = quant[name].db
        t.clip_error, t.round_error = split[name][0] / n, split[name][1] / n
        t.clip_ratio = split[name][2] / n
        t.signal = acc[name].signal / n
    last_float = [layer for layer in layers if layer.output_bits is None][-1:]
    for layer in layers:
        layer.sqnr_alone_db = lay[layer.name].db
        if layer.output_bits is not None:
            layer.sqnr_db = tensors[layer.output_tensor].sqnr_db
        elif layer in last_float:
            layer.sqnr_db = logit_acc.db  # the logits layer: its output reaches the graph output unquantized
    settings = {p.key: p.value for p in q.metadata_props if p.key.startswith("ptqc.")}
    report = Report(
        model=model if isinstance(model, str) else (model.graph.name or "model"),
        quantized=quantized if isinstance(quantized, str) else (q.graph.name or "quantized model"),
        samples=seen, logit_snr_db=logit_acc.db, agreement=100.0 * agree / max(seen, 1), layers=layers,
        tensors=tensors, settings=settings,
        kept_float=[n.name for n in q.graph.node if any(p.key == "ptqc.keep_float" for p in n.metadata_props)],
        samples_of={k: np.concatenate(v) for k, v in kept.items() if v}, measured_on=measured_on)
    report.hints = hints(report)
    logger.info("report: %d layers, %d tensors, %d samples, logit SNR %.2f dB", len(layers), len(tensors), seen,
                report.logit_snr_db)
    return report


# ----------------------------------------------------------------------------------------------------------
# What to try
# ----------------------------------------------------------------------------------------------------------

def hints(report: Report) -> list[str]:
    """Short advice built from the numbers: which layers dominate the error, and what to do about each."""
    out: list[str] = []
    layers = [layer for layer in report.layers if math.isfinite(layer.sqnr_alone_db)]
    if not layers:
        return ["Every layer is exact on these samples: nothing to fix."]
    # where the accumulated error builds up fastest: early losses compound through the rest of the network
    steps = [(prev, cur) for prev, cur in zip(report.layers, report.layers[1:])
             if math.isfinite(prev.sqnr_db) and math.isfinite(cur.sqnr_db)]
    if steps:
        prev, cur = max(steps, key=lambda pc: pc[0].sqnr_db - pc[1].sqnr_db)
        if prev.sqnr_db - cur.sqnr_db > 3.0:
            out.append(f"The accumulated SQNR falls fastest at {cur.name}: {prev.sqnr_db:.1f} -> {cur.sqnr_db:.1f} dB; "
                       f"try it at 8 bits first (--bits {cur.name}=8).")
    # noise-to-signal of each layer alone; their sum approximates the total when errors are independent
    nsr = {layer.name: 10.0 ** (-layer.sqnr_alone_db / 10.0) for layer in layers}
    total = sum(nsr.values())
    ranked = sorted(layers, key=lambda layer: nsr[layer.name], reverse=True)
    low = [layer for layer in ranked if layer.weight_bits < 7 or layer.input_bits < 8]
    for layer in low[:3]:
        share = 100.0 * nsr[layer.name] / total
        if share < 5.0:
            break
        out.append(f"Layer {layer.name} ({layer.op}, w{layer.weight_bits}a{layer.input_bits}) alone gives "
                   f"{share:.0f}% of the summed layer noise (SQNR {layer.sqnr_alone_db:.1f} dB): keep it at 8 bits "
                   f"with --bits {layer.name}=8.")
    for layer in ranked[:8]:
        t_in = report.tensors[layer.input_tensor]
        if t_in.bits >= 8 or t_in.clip_error + t_in.round_error == 0:
            continue
        if t_in.clip_error > t_in.round_error and t_in.clip_ratio > 0.001:
            out.append(f"The input of {layer.name} ({t_in.name}) loses more to clipping than to rounding "
                       f"({100 * t_in.clip_ratio:.2f}% of values clipped): try --act-calib max, or an 8-bit input "
                       f"with --bits {layer.name}=w{layer.weight_bits}a8.")
        elif t_in.round_error > 4 * t_in.clip_error:
            out.append(f"The input of {layer.name} ({t_in.name}) is limited by its {t_in.bits}-bit grid (rounding "
                       f"error {t_in.round_error / max(t_in.clip_error + t_in.round_error, 1e-30):.0%} of its "
                       f"quantizer's error): --bits {layer.name}=w{layer.weight_bits}a8 raises only that input.")
    if report.logit_snr_db < 10.0:
        out.append(f"Logit SNR is {report.logit_snr_db:.1f} dB: `ptqc compile --max-drop 1.0` raises layers to 8 bits "
                   f"in this report's order until the held-out drop fits; `ptqc sensitivity` ranks them by their "
                   f"effect on the logits (slower, one compile per layer).")
    if not out:
        out.append("No single layer dominates the error; the loss is spread across the network.")
    return out
