"""Read a QDQ model back and check the integer claim: every scale 2^e, every requantization a shift.

This works on the written ONNX file alone (no ptqc metadata is trusted for the verdict):

* every QuantizeLinear / DequantizeLinear scale must be an exact power of two;
* weights behind a DequantizeLinear must be integers inside their declared bit range;
* a layer's bias scale must equal input scale x weight scale (the accumulator scale);
* each integer op's requantization ``s_in * s_w / s_out`` (or ``s_in / s_out``) must be ``2^k``;
* GlobalAveragePool/AveragePool divide by the window area: a shift only when that area is a power of two;
* a float op between a DequantizeLinear and a QuantizeLinear is a float island: not a shift;
* ops a ptqc file tags as an AQuant rounding border are accepted as declared extra ops only if they are the
  border's exact op chain (``ptqc.borders``), scale by the QuantizeLinear's own 2^e and end in it;
* ops tagged as ARCQ's remainder compensation (``ptqc.role = arcq``) are accepted as declared extra ops only if
  each remainder Conv reads integer codes behind power-of-two DequantizeLinears and sums, through tagged Adds
  only, into a layer's output quantizer, and each input remainder is a tensor's float value (through its fused
  Clip) minus that tensor's own dequantized codes, quantized on a grid finer by a power of two.  Their MACs are
  counted (``Report.extra_macs``, against ``Report.macs`` of the model's own layers, per sample).

Float ops after the last quantized layer that only lead to graph outputs (the logits) are allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ptqc.borders import border_chain, border_tensor
from ptqc.quant import bad_weight_codes, exponent_of, is_pow2, parse_offsets

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SAME_SCALE = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Pad", "Dropout",
               "Concat", "Relu", "Clip")
_SHIFT_OPS = ("Add", "ReduceSum", "Sub") + _SAME_SCALE
_POOL = ("GlobalAveragePool", "AveragePool")
_LAYERS = ("Conv", "Gemm", "MatMul")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclasses.dataclass
class Row:
    name: str
    op: str
    w_bits: str = ""
    a_bits: str = ""
    e_in: str = ""
    e_w: str = ""
    e_out: str = ""
    shift: str = ""
    note: str = ""


@dataclasses.dataclass
class Report:
    rows: list[Row]
    problems: list[str]
    non_shift: list[str]
    float_ops: list[str]
    extra_ops: dict[str, int]
    #: multiply-accumulates per sample of the model's layers, and of ARCQ's remainder convolutions (None when a
    #: shape is unknown)
    macs: int | None = None
    extra_macs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.non_shift and not self.float_ops

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "non_shift_steps": self.non_shift,
            "float_ops": self.float_ops,
            "extra_ops": self.extra_ops,
            "macs": self.macs,
            "extra_macs": self.extra_macs,
            "layers": [dataclasses.asdict(r) for r in self.rows],
        }


def _rng(values) -> str:
    arr = np.asarray(values).reshape(-1)
    if arr.size == 0:
        return ""
    lo, hi = int(arr.min()), int(arr.max())
    return str(lo) if lo == hi else f"{lo}..{hi}"


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}
        self.nodes = list(g.node)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            inferred = model
        ig = inferred.graph
        self.types = {vi.name: vi.type.tensor_type.elem_type for vi in (*ig.value_info, *ig.input, *ig.output)}
        self.types.update({i.name: i.data_type for i in g.initializer})
        self.value_info = {vi.name: vi for vi in ig.value_info}
        self._arrays: dict[str, np.ndarray] = {}
        # AQuant rounding borders: ops between a tensor and its QuantizeLinear, tagged by the writer
        self.border_tensor = {n.name: t for n in g.node if (t := border_tensor(n)) is not None}
        # ARCQ's remainder compensation: ops tagged by the writer, each naming the layer it belongs to
        self.arcq = {n.name: m.get("ptqc.layer", "") for n in g.node
                     if (m := {p.key: p.value for p in n.metadata_props}).get("ptqc.role") == "arcq"}
        self.border_q = {}
        for n in g.node:
            p = self.producer.get(n.input[0]) if n.op_type == "QuantizeLinear" and n.input else None
            if p is not None and p.name in self.border_tensor:
                self.border_q[self.border_tensor[p.name]] = n

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            p = self.producer.get(name)
            if p is not None and p.op_type == "Constant":
                return numpy_helper.to_array(p.attribute[0].t)
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def dq_of(self, name: str) -> onnx.NodeProto | None:
        p = self.producer.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def is_rounding_add(self, n: onnx.NodeProto) -> bool:
        """An Add of a constant whose only reader is a QuantizeLinear: the half-up rounding offset."""
        if n.op_type != "Add" or len(n.input) != 2 or not any(self.array(i) is not None for i in n.input):
            return False
        users = self.consumers.get(n.output[0], [])
        return len(users) == 1 and users[0].op_type == "QuantizeLinear"

    def arcq_sum(self, name: str) -> str:
        """The end of the chain of ARCQ Adds that ``name`` (an accumulator) flows into, or ``name`` itself."""
        users = self.consumers.get(name, [])
        while len(users) == 1 and users[0].op_type == "Add" and users[0].name in self.arcq:
            name = users[0].output[0]
            users = self.consumers.get(name, [])
        return name

    def q_after(self, name: str) -> onnx.NodeProto | None:
        name = self.arcq_sum(name)
        users = self.consumers.get(name, [])
        for c in users:
            if c.name in self.border_tensor:
                return self.border_q.get(self.border_tensor[c.name])
        rounding = [u for u in users if self.is_rounding_add(u)]
        if len(rounding) == 1 and all(u is rounding[0] or u.name in self.arcq for u in users):
            name = rounding[0].output[0]  # a tensor's input remainder may read it beside its half-up offset
        for c in self.consumers.get(name, []):
            if c.op_type == "QuantizeLinear":
                return c
        return None

    def leads_only_to_outputs(self, name: str, seen=None) -> bool:
        """True when ``name`` reaches only graph outputs, through float ops with no quantization."""
        if name in self.outputs and not self.consumers.get(name):
            return True
        seen = seen if seen is not None else set()
        for c in self.consumers.get(name, []):
            if c.op_type in _QDQ or c.op_type in _LAYERS:
                return False
            if c.name in seen:
                continue
            seen.add(c.name)
            if not all(self.leads_only_to_outputs(o, seen) for o in c.output):
                return False
        return True


def _code_bits(g: _Graph, dq: onnx.NodeProto) -> tuple[int, int, int]:
    """(bits, lo, hi) of the integer codes a DequantizeLinear reads, zero point removed."""
    zp_arr = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.array(0, np.uint8)
    zp = int(np.asarray(zp_arr).reshape(-1)[0])
    src = g.producer.get(dq.input[0])
    info = {
        onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
        onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT4: (-8, 7),
        onnx.TensorProto.UINT2: (0, 3), onnx.TensorProto.INT2: (-2, 1),
        onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535),
    }
    dtype = onnx.TensorProto.UINT8
    if len(dq.input) > 2 and dq.input[2] in g.inits:
        dtype = g.inits[dq.input[2]].data_type
    lo, hi = info.get(dtype, (0, 255))
    if src is not None and src.op_type == "Clip" and len(src.input) >= 3:
        clo, chi = g.array(src.input[1]), g.array(src.input[2])
        if clo is not None:
            lo = max(lo, int(clo))
        if chi is not None:
            hi = min(hi, int(chi))
    lo, hi = lo - zp, hi - zp
    span = max(hi, -lo - 1, 0) if lo < 0 else hi
    bits = (max(int(span).bit_length(), 1) + (1 if lo < 0 else 0)) if span > 0 else 1
    return bits, lo, hi


_BORDER_CHAIN = border_chain()


def _border_wired(ops: list[onnx.NodeProto]) -> bool:
    """The tagged ops read each other's outputs as ``ptqc.borders``' chain does (an Add in either order)."""
    index = {n.output[0]: i for i, n in enumerate(ops)}
    for n, (op_type, refs) in zip(ops, _BORDER_CHAIN):
        got = [index.get(x) for x in n.input]
        if op_type == "Add":
            got, refs = sorted(got, key=str), sorted(refs, key=str)
        if got != refs:
            return False
    return True


def _border_problems(g: _Graph) -> list[str]:
    """Why the ops tagged as rounding borders are not ``ptqc.borders``' chain (empty when every one is): the op
    sequence, its data flow (the code is an integer level plus a 0/1 comparison), and the value scaled by the
    QuantizeLinear's own power-of-two scale, its inverse first."""
    problems = []
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.nodes:
        if n.name in g.border_tensor:
            groups[g.border_tensor[n.name]].append(n)
    for tensor, ops in groups.items():
        q = g.border_q.get(tensor)
        if [n.op_type for n in ops] != [t for t, _ in _BORDER_CHAIN] or q is None or q.input[0] != ops[-1].output[0]:
            problems.append(f"{tensor}: ops tagged as a rounding border are not the border's op chain")
            continue
        scale, inv, s_out = g.array(q.input[1]), g.array(ops[0].input[1]), g.array(ops[-1].input[1])
        if not _border_wired(ops) or scale is None or inv is None or s_out is None or not is_pow2(scale) \
                or float(s_out) != float(scale) or float(inv) * float(scale) != 1.0:
            problems.append(f"{tensor}: rounding border does not put the value on its QuantizeLinear's 2^e grid")
    return problems


