"""Calibrate: run the float model in onnxruntime and stream a histogram of every planned tensor.

Guarantees after the pass:

* Every value with a planned quantizer (``meta[ACT]``) has ``meta[HIST]``: the exact min/max of the values
  it took on the calibration data, and, where its exponent rule needs one, a fixed-size histogram.
* Memory does not grow with the number of calibration images: one batch is run at a time and only the
  statistics are kept.  Tensors whose exponent rule needs only the extremes are reduced inside the
  onnxruntime graph (per-image max/min and channel means); only tensors that need a histogram (or GPTQ's
  second moments, on the first images) are exposed whole.
* NaN or Inf in any calibrated tensor stops the run with the tensor's name.
* With ``moment_samples > 0``, every weighted layer also gets ``meta[MOMENT]``, the second moment of its
  input patches over the first ``moment_samples`` images (for GPTQ), from the same runs.
"""

from __future__ import annotations

__all__ = ["CalibratePass", "float_session", "run_batch"]

import logging

import numpy as np
import onnx
import onnx_ir as ir

from ptqc import progress, runtime
from ptqc.annotations import ACT, HIST, MEAN, MOMENT, WEIGHT
from ptqc.hessian import for_layer
from ptqc.data import Dataset
from ptqc.errors import PtqcError
from ptqc.quant import Histogram, needs_histogram

logger = logging.getLogger(__name__)


def float_session(model: ir.Model, extra_outputs: list[str], reduced: dict[str, tuple[int, bool]] | None = None,
                  arena: bool = False):
    """An onnxruntime session of the IR model with ``extra_outputs`` exposed.

    ``reduced`` maps tensor names to (rank, signed): for those the session computes the statistics itself
    and exposes only them (see :func:`stat_names`), so a batch returns a few numbers per image instead of the
    whole activation, and onnxruntime keeps its normal memory plan.

    Full intermediate tensors as outputs defeat onnxruntime's buffer reuse, so the arena is off by default:
    buffers go back to the system after each batch and peak memory is one batch's worth however many
    batches run (MobileNetV2 w8a8, 128 / 1000 images: 1470 / 1475 MB without the arena, 1735 / 2257 MB with
    it; about 2 s slower).
    """
    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    for name, (rank, signed) in (reduced or {}).items():
        outs = stat_names(name, signed)
        per_sample = onnx.helper.make_tensor(f"{name}__ptqc_axes_c", onnx.TensorProto.INT64, [rank - 1], list(range(1, rank)))
        spatial = onnx.helper.make_tensor(f"{name}__ptqc_axes_hw", onnx.TensorProto.INT64, [rank - 2], list(range(2, rank)))
        proto.graph.initializer.extend([per_sample, spatial])
        ops = [("ReduceMax", per_sample.name), ("ReduceMean", spatial.name)] + ([("ReduceMin", per_sample.name)] if signed else [])
        for (op, axes), out in zip(ops, outs):
            proto.graph.node.append(onnx.helper.make_node(op, [name, axes], [out], keepdims=0, name=out))
            proto.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    return runtime.make_session(proto, arena=arena)


def stat_names(name: str, signed: bool) -> list[str]:
    """Outputs an in-graph reduced tensor contributes: per-image max (N,), per-image channel mean (N, C), and
    for signed tensors per-image min (N,)."""
    return [f"{name}__ptqc_max", f"{name}__ptqc_mean"] + ([f"{name}__ptqc_min"] if signed else [])


def run_batch(session, input_name: str, batch: np.ndarray, names: list[str]) -> list:
    return runtime.run(session, {input_name: batch}, names)


def float_outputs(model: ir.Model, names: list[str], data, samples: int, batch_size: int, what: str):
    """Batch by batch over the first ``samples`` of ``data`` (with a progress bar ``what``): a dict of the float
    model's tensors ``names``."""
    graph = model.graph
    input_name = next(v.name for v in graph.inputs if v.name not in graph.initializers)
    session = float_session(model, names)
    for batch in progress.batches(data.head(samples, batch_size), what, total=min(samples, len(data))):
        yield dict(zip(names, run_batch(session, input_name, batch, names)))


def channel_sum(arr: np.ndarray) -> np.ndarray:
    """Per-channel (axis 1) sum over everything but the batch axis, summed over the batch: mean * N."""
    if arr.ndim == 2:
        return arr.sum(axis=0, dtype=np.float64)
    return arr.reshape(arr.shape[0], arr.shape[1], -1).mean(axis=2, dtype=np.float64).sum(axis=0)


