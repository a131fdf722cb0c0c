"""``ptqc verify``: run the integer reference and onnxruntime side by side and demand bit-exact agreement.

The reference (:mod:`ptqc.intexec`) runs the integer program lowered from the QDQ file (or read from an
``export-int`` folder); onnxruntime runs the QDQ file itself, with every quantized tensor's integer codes
exposed as an extra output.  Every quantized tensor must match on every sample.  Float outputs (the logits,
``acc * 2^e``) are compared too; they match exactly while accumulators stay within float32's exact range.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from ptqc import runtime
from ptqc.errors import PtqcError
from ptqc.intexec import Executor
from ptqc.intprog import LoweringError, Program, lower, overflow_findings


@dataclasses.dataclass
class Mismatch:
    tensor: str
    index: tuple[int, ...]
    onnxruntime: float
    reference: float

    def __str__(self) -> str:
        return (f"tensor {self.tensor} differs at index {list(self.index)}: onnxruntime {self.onnxruntime:g}, "
                f"integer reference {self.reference:g}")


@dataclasses.dataclass
class VerifyReport:
    samples: int = 0
    tensors: int = 0
    compared_values: int = 0
    mismatch: Mismatch | None = None
    mismatched_tensors: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    float_outputs: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> max |diff|
    rounding: str = ""

    @property
    def ok(self) -> bool:
        return self.mismatch is None and not self.errors

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["mismatch"] = str(self.mismatch) if self.mismatch else None
        return d


def exposed_session(model: onnx.ModelProto, program: Program, fuse: bool = False):
    """onnxruntime session of the QDQ model with every quantized tensor's codes as an extra output."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    existing = {o.name for o in proto.graph.output}
    for t in program.tensors.values():
        if t.onnx_name in existing:
            continue
        node = producer.get(t.onnx_name)
        while node is not None and node.op_type != "QuantizeLinear":
            node = producer.get(node.input[0])
        zp = inits.get(node.input[2]) if node is not None and len(node.input) > 2 else None
        elem = zp.data_type if zp is not None else onnx.TensorProto.UINT8
        proto.graph.output.append(helper.make_tensor_value_info(t.onnx_name, elem, None))
    return runtime.make_session(proto, what="the QDQ model", fuse=fuse)


def saturation_risks(program: Program) -> list[str]:
    """Layers where onnxruntime's AVX2 u8 x s8 kernel (pairwise products summed into int16, saturating) can
    differ from exact integer arithmetic: two weights of one output channel whose magnitudes sum past
    32767 / (largest uint8 container value of the input)."""
    out = []
    for step in program.steps:
        if step.op not in ("Conv", "Gemm") or step.kind != "codes":
            continue  # a layer with a float output is not fused into an int8 kernel
        x = program.tensors[step.inputs[0]]
        top = x.hi + x.zero_point  # largest uint8 value the kernel sees
        codes = program.arrays[step.consts["w"]]
        w = np.abs(codes.astype(np.int64)).reshape(len(codes), -1)
        if w.shape[1] < 2:
            continue
        pair = np.sort(w, axis=1)[:, -2:].sum(axis=1).max()
        if top * pair > 32767:
            out.append(f"{step.name}: uint8 inputs up to {top} and weight pairs up to {pair} can saturate int16 pair "
                       "sums in onnxruntime's int8 kernel on CPUs without VNNI")
    return out


def random_inputs(model: onnx.ModelProto, program: Program, count: int, seed: int = 0) -> np.ndarray:
    """``count`` inputs drawn uniformly over the input quantizer's range, for a run without data.  The
    model's input shape must be static apart from the batch axis."""
    name, tensor_name = next(iter(program.input_quant.items()))
    t = program.tensors[tensor_name]
    vi = next(i for i in model.graph.input if i.name == name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if any(d is None for d in dims[1:]):
        raise PtqcError(f"input {name} has a dynamic shape {dims}; pass --data")
    rng = np.random.default_rng(seed)
    return rng.uniform(t.lo * 2.0**t.exp, t.hi * 2.0**t.exp, (count, *dims[1:])).astype(np.float32)


def verify(model: onnx.ModelProto, inputs: np.ndarray, program: Program | None = None, batch_size: int = 8,
           fuse: bool = False) -> VerifyReport:
    """Compare the integer reference with onnxruntime on ``inputs`` (N, ...) for the model's one data input.

    ``fuse=False`` (the default) runs the graph as ONNX defines it; ``fuse=True`` lets onnxruntime fuse QDQ
    groups into its int8 kernels, whose u8 x s8 products are summed in pairs with int16 saturation on x86
    CPUs without VNNI (see :func:`saturation_risks`)."""
    report = VerifyReport()
    try:
        lowered = lower(model)
    except LoweringError as exc:
        report.errors.append(str(exc))
        return report
    program = program or lowered
    report.rounding = program.rounding
    errors, warnings = overflow_findings(program)
    report.errors += errors
    report.warnings += warnings
    if program.input_quant.keys() != lowered.input_quant.keys():
        report.errors.append("the program's inputs are not the model's")
        return report
    input_name = next(iter(program.input_quant))
    session = exposed_session(model, lowered, fuse)
    if fuse:
        report.warnings += saturation_risks(program)
    names = [t.onnx_name for t in lowered.tensors.values()]
    floats = [o for o in program.outputs if o not in program.tensors]
    executor = Executor(program)
    report.tensors = len(program.tensors)
    bad: set[str] = set()
    for start in range(0, len(inputs), batch_size):
        x = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
        got = dict(zip(names + floats, runtime.run(session, {input_name: x}, names + floats)))
        ref = executor.run({input_name: x})
        for ov in ref.overflows:
            report.errors.append(f"{ov.step}: int32 accumulator overflow at index {list(ov.index)} "
                                 f"(sample {start + ov.index[0]}): {ov.value}")
        for name, t in lowered.tensors.items():
            ort_codes = got[t.onnx_name].astype(np.int64) - t.zero_point
            mine = ref.values.get(name)
            if mine is None:
                report.errors.append(f"tensor {name}: not computed by the program")
                bad.add(name)
                continue
            report.compared_values += ort_codes.size
            if mine.shape != ort_codes.shape:
                report.errors.append(f"tensor {name}: shape {mine.shape} in the reference, {ort_codes.shape} in onnxruntime")
                bad.add(name)
                continue
            diff = ort_codes != mine
            if np.any(diff):
                bad.add(name)
                if report.mismatch is None:
                    idx = tuple(int(i) for i in np.argwhere(diff)[0])
                    report.mismatch = Mismatch(name, (start + idx[0], *idx[1:]), float(ort_codes[idx]), float(mine[idx]))
        for name in floats:
            if name in ref.values:
                d = float(np.max(np.abs(got[name].astype(np.float64) - ref.values[name]))) if got[name].size else 0.0
                report.float_outputs[name] = max(report.float_outputs.get(name, 0.0), d)
        report.samples += len(x)
    report.mismatched_tensors = len(bad)
    if report.samples == 0:
        raise PtqcError("no samples to verify on")
    return report