def inspect_model(model: onnx.ModelProto) -> Report:
    g = _Graph(model)
    problems: list[str] = []
    non_shift: list[str] = []
    float_ops: list[str] = []
    rows: list[Row] = []
    extra: dict[str, int] = defaultdict(int)

    # 1. every Q/DQ scale is a power of two
    scale_exp: dict[str, np.ndarray] = {}
    for n in g.nodes:
        if n.op_type not in _QDQ:
            continue
        scale = g.array(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: scale {n.input[1]} is not a constant")
            continue
        if not is_pow2(scale):
            bad = np.asarray(scale, np.float64).reshape(-1)
            problems.append(f"{n.name}: scale is not a power of two ({bad[0]:.9g}{'...' if bad.size > 1 else ''})")
            continue
        scale_exp[n.output[0]] = exponent_of(scale)

    def act_exp(name: str) -> tuple[int | None, int | None]:
        """(exponent, bits) of a quantized activation read through its DequantizeLinear."""
        dq = g.dq_of(name)
        if dq is None or dq.input[0] in g.inits or name not in scale_exp:
            return None, None
        bits, _, _ = _code_bits(g, dq)
        return int(scale_exp[name].reshape(-1)[0]), bits

    def out_exp(name: str) -> tuple[int | None, int | None]:
        q = g.q_after(name)
        if q is None or q.output[0] not in scale_exp:
            return None, None
        dq = next((c for c in g.consumers[q.output[0]] if c.op_type == "DequantizeLinear"), None)
        if dq is None:
            clip = next((c for c in g.consumers[q.output[0]] if c.op_type == "Clip"), None)
            dq = next((c for c in g.consumers[clip.output[0]] if c.op_type == "DequantizeLinear"), None) if clip else None
        bits = _code_bits(g, dq)[0] if dq is not None else None
        return int(scale_exp[q.output[0]].reshape(-1)[0]), bits

    for n in g.nodes:
        if n.op_type in _QDQ:
            if n.name in g.arcq and n.input[0] not in g.inits:
                extra[f"{n.op_type} (ARCQ remainder compensation)"] += 1
            continue
        if n.op_type == "Clip" and g.producer.get(n.input[0]) is not None and g.producer[n.input[0]].op_type == "QuantizeLinear":
            extra["Clip (integer saturation)"] += 1
            continue
        if g.is_rounding_add(n):
            extra["Add (half-up rounding offset)"] += 1
            continue
        if n.name in g.border_tensor:
            extra[f"{n.op_type} (AQuant rounding border)"] += 1
            continue
        if n.name in g.arcq:
            extra[f"{n.op_type} (ARCQ remainder compensation)"] += 1
            continue
        float_in = [i for i in n.input if i and g.array(i) is None and _is_float(model, g, i)]
        if not float_in or n.op_type in ("Shape", "Size"):
            continue  # shape arithmetic: no float data flows through
        if n.op_type in _LAYERS:
            rows.append(_layer_row(g, n, scale_exp, act_exp, out_exp, problems, non_shift))
            continue
        ins = [act_exp(i) for i in float_in]
        oe, ob = out_exp(n.output[0])
        quantized_in = all(e is not None for e, _ in ins)
        if not quantized_in:
            if all(g.leads_only_to_outputs(o) for o in n.output) and any(g.dq_of(i) is None for i in float_in):
                rows.append(Row(n.name, n.op_type, note="float tail (to graph output)"))
                continue
            float_ops.append(f"{n.name} ({n.op_type}): float op between DQ and Q")
            rows.append(Row(n.name, n.op_type, note="FLOAT: not quantized"))
            continue
        row = Row(n.name, n.op_type, a_bits="/".join(str(b) for _, b in ins) + (f"->{ob}" if ob else ""),
                  e_in=",".join(str(e) for e, _ in ins), e_out="" if oe is None else str(oe))
        if oe is None:
            if all(g.leads_only_to_outputs(o) for o in n.output):
                row.note = "float output (to graph output)"
            else:
                float_ops.append(f"{n.name} ({n.op_type}): output is not requantized")
                row.note = "FLOAT output"
            rows.append(row)
            continue
        if n.op_type in _POOL:
            area = _pool_area(model, g, n)
            mult = None if area is None else 2.0 ** (ins[0][0] - oe) / area
            if mult is None or not is_pow2(mult):
                non_shift.append(f"{n.name} ({n.op_type}): divides by {area or '?'}, not a power of two")
                row.note = f"NOT A SHIFT: divide by {area}"
            else:
                row.shift = str(int(math.log2(mult)))
        elif n.op_type in _SHIFT_OPS:
            row.shift = ",".join(str(e - oe) for e, _ in ins)
            if n.op_type in _SAME_SCALE and n.op_type not in ("Relu", "Clip") and any(e != oe for e, _ in ins):
                row.note = "shift (scales differ)"
        else:
            float_ops.append(f"{n.name} ({n.op_type}): no integer semantics in ptqc")
            row.note = "FLOAT op"
        rows.append(row)
    problems += _border_problems(g)
    problems += _arcq_problems(g, scale_exp)
    macs, extra_macs = _macs(g)
    for row in rows:
        if row.name in g.arcq.values():
            row.note = (row.note + "; " if row.note else "") + "ARCQ remainder convs"
    return Report(rows, problems, non_shift, float_ops, dict(extra), macs, extra_macs)


def _layer_macs(g: _Graph, n: onnx.NodeProto) -> int | None:
    """Multiply-accumulates per sample of a Conv/Gemm/MatMul (None when its weight or output shape is unknown)."""
    w_name = n.input[1] if len(n.input) > 1 else ""
    dq = g.dq_of(w_name)
    w = g.array(dq.input[0] if dq is not None else w_name)
    if w is None:
        return None
    if n.op_type == "Conv":
        vi = g.value_info.get(n.output[0])
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim] if vi is not None else []
        if len(dims) < 3 or not all(dims[1:]):
            return None
        return int(np.prod(dims[1:])) * int(np.prod(w.shape[1:]))
    return int(np.prod(w.shape))