class CalibratePass(ir.passes.InPlacePass):
    """Attach a histogram to every planned activation, from onnxruntime runs over ``data``."""

    def __init__(self, data: Dataset, batch_size: int = 32, moment_samples: int = 0, act_method: str = "auto"):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.moment_samples = moment_samples
        self.act_method = act_method

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        input_value = next(v for v in graph.inputs if v.name not in graph.initializers)
        planned = [v for v in graph.inputs if ACT in v.meta]
        planned += [v for node in graph for v in node.outputs if ACT in v.meta]
        hists = {v.name: Histogram() for v in planned}
        # tensors whose exponent rule reads the histogram (a group is binned if any member needs it)
        binned_groups = {v.meta[ACT].group for v in planned
                         if needs_histogram(self.act_method, v.meta[ACT].bits, v.meta[ACT].signed)}
        binned = {v.name for v in planned if v.meta[ACT].group in binned_groups}
        signed = {v.name: v.meta[ACT].signed for v in planned}
        # the rest need only extremes and channel means, which onnxruntime reduces in the graph
        reduced = {v.name: (len(v.shape), signed[v.name]) for v in planned
                   if v is not input_value and v.name not in binned and v.shape is not None and len(v.shape) > 2}
        full = [v.name for v in planned if v is not input_value and v.name not in reduced]
        stats = [n for name, (_, sgn) in reduced.items() for n in stat_names(name, sgn)]
        layer_inputs = {node.inputs[0].name for node in graph if WEIGHT in node.meta}
        moments = {}
        if self.moment_samples:
            moments = {node: m for node in graph if WEIGHT in node.meta and (m := for_layer(node)) is not None}
        moment_inputs = sorted({node.inputs[0].name for node in moments} - {input_value.name} - set(full))
        # the first batches (GPTQ statistics) also need whole layer inputs: a second session, dropped after
        session = float_session(model, full, reduced, arena=not full)
        moment_session = float_session(model, full + moment_inputs, reduced) if moments else None
        sums: dict[str, np.ndarray] = {}
        seen = 0
        for batch in progress.batches(self.data.batches(self.batch_size), "calibrate", total=len(self.data)):
            # a short last batch is padded to the usual shape, so every run has the same shapes
            real = len(batch)
            if real < self.batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - real, axis=0)])
            in_moments = seen < self.moment_samples and moment_session is not None
            names = full + stats + (moment_inputs if in_moments else [])
            outs = dict(zip(names, (o[:real] for o in run_batch(moment_session if in_moments else session,
                                                                     input_value.name, batch, names))))
            batch = batch[:real]
            outs_full = {name: outs[name] for name in full}
            if input_value.name in hists:
                outs_full[input_value.name] = batch
            for name, arr in outs_full.items():
                hists[name].add(arr, name in binned, signed[name])
                if name in layer_inputs:
                    sums[name] = sums.get(name, 0.0) + channel_sum(arr)
            for name, (_, sgn) in reduced.items():
                names_ = stat_names(name, sgn)
                mean = outs[names_[1]]
                hists[name].add_extremes(outs[names_[0]], outs[names_[2]] if sgn else None, mean)
                if name in layer_inputs:
                    sums[name] = sums.get(name, 0.0) + mean.sum(axis=0, dtype=np.float64)
            if in_moments:
                arrays = {**outs, input_value.name: batch}
                with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported below, by tensor name
                    for node, moment in moments.items():
                        moment.add(arrays[node.inputs[0].name][: self.moment_samples - seen])
            elif moment_session is not None:
                moment_session = None
            seen += len(batch)
        if seen == 0:
            raise PtqcError("the calibration data yielded no samples")
        for v in planned:
            h = hists[v.name]
            if h.nonfinite:
                raise PtqcError(f"NaN or Inf in tensor {v.name} on the calibration data")
            v.meta[HIST] = h
            if v.name in sums:
                v.meta[MEAN] = sums[v.name] / seen
        logger.info("calibrated %d tensors on %d samples (%d reduced in the graph)", len(planned), seen, len(reduced))
        model.graph.meta["ptqc.calib_samples"] = seen
        for node, moment in moments.items():
            node.meta[MOMENT] = moment
        return ir.passes.PassResult(model, modified=False)
