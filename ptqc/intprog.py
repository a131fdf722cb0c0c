"""Lower a ptqc QDQ model to an integer program: integer weights, int32 biases and shift amounts, no float scale.

The program is what shift-only hardware runs, and what ``ptqc export-int`` writes and ``ptqc verify`` executes.
It is read from the ONNX graph alone: every scale must be an exact power of two (its exponent is kept, the
float is not), weights must be integers inside their declared bit width, and a bias must sit at the
accumulator scale.  Anything else is a :class:`LoweringError` that names the node.

A quantized tensor is held as signed integer *codes* (the uint8 container's zero point removed) with an
exponent ``e`` (value = code * 2^e) and a code range ``[lo, hi]`` (the saturation the graph applies).

Every step that changes scale ends in a requantization ``out = saturate(acc * 2^k, lo, hi)``: a left shift
for ``k >= 0``, and for ``k < 0`` an arithmetic right shift by ``-k`` with the program's rounding rule
(``half-even`` as onnxruntime's QuantizeLinear rounds, or ``half-up``: add ``2^(-k-1)``, then shift).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ptqc.borders import border_tensor
from ptqc.errors import PtqcError
from ptqc.quant import bad_weight_codes, exponent_of, int_range, is_pow2, parse_offsets

FORMAT = "ptqc-int/1"
ROUNDING = ("half-even", "half-up")
#: ops that only move codes around (their output scale is the input's; a requant follows if not)
MOVE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Pad", "MaxPool")
#: int64 shape arithmetic (e.g. a Reshape to [N, -1] computed from Shape)
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity")
#: float ops allowed after the last (float-output) layer, on the way to a graph output
TAIL_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Softmax")
_CONTAINERS = {
    onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
}


class LoweringError(PtqcError):
    """The QDQ graph breaks the integer claim somewhere; the message names the node."""


@dataclasses.dataclass
class QTensor:
    """A quantized tensor: codes in [lo, hi] at scale 2^exp; ``onnx_name`` holds its uint8 codes in the graph."""

    name: str
    exp: int
    lo: int
    hi: int
    zero_point: int
    onnx_name: str

    @property
    def bits(self) -> int:
        span = max(self.hi, -self.lo - 1, 0) if self.lo < 0 else self.hi
        return max(int(span).bit_length(), 1) + (1 if self.lo < 0 else 0)


@dataclasses.dataclass
class Step:
    """One integer (or shape, or float-tail) operation.

    ``inputs`` name tensors of the program; ``consts`` name arrays (int weights, int32 bias, per-channel
    shifts, constant shape operands) stored with the program.  ``requant`` is ``{"shift": k | array key,
    "lo": int, "hi": int}`` for steps that write codes, ``dequant`` is ``{"exp": array key}`` for a layer whose
    accumulator leaves as float (the logits).
    """

    op: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict = dataclasses.field(default_factory=dict)
    consts: dict[str, str] = dataclasses.field(default_factory=dict)
    requant: dict | None = None
    dequant: dict | None = None
    kind: str = "codes"  # codes | shape | float


@dataclasses.dataclass
class Program:
    rounding: str
    inputs: list[QTensor]
    #: graph input (float) -> the quantized tensor its QuantizeLinear makes
    input_quant: dict[str, str]
    outputs: list[str]
    tensors: dict[str, QTensor]
    steps: list[Step]
    arrays: dict[str, np.ndarray]

    # ------------------------------------------------------------------ export / import (npz + JSON)
    def save(self, folder: str) -> None:
        """Write ``program.json`` (the manifest: tensors, steps, shifts, bit widths) and ``arrays.npz``
        (integer weights, int32 biases, per-channel shifts)."""
        os.makedirs(folder, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "rounding": self.rounding,
            "graph_inputs": [{"name": k, "quantized_as": v} for k, v in self.input_quant.items()],
            "graph_outputs": self.outputs,
            "tensors": {k: {**dataclasses.asdict(t), "bits": t.bits} for k, t in self.tensors.items()},
            "steps": [dataclasses.asdict(s) for s in self.steps],
        }
        tmp_json, tmp_npz = os.path.join(folder, ".program.json.tmp"), os.path.join(folder, ".arrays.tmp.npz")
        with open(tmp_json, "w") as f:
            json.dump(manifest, f, indent=1)
        np.savez(tmp_npz, **self.arrays)
        os.replace(tmp_npz, os.path.join(folder, "arrays.npz"))
        os.replace(tmp_json, os.path.join(folder, "program.json"))

    @classmethod
    def load(cls, folder: str) -> Program:
        path = os.path.join(folder, "program.json")
        try:
            with open(path) as f:
                manifest = json.load(f)
            with np.load(os.path.join(folder, "arrays.npz")) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise PtqcError(f"cannot read the integer export in {folder}: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise PtqcError(f"{path} is not a {FORMAT} export")
        fields = {f.name for f in dataclasses.fields(QTensor)}
        tensors = {k: QTensor(**{f: v[f] for f in fields}) for k, v in manifest["tensors"].items()}
        steps = [Step(**s) for s in manifest["steps"]]
        inputs = [tensors[i["quantized_as"]] for i in manifest["graph_inputs"]]
        return cls(manifest["rounding"], inputs, {i["name"]: i["quantized_as"] for i in manifest["graph_inputs"]},
                   manifest["graph_outputs"], tensors, steps, arrays)


# ---------------------------------------------------------------------------------------------- lowering
class _Lowering:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        for n in g.node:
            if n.op_type == "Constant":
                self.inits[n.output[0]] = n.attribute[0].t
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits]
        self.graph_outputs = [o.name for o in g.output]
        self.tensors: dict[str, QTensor] = {}
        self.dq_to_tensor: dict[str, str] = {}  # DequantizeLinear output -> program tensor
        self.kinds: dict[str, str] = {}  # program value -> codes | shape | float
        self.steps: list[Step] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.done: set[int] = set()
        self.input_quant: dict[str, str] = {}
        meta = {p.key: p.value for p in model.metadata_props}
        self.rounding = meta.get("ptqc.rounding", meta.get("ptqc.config.rounding", "half-even"))
        if self.rounding not in ROUNDING:
            raise LoweringError(f"unknown rounding rule {self.rounding!r} in the model's metadata")
        border = next((n for n in g.node if border_tensor(n) is not None), None)
        if border is not None:
            raise LoweringError(f"{border.name}: AQuant rounding borders (--act-borders) are not in the integer program "
                                f"yet; compile without --act-borders to export or verify")
        arcq = next((n for n in g.node if any(p.key == "ptqc.role" and p.value == "arcq" for p in n.metadata_props)), None)
        if arcq is not None:
            raise LoweringError(f"{arcq.name}: ARCQ remainder compensation (--arcq) is not in the integer program yet; "
                                f"compile without --arcq to export or verify")

    # ---------------------------------------------------------------- helpers
    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def add_array(self, key: str, arr: np.ndarray) -> str:
        base, i = key, 1
        while key in self.arrays:
            i += 1
            key = f"{base}_{i}"
        self.arrays[key] = np.asarray(arr)
        return key

    def pow2_exp(self, node: onnx.NodeProto, scale_name: str) -> np.ndarray:
        scale = self.const(scale_name)
        if scale is None:
            raise LoweringError(f"{node.name}: scale {scale_name} is not a constant")
        if not is_pow2(scale):
            bad = np.asarray(scale, np.float64).reshape(-1)
            raise LoweringError(f"{node.name}: scale {bad[0]:.9g} is not a power of two")
        return exponent_of(scale)

    def zero_point(self, node: onnx.NodeProto) -> tuple[int, int]:
        """(zero point, container dtype) of a Q/DQ node."""
        if len(node.input) > 2 and node.input[2]:
            t = self.inits.get(node.input[2])
            if t is None:
                raise LoweringError(f"{node.name}: zero point is not a constant")
            zp = numpy_helper.to_array(t).reshape(-1)
            if zp.size and np.any(zp != zp[0]):
                raise LoweringError(f"{node.name}: per-channel activation zero points are not supported")
            return int(zp[0]) if zp.size else 0, t.data_type
        return 0, onnx.TensorProto.UINT8

    def mark(self, *nodes: onnx.NodeProto) -> None:
        for n in nodes:
            self.done.add(id(n))

    def requant_chain(self, y: str) -> tuple[QTensor, list[onnx.NodeProto], np.ndarray | None] | None:
        """Follow ``y -> [Add(const)] -> QuantizeLinear -> [Clip] -> DequantizeLinear``: the tensor it makes,
        the nodes consumed, and the rounding offset the Add carries (None without one)."""
        source = y
        users = self.consumers.get(y, [])
        offset = None
        chain: list[onnx.NodeProto] = []
        if len(users) == 1 and users[0].op_type == "Add" and y not in self.graph_outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == y else add.input[0]
            if self.const(other) is not None:
                offset = self.const(other)
                chain.append(add)
                y = add.output[0]
                users = self.consumers.get(y, [])
        qs = [u for u in users if u.op_type == "QuantizeLinear"]
        if not qs:
            return None
        if len(users) != 1:
            raise LoweringError(f"{qs[0].name}: the tensor it quantizes is also read in float")
        q = qs[0]
        chain.append(q)
        exp = int(self.pow2_exp(q, q.input[1]).reshape(-1)[0])
        zp, dtype = self.zero_point(q)
        if dtype not in _CONTAINERS:
            raise LoweringError(f"{q.name}: container type {onnx.TensorProto.DataType.Name(dtype)} is not supported")
        lo, hi = _CONTAINERS[dtype]
        codes = q.output[0]
        after = self.consumers.get(codes, [])
        clips = [c for c in after if c.op_type == "Clip"]
        if clips:
            clip = clips[0]
            clo = self.const(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
            chi = self.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
            if (len(clip.input) > 1 and clip.input[1] and clo is None) or (len(clip.input) > 2 and clip.input[2] and chi is None):
                raise LoweringError(f"{clip.name}: integer saturation bounds are not constants")
            lo = max(lo, int(clo)) if clo is not None else lo
            hi = min(hi, int(chi)) if chi is not None else hi
            chain.append(clip)
            codes = clip.output[0]
            after = self.consumers.get(codes, [])
        dqs = [d for d in after if d.op_type == "DequantizeLinear"]
        if len(dqs) != len(after):
            raise LoweringError(f"{q.name}: integer codes are read by something other than a DequantizeLinear")
        t = QTensor(source, exp, lo - zp, hi - zp, zp, codes)
        for dq in dqs:
            dzp, _ = self.zero_point(dq)
            dexp = int(self.pow2_exp(dq, dq.input[1]).reshape(-1)[0])
            if dzp != zp or dexp != exp:
                raise LoweringError(f"{dq.name}: scale or zero point differs from its QuantizeLinear's")
            self.dq_to_tensor[dq.output[0]] = t.name
            chain.append(dq)
        return t, chain, offset

    def codes_input(self, node: onnx.NodeProto, name: str) -> QTensor:
        if name in self.dq_to_tensor:
            return self.tensors[self.dq_to_tensor[name]]
        raise LoweringError(f"{node.name} ({node.op_type}): input {name} is float, not a dequantized integer tensor")

    def value_kind(self, name: str) -> str | None:
        if name in self.dq_to_tensor:
            return "codes"
        return self.kinds.get(name)

    def ref(self, name: str) -> str:
        return self.dq_to_tensor.get(name, name)

    # ---------------------------------------------------------------- the walk
    def run(self) -> Program:
        for x in self.graph_inputs:
            self.kinds[x] = "float"
            found = self.requant_chain(x)
            if found is None:
                raise LoweringError(f"graph input {x} is not quantized")
            t, chain, _ = found
            self.mark(*chain)
            self.tensors[t.name] = t
            self.input_quant[x] = t.name
            self.steps.append(Step("QuantizeInput", f"{x}_quantize", [x], t.name,
                                   requant={"shift": 0, "lo": t.lo, "hi": t.hi}, attrs={"exp": t.exp}))
        for node in self.model.graph.node:
            if id(node) in self.done or node.op_type == "Constant":
                continue
            if node.op_type == "DequantizeLinear" and node.input[0] in self.inits:
                continue  # weights and biases: read by their layer
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                raise LoweringError(f"{node.name}: a {node.op_type} outside a requantization chain")
            self.lower(node)
        for out in self.graph_outputs:
            if out not in self.kinds and out not in self.dq_to_tensor:
                raise LoweringError(f"graph output {out} is not computed by the integer program")
        return Program(self.rounding, [self.tensors[v] for v in self.input_quant.values()], self.input_quant,
                       self.graph_outputs, self.tensors, self.steps, self.arrays)

    def lower(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        kinds = [self.value_kind(i) if i else None for i in node.input]
        data_kind = next((k for i, k in zip(node.input, kinds) if i and k is not None), None)
        if op in ("Conv", "Gemm", "MatMul"):
            return self.layer(node)
        if op == "Shape":
            return self.simple(node, "shape")
        if data_kind == "shape" or (data_kind is None and all(i in self.inits or not i for i in node.input)):
            if op not in SHAPE_OPS:
                raise LoweringError(f"{node.name} ({op}): shape arithmetic op not supported")
            return self.simple(node, "shape")
        if data_kind == "float":
            if op not in TAIL_OPS or any(o not in self.graph_outputs and not self._leads_to_outputs(o) for o in node.output):
                raise LoweringError(f"{node.name} ({op}): float op between quantized tensors (no integer semantics)")
            return self.simple(node, "float")
        if data_kind is None:
            raise LoweringError(f"{node.name} ({op}): reads a tensor the program does not compute")
        if op in ("Add", "Concat", "ReduceSum", "Relu", "Clip") or op in MOVE_OPS:
            return self.integer_op(node)
        raise LoweringError(f"{node.name} ({op}): no integer semantics in ptqc")

    def _leads_to_outputs(self, name: str) -> bool:
        users = self.consumers.get(name, [])
        if not users:
            return name in self.graph_outputs
        return all(u.op_type in TAIL_OPS and all(self._leads_to_outputs(o) for o in u.output) for u in users)

    def simple(self, node: onnx.NodeProto, kind: str) -> None:
        consts, inputs = {}, []
        for i, name in enumerate(node.input):
            if name and self.value_kind(name) is None and name in self.inits:
                consts[str(i)] = self.add_array(f"{node.name}_in{i}", self.const(name))
                inputs.append("")
            else:
                inputs.append(self.ref(name))
        attrs = {a.name: _attr(a) for a in node.attribute}
        self.steps.append(Step(node.op_type, node.name, inputs, node.output[0], attrs, consts, kind=kind))
        self.kinds[node.output[0]] = kind

    def finish(self, node: onnx.NodeProto, step: Step, acc_exp: np.ndarray | int) -> None:
        """Attach the requantization that follows ``node`` (or mark its output float) and record the step."""
        found = self.requant_chain(node.output[0])
        if found is None:
            if node.op_type not in ("Conv", "Gemm", "MatMul") or not self._leads_to_outputs(node.output[0]):
                raise LoweringError(f"{node.name} ({node.op_type}): output is not requantized")
            step.dequant = {"exp": self.add_array(f"{node.name}_acc_exp", np.asarray(acc_exp, np.int64))}
            step.kind = "float"
            self.kinds[node.output[0]] = "float"
            self.steps.append(step)
            return
        t, chain, offset = found
        t.name = node.output[0]
        for dq in chain:
            if dq.op_type == "DequantizeLinear":
                self.dq_to_tensor[dq.output[0]] = t.name
        shift = np.asarray(acc_exp, np.int64) - t.exp
        if offset is not None:
            self.check_offset(node, offset, np.asarray(acc_exp, np.int64), shift)
        self.mark(*chain)
        self.tensors[t.name] = t
        step.output = t.name
        k = shift.reshape(-1)
        step.requant = {"shift": int(k[0]) if k.size == 1 or np.all(k == k[0]) else
                        self.add_array(f"{node.name}_shift", shift), "lo": t.lo, "hi": t.hi}
        self.kinds[t.name] = "codes"
        self.steps.append(step)

    def check_offset(self, node, offset: np.ndarray, acc_exp: np.ndarray, shift: np.ndarray) -> None:
        """A rounding Add must add half an accumulator LSB exactly where a right shift rounds (half-up)."""
        if self.rounding != "half-up":
            raise LoweringError(f"{node.name}: a constant Add before requantization, but the model declares {self.rounding} rounding")
        want = np.where(shift < 0, np.exp2((acc_exp - 1).astype(np.float64)), 0.0)
        got, want = np.asarray(offset, np.float64).reshape(-1), want.reshape(-1)
        if got.size == 1:
            got = np.broadcast_to(got, want.shape)
        if not np.array_equal(got, want):
            raise LoweringError(f"{node.name}: rounding offset is not half an accumulator LSB where the shift rounds")

    # ---------------------------------------------------------------- integer ops
    def layer(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        x = self.codes_input(node, node.input[0])
        wdq = self.producer.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or self.const(wdq.input[0]) is None:
            raise LoweringError(f"{node.name} ({op}): weights are not integers behind a DequantizeLinear")
        codes = self.const(wdq.input[0])
        if not np.issubdtype(codes.dtype, np.integer):
            raise LoweringError(f"{node.name}: weights are not stored as integers")
        wzp = self.const(wdq.input[2]) if len(wdq.input) > 2 and wdq.input[2] else None
        if wzp is not None and np.any(wzp != 0):
            raise LoweringError(f"{node.name}: weight zero point is not 0")
        e_w = self.pow2_exp(wdq, wdq.input[1]).reshape(-1)
        bits = next((int(p.value) for p in wdq.metadata_props if p.key == "ptqc.bits"), 8)
        offsets = parse_offsets(next((p.value for p in wdq.metadata_props if p.key == "ptqc.offset"), None))
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        if offsets is not None and offsets.size != codes.shape[axis]:
            raise LoweringError(f"{node.name}: {offsets.size} weight grid offsets for {codes.shape[axis]} channels")
        bad_mask = bad_weight_codes(codes, bits, offsets, axis) if codes.size else None
        if bad_mask is not None and bad_mask.any():
            bad = np.argwhere(bad_mask)[0]
            raise LoweringError(f"{node.name}: weight {tuple(int(i) for i in bad)} = {int(codes[tuple(bad)])} "
                                + (f"is off the declared {bits}-bit grid of its offset" if offsets is not None else
                                   f"is outside the declared {bits}-bit range {list(int_range(bits, True))}"))
        attrs: dict = {}
        if op == "Conv":
            a = {at.name: _attr(at) for at in node.attribute}
            if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                raise LoweringError(f"{node.name}: auto_pad={a['auto_pad']} is not supported; pads must be explicit")
            k = list(codes.shape[2:])
            attrs = {"group": int(a.get("group", 1)), "kernel": k, "strides": list(a.get("strides", [1] * len(k))),
                     "pads": list(a.get("pads", [0] * 2 * len(k))), "dilations": list(a.get("dilations", [1] * len(k)))}
            w = codes
        elif op == "Gemm":
            a = {at.name: _attr(at) for at in node.attribute}
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise LoweringError(f"{node.name}: Gemm with transA, alpha or beta is not supported")
            w = codes if a.get("transB", 0) else codes.T
        else:
            w = codes.T
        n_out = w.shape[0]
        if e_w.size not in (1, n_out):
            raise LoweringError(f"{node.name}: weight scale has {e_w.size} entries for {n_out} output channels")
        e_w = np.broadcast_to(e_w, (n_out,)).astype(np.int64)
        acc_exp = x.exp + e_w
        consts = {"w": self.add_array(f"{node.name}_w", w.astype(np.int8 if bits <= 8 else np.int32))}
        if len(node.input) > 2 and node.input[2]:
            bdq = self.producer.get(node.input[2])
            if bdq is None or bdq.op_type != "DequantizeLinear" or self.const(bdq.input[0]) is None:
                raise LoweringError(f"{node.name}: bias is not an int32 behind a DequantizeLinear")
            b = self.const(bdq.input[0])
            e_b = np.broadcast_to(self.pow2_exp(bdq, bdq.input[1]).reshape(-1), (n_out,))
            if b.dtype != np.int32:
                raise LoweringError(f"{node.name}: bias is {b.dtype}, not int32")
            if np.any(e_b != acc_exp):
                raise LoweringError(f"{node.name}: bias scale is not input scale x weight scale")
            consts["b"] = self.add_array(f"{node.name}_b", np.broadcast_to(b.reshape(-1), (n_out,)).astype(np.int32))
        step = Step("Conv" if op == "Conv" else "Gemm", node.name, [x.name], node.output[0], attrs, consts)
        step.attrs["weight_bits"] = bits
        if offsets is not None:
            # per output channel: w holds 2^m (k + z) for b-bit codes k, m = 1 where z is half-integer
            step.attrs["weight_offset"] = [float(z) for z in offsets]
        self.mark(node)
        self.finish(node, step, acc_exp)

    def integer_op(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        data = [i for i in node.input if i and self.value_kind(i) == "codes"]
        if op in ("Add", "Concat") and len(data) != len(node.input):
            raise LoweringError(f"{node.name} ({op}): every operand must be a quantized tensor")
        ins = [self.codes_input(node, i) for i in data]
        attrs = {a.name: _attr(a) for a in node.attribute}
        consts = {}
        inputs = []
        for i, name in enumerate(node.input):
            if name and self.value_kind(name) == "codes":
                inputs.append(self.ref(name))
            elif name and self.value_kind(name) == "shape":
                inputs.append(name)
            elif name and name in self.inits:
                arr = self.const(name)
                if op in ("Clip",) and i > 0:
                    attrs[("min", "max")[i - 1]] = float(arr)  # converted to codes below
                    inputs.append("")
                    continue
                if op == "Pad" and i == 2 and np.any(arr != 0):
                    raise LoweringError(f"{node.name}: Pad with a non-zero constant is not supported")
                consts[str(i)] = self.add_array(f"{node.name}_in{i}", arr)
                inputs.append("")
            else:
                inputs.append(name)
        if op == "Pad" and attrs.get("mode", "constant") != "constant":
            raise LoweringError(f"{node.name}: Pad mode {attrs['mode']} is not supported")
        e_min = min(t.exp for t in ins)
        if op in ("Add", "Concat"):
            attrs["align"] = [t.exp - e_min for t in ins]
            acc_exp = e_min
        else:
            acc_exp = ins[0].exp
        step = Step(op, node.name, inputs, node.output[0], attrs, consts)
        self.mark(node)
        found_before = len(self.steps)
        self.finish(node, step, acc_exp)
        if op in ("Relu", "Clip") and len(self.steps) > found_before:
            out = self.tensors[step.output]
            lo_f = attrs.pop("min", 0.0 if op == "Relu" else None)
            hi_f = attrs.pop("max", None)
            # Q(clip(x, a, b)) = clip(Q(x), round(a / s), round(b / s)): rounding is monotone
            if lo_f is not None:
                step.requant["lo"] = max(step.requant["lo"], int(np.round(lo_f / 2.0**out.exp)))
            if hi_f is not None:
                step.requant["hi"] = min(step.requant["hi"], int(np.round(hi_f / 2.0**out.exp)))


def _attr(a: onnx.AttributeProto):
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v).tolist()
    return v


def lower(model: onnx.ModelProto) -> Program:
    """The integer program of a ptqc QDQ model (raises :class:`LoweringError` where the graph is not integer)."""
    return _Lowering(model).run()


# ---------------------------------------------------------------------------------------- overflow bounds
INT32_MAX = 2**31 - 1
#: float32 holds every integer up to 2^24: above it onnxruntime's float Conv/Add (and QLinearConv's
#: int32 -> float requantization) may round the accumulator
FLOAT32_EXACT = 2**24


@dataclasses.dataclass
class Bound:
    step: str
    op: str
    #: worst-case |accumulator| over every input in the tensors' code ranges, in accumulator LSBs
    worst: int

    @property
    def bits(self) -> int:
        """Signed accumulator width the worst case needs."""
        return int(self.worst).bit_length() + 1


def accumulator_bounds(program: Program) -> list[Bound]:
    """Worst-case accumulator magnitude of every Conv/Gemm and Add, from the integer weights, the bias and the
    input code ranges alone (exact: each weight meets the input extreme that maximises the sum)."""
    out = []
    for step in program.steps:
        if step.op in ("Conv", "Gemm"):
            x = program.tensors[step.inputs[0]]
            w = program.arrays[step.consts["w"]].astype(np.int64)
            w = w.reshape(w.shape[0], -1)
            b = program.arrays[step.consts["b"]].astype(np.int64) if "b" in step.consts else 0
            hi = np.maximum(w * x.lo, w * x.hi).sum(axis=1) + b
            lo = np.minimum(w * x.lo, w * x.hi).sum(axis=1) + b
            out.append(Bound(step.name, step.op, int(max(np.abs(hi).max(), np.abs(lo).max()))))
        elif step.op == "Add" and step.kind == "codes":
            worst = sum(max(abs(program.tensors[i].lo), abs(program.tensors[i].hi)) << s
                        for i, s in zip(step.inputs, step.attrs["align"]))
            out.append(Bound(step.name, step.op, int(worst)))
    return out


def overflow_findings(program: Program) -> tuple[list[str], list[str]]:
    """(errors, warnings) from :func:`accumulator_bounds`: int32 overflow is an error; an accumulator past
    float32's exact range (2^24, or 2^23 with half-up rounding, whose offset needs one more bit) is a warning
    that onnxruntime's float path may round where integer hardware does not."""
    errors, warnings = [], []
    exact = FLOAT32_EXACT >> (1 if program.rounding == "half-up" else 0)
    for b in accumulator_bounds(program):
        if b.worst > INT32_MAX:
            errors.append(f"{b.step} ({b.op}): worst-case accumulator {b.worst} ({b.bits} bits) overflows int32")
        elif b.worst >= exact:
            warnings.append(f"{b.step} ({b.op}): worst-case accumulator {b.worst} ({b.bits} bits) is past float32's "
                            f"exact range 2^{exact.bit_length() - 1}; onnxruntime's float path may round it")
    return errors, warnings