def _macs(g: _Graph) -> tuple[int | None, int]:
    """(MACs of the model's own layers, MACs of ARCQ's remainder convolutions), per sample."""
    total, extra = 0, 0
    for n in g.nodes:
        if n.op_type not in _LAYERS or not n.input or g.dq_of(n.input[0]) is None and n.name not in g.arcq:
            continue
        m = _layer_macs(g, n)
        if n.name in g.arcq:
            extra += m or 0
        elif m is None:
            total = None
        elif total is not None:
            total += m
    return total, extra


def _q_source(g: _Graph, dq: onnx.NodeProto) -> str | None:
    """The float tensor whose QuantizeLinear (through a saturating Clip) a DequantizeLinear reads the codes of, before
    any half-up offset or rounding border: the value an input remainder is taken from."""
    p = g.producer.get(dq.input[0])
    if p is not None and p.op_type == "Clip":
        p = g.producer.get(p.input[0])
    if p is None or p.op_type != "QuantizeLinear":
        return None
    src = g.producer.get(p.input[0])
    if src is not None and g.is_rounding_add(src):
        return next((i for i in src.input if g.array(i) is None), None)
    if src is not None and src.name in g.border_tensor:
        first = next(n for n in g.nodes if g.border_tensor.get(n.name) == g.border_tensor[src.name])
        return first.input[0]
    return p.input[0]


def _arcq_problems(g: _Graph, scale_exp: dict[str, np.ndarray]) -> list[str]:
    """Why the ops tagged as ARCQ's remainder compensation do not keep the layer integer (empty when they do)."""
    problems = []
    for n in g.nodes:
        if n.name not in g.arcq:
            continue
        what = f"{n.name} (ARCQ {n.op_type})"
        if n.op_type == "Conv":
            x_dq, w_dq = g.dq_of(n.input[0]), g.dq_of(n.input[1]) if len(n.input) > 1 else None
            if x_dq is None or x_dq.input[0] in g.inits or n.input[0] not in scale_exp:
                problems.append(f"{what}: its input is not integer codes behind a power-of-two DequantizeLinear")
            if w_dq is None or w_dq.input[0] not in g.inits or n.input[1] not in scale_exp:
                problems.append(f"{what}: its weights are not integers behind a power-of-two DequantizeLinear")
            elif w_dq.name in g.arcq:
                bits = next((int(p.value) for p in w_dq.metadata_props if p.key == "ptqc.bits"), 8)
                codes = g.array(w_dq.input[0])
                axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
                if not np.issubdtype(codes.dtype, np.integer) or bad_weight_codes(codes, bits, None, axis).any():
                    problems.append(f"{what}: remainder weight codes exceed the declared {bits}-bit range")
            if len(n.input) > 2 and n.input[2]:
                problems.append(f"{what}: a remainder convolution has no bias")
            if g.q_after(n.output[0]) is None or g.arcq_sum(n.output[0]) == n.output[0]:
                problems.append(f"{what}: does not sum into a layer's output quantizer through ARCQ Adds")
        elif n.op_type == "Add":
            for i in n.input:
                p = g.producer.get(i)
                if p is None or p.op_type not in ("Conv", "Add") or (p.op_type == "Add" and p.name not in g.arcq):
                    problems.append(f"{what}: sums something other than convolution accumulators")
        elif n.op_type == "Sub":
            dq = g.dq_of(n.input[1])
            src = g.producer.get(n.input[0])
            value = src.input[0] if src is not None and src.name in g.arcq and src.op_type == "Clip" else n.input[0]
            users = g.consumers.get(n.output[0], [])
            q = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
            if dq is None or _q_source(g, dq) != value:
                problems.append(f"{what}: is not a tensor's value minus its own dequantized codes")
            elif q is None or q.output[0] not in scale_exp or n.input[1] not in scale_exp \
                    or int(scale_exp[q.output[0]].reshape(-1)[0]) >= int(scale_exp[n.input[1]].reshape(-1)[0]):
                problems.append(f"{what}: the remainder is not quantized on a finer power-of-two grid")
        elif n.op_type not in _QDQ and n.op_type != "Clip":
            problems.append(f"{what}: not an op of the remainder compensation")
    return problems


def _is_float(model, g: _Graph, name: str) -> bool:
    """Whether a tensor holds float data (shape arithmetic on int64 does not count)."""
    elem = g.types.get(name)
    if elem is not None:
        return elem in _FLOAT_TYPES
    p = g.producer.get(name)
    return p is None or p.op_type not in ("Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Concat", "Size")


def _pool_area(model, g: _Graph, n: onnx.NodeProto) -> int | None:
    if n.op_type == "AveragePool":
        ks = next((list(a.ints) for a in n.attribute if a.name == "kernel_shape"), None)
        return int(np.prod(ks)) if ks else None
    vi = g.value_info.get(n.input[0])
    if vi is not None:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if len(dims) == 4 and all(dims[2:]):
            return dims[2] * dims[3]
    return None


def _layer_row(g, n, scale_exp, act_exp, out_exp, problems, non_shift) -> Row:
    e_in, a_in = act_exp(n.input[0])
    wdq = g.dq_of(n.input[1]) if len(n.input) > 1 else None
    row = Row(n.name, n.op_type)
    if any(p.key == "ptqc.keep_float" for p in n.metadata_props):
        non_shift.append(f"{n.name} ({n.op_type}): kept float on request (--keep-float)")
        row.note = "FLOAT layer (kept float on request)"
        return row
    if e_in is None or wdq is None or wdq.input[0] not in g.inits or n.input[1] not in scale_exp:
        if g.dq_of(n.input[0]) is None:
            problems.append(f"{n.name} ({n.op_type}): input is not quantized")
            row.note = "FLOAT layer"
        else:
            problems.append(f"{n.name} ({n.op_type}): weights are not integers behind a DequantizeLinear")
            row.note = "FLOAT weights"
        return row
    wq = g.array(wdq.input[0])
    bits_decl = offsets = None
    for p in wdq.metadata_props:
        if p.key == "ptqc.bits":
            bits_decl = int(p.value)
        elif p.key == "ptqc.offset":
            offsets = parse_offsets(p.value)
    if not np.issubdtype(wq.dtype, np.integer):
        problems.append(f"{n.name}: weights are not stored as integers")
    w_bits = bits_decl or 8
    axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
    if offsets is not None and (offsets.size != wq.shape[axis] or np.any(np.mod(offsets * 2, 1) != 0)):
        problems.append(f"{n.name}: weight grid offsets are not one multiple of 1/2 per output channel")
    elif wq.size and bad_weight_codes(wq, w_bits, offsets, axis).any():
        problems.append(f"{n.name}: weight codes {int(wq.min())}..{int(wq.max())} "
                        + (f"are off the declared {w_bits}-bit grids of their channels' offsets" if offsets is not None
                           else f"exceed the declared {w_bits}-bit range"))
    e_w = scale_exp[n.input[1]].reshape(-1)
    # "+zp": some channel's grid has an offset (a weight zero point; docs/design.md)
    row.w_bits, row.e_in, row.e_w = f"{w_bits}{'+zp' if offsets is not None else ''}", str(e_in), _rng(e_w)
    # bias at the accumulator scale
    if len(n.input) > 2 and n.input[2]:
        bdq = g.dq_of(n.input[2])
        if bdq is None or n.input[2] not in scale_exp:
            problems.append(f"{n.name}: bias is not an int32 behind a DequantizeLinear")
        else:
            e_b = scale_exp[n.input[2]].reshape(-1)
            if e_b.size != e_w.size and e_b.size != 1 or np.any(e_b != e_in + e_w):
                problems.append(f"{n.name}: bias scale is not input scale x weight scale")
    oe, ob = out_exp(n.output[0])
    row.a_bits = f"{a_in}" + (f"->{ob}" if ob else "->float")
    if oe is None:
        if g.leads_only_to_outputs(n.output[0]):
            row.note = "float output (logits)"
        else:
            non_shift.append(f"{n.name} ({n.op_type}): output is not requantized")
            row.note = "NOT REQUANTIZED"
        return row
    row.e_out = str(oe)
    row.shift = _rng(e_in + e_w - oe)
    return row


def format_table(report: Report) -> str:
    headers = ["layer", "op", "w", "a in->out", "e_in", "e_w", "e_out", "shift", "note"]
    data = [[r.name, r.op, r.w_bits, r.a_bits, r.e_in, r.e_w, r.e_out, r.shift, r.note] for r in report.rows]
    widths = [max(len(h), *(len(str(d[i])) for d in data)) if data else len(h) for i, h in enumerate(headers)]
    widths[0] = min(widths[0], 48)
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    for d in data:
        name = d[0] if len(d[0]) <= 48 else "..." + d[0][-45:]
        lines.append("  ".join(str(x).ljust(w) for x, w in zip([name, *d[1:]], widths)).rstrip())
    if any(r.w_bits.endswith("+zp") for r in report.rows):
        lines.append("w +zp: per-channel weight grid offsets (zero points of 0, 1/2, 1 or -1/2 steps; docs/integer.md)")
    return "\n".join(lines)
