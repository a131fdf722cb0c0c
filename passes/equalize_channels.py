"""Per-channel clipping thresholds for low-bit Relu/Clip outputs that convolutions read.

A per-tensor power-of-two grid gives every channel of an activation the same step.  MobileNet-style
expansion and depthwise outputs have channels whose ranges differ by 10x and more, so at 4 bits the small
channels are rounded to a few codes, or to zero.  Relu and Clip(0, hi) are positively homogeneous: a channel
can be multiplied by ``s_c > 0`` before the activation and divided by ``s_c`` in its reader.  For every
unsigned fused activation below 8 bits whose producer is a weighted layer and whose readers are all Convs,
the pass guarantees:

* each channel ``c`` is clipped at its own threshold ``t_c`` in the float model's units: the producer's row
  ``c`` and bias are multiplied by ``s_c = T / t_c``, with ``T = qmax * 2^e`` the top of the tensor's
  power-of-two grid, and each reader's input channel ``c`` is divided by ``s_c``;
* where depthwise convs are the only readers, ``t_c`` is the channel's least-squared-error threshold
  (per-channel histogram of the calibration data, at most the activation's own bound).  Both weight
  quantizers involved are per output channel, so the scaling is exact for them;
* where a dense conv reads the tensor, ``t_c = t^(1 - a) * t_c'^a`` with ``t`` the per-tensor least-squares
  threshold, ``t_c'`` the channel's own and ``a = DENSE_STRENGTH``: a dense reader's row mixes the scaled
  columns in one grid, so a column divided by a large ``s_c`` loses its 4-bit codes.  Fully per channel
  (``a = 1``) that cost EfficientNet-Lite0 w4a4 8 points of agreement in an early pipeline; in the full one,
  MobileNetV1 w4a4 agreement on held-back images was 63.7% at ``a = 1`` and 65.9% at 0.5 (docs/design.md);
* the tensor's exponent is fixed to ``e`` and its fused bound becomes ``T``: the quantizer's saturation at
  ``T`` clips channel ``c`` at ``t_c <= hi``, so a ReLU6's own bound is implied, and every scale stays
  ``2^e``;
* the per-channel means and the readers' second moments (GPTQ's ``H``) are rescaled to match, and the
  tensor's per-channel factor is recorded (``meta[ACT].rescale``) for the report.
"""

from __future__ import annotations

__all__ = ["ChannelHistogram", "EqualizeChannelsPass", "apply_channel_thresholds", "depthwise_readers"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.annotations import ACT, HIST, MOMENT, WEIGHT, group_sizes
from ptqc.data import Dataset
from ptqc.passes.absorb_clip_range import saturate_at_top, scale_output_channels, scale_weights
from ptqc.passes.calibrate import float_outputs
from ptqc.passes.fold_batchnorm import const
from ptqc.passes.pot_scales import channel_view
from ptqc.quant import int_range

logger = logging.getLogger(__name__)

#: per-channel histogram: 32 bins per octave over [2^LOW, 2^HIGH) (values below LOW count as exact zeros)
_PER_OCTAVE = 32
_LOW, _HIGH = -20, 16
#: at most this many positions per image and channel are binned (a regular stride)
_POSITIONS = 1024
#: how far towards its own threshold a channel moves when a dense conv reads the tensor (0: the per-tensor
#: threshold, 1: the channel's own); the module docstring has the measurements behind 0.5
DENSE_STRENGTH = 0.5


def _bins() -> tuple[np.ndarray, np.ndarray]:
    k = np.arange((_HIGH - _LOW) * _PER_OCTAVE)
    octave = np.exp2(_LOW + k // _PER_OCTAVE).astype(np.float64)
    lower = octave * (1 + (k % _PER_OCTAVE) / _PER_OCTAVE)
    return lower, octave / _PER_OCTAVE


_LOWER, _WIDTH = _bins()
_CENTRE = _LOWER + _WIDTH / 2


class ChannelHistogram:
    """Counts of a non-negative tensor's values per channel (axis 1), in log-spaced bins."""

    def __init__(self, channels: int):
        self.counts = np.zeros((channels, len(_LOWER)), dtype=np.int64)
        self.max = np.zeros(channels)

    def add(self, x: np.ndarray) -> None:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        step = -(-flat.shape[2] // _POSITIONS)
        flat = np.ascontiguousarray(flat[:, :, ::step].transpose(1, 0, 2)).reshape(c, -1).astype(np.float32)
        self.max = np.maximum(self.max, flat.max(axis=1))
        with np.errstate(divide="ignore"):
            idx = np.floor((np.log2(np.maximum(flat, 2.0**_LOW)) - _LOW) * _PER_OCTAVE).astype(np.int64)
        keep = flat >= 2.0**_LOW
        idx = np.clip(idx, 0, len(_LOWER) - 1) + np.arange(c)[:, None] * len(_LOWER)
        self.counts += np.bincount(idx[keep], minlength=self.counts.size).reshape(self.counts.shape)

    def best_clip(self, bits: int, upper: float | None, steps: int = 40) -> np.ndarray:
        """Per channel, the threshold (top of a ``bits``-wide unsigned grid) with the least squared error."""
        qmax = int_range(bits, False)[1]
        top = self.max if upper is None else np.minimum(self.max, upper)
        frac = np.linspace(0.15, 1.0, steps)
        best = top.copy()
        best_err = np.full(len(top), np.inf)
        n = self.counts.astype(np.float64)
        for f in frac:
            t = (top * f)[:, None]
            s = np.where(t > 0, t / qmax, 1.0)
            q = np.minimum(np.round(_CENTRE[None] / s) * s, t)
            err = (n * (_CENTRE[None] - q) ** 2).sum(axis=1)
            better = err < best_err
            best = np.where(better, t[:, 0], best)
            best_err = np.where(better, err, best_err)
        return best


def apply_channel_thresholds(graph: ir.Graph, v: ir.Value, t: np.ndarray, method: str) -> bool:
    """Clip channel ``c`` of ``v`` (a fused unsigned activation that only Convs read) at ``t[c]``: its producer's
    row ``c`` times ``s_c = T / t_c`` and each reader's input channel ``c`` divided by it, with ``T`` the top of
    a power-of-two grid near the thresholds' geometric mean.  False (nothing done) if every ``t`` is 0."""
    act = v.meta[ACT]
    qmax = int_range(act.bits, False)[1]
    live = t > 0
    if not live.any():
        return False
    e = int(np.ceil(np.log2(np.exp(np.log(t[live]).mean()) / qmax)))
    top = qmax * 2.0**e
    s = np.where(live, top / np.where(live, t, 1.0), 1.0)
    producer = act.fused.inputs[0].producer()
    scale_output_channels(graph, producer, s, suffix="ch")
    producer.meta[WEIGHT].methods.append(method)
    for reader in {u.node for u in v.uses()}:
        w = const(reader.inputs[1])
        h = reader.meta[MOMENT].h if MOMENT in reader.meta else None
        depthwise = _depthwise(reader)
        # channel c is a depthwise reader's output channel c (axis 0), a dense reader's input channel c (axis 1)
        scale_weights(graph, reader, channel_view(1.0 / s, w.ndim, 0 if depthwise else 1), suffix="ch")
        if h is not None:
            # a depthwise H is one (taps x taps) block per channel; a dense H's rows are the im2col patches in
            # OIHW order (channel, then kernel taps)
            sv = np.repeat(s, int(np.prod(w.shape[2:])))
            reader.meta[MOMENT].h = h * ((s**2)[:, None, None] if depthwise else np.outer(sv, sv)[None])
            reader.meta[MOMENT].total = reader.meta[MOMENT].total * (s[:, None] if depthwise else sv[None])
    saturate_at_top(graph, v, top, e, s)
    return True


def depthwise_readers(v: ir.Value) -> bool:
    """Every reader of ``v`` is a depthwise conv (channel c of ``v`` reaches output channel c only)."""
    return bool(v.uses()) and all(_depthwise(u.node) for u in v.uses())


def _dense(node: ir.Node) -> bool:
    """A Conv with one group: every output channel reads every input channel."""
    return node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1


def _depthwise(node: ir.Node) -> bool:
    """A Conv whose output channel ``c`` reads input channel ``c`` alone (depth multiplier 1)."""
    if node.op_type != "Conv":
        return False
    shape = const(node.inputs[1]).shape
    return shape[1] == 1 and node.attributes.get_int("group", 1) == shape[0]


class EqualizeChannelsPass(ir.passes.InPlacePass):
    """Give each channel of low-bit Relu/Clip outputs that convs read its own clipping threshold."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int = 64):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.samples = samples

    def _eligible(self, graph: ir.Graph) -> list[ir.Value]:
        values = [v for node in graph for v in node.outputs if ACT in v.meta]
        group_size = group_sizes(graph)
        out = []
        for v in values:
            act = v.meta[ACT]
            if act.bits >= 8 or act.signed or act.fused is None or act.exp is not None or group_size[act.group] != 1:
                continue
            if (act.clip_lo or 0.0) < 0:
                continue
            producer = act.fused.inputs[0].producer()
            if producer is None or WEIGHT not in producer.meta:
                continue
            if not v.uses() or not all(WEIGHT in u.node.meta and u.idx == 0 for u in v.uses()):
                continue
            if v.shape is None or len(v.shape) < 2:
                continue
            if not all(_depthwise(u.node) or _dense(u.node) for u in v.uses()):
                continue
            if not depthwise_readers(v) and HIST not in v.meta:
                continue  # no per-tensor threshold to start a dense reader's channels from
            out.append(v)
        return out

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = self._eligible(graph)
        if not values:
            return ir.passes.PassResult(model, modified=False)
        names = [v.name for v in values]
        hists: dict[str, ChannelHistogram] = {}
        for outputs in float_outputs(model, names, self.data, self.samples, self.batch_size, "equalize"):
            for name, arr in outputs.items():
                if name not in hists:
                    hists[name] = ChannelHistogram(arr.shape[1])
                hists[name].add(arr)
        dense = 0
        for v in values:
            act = v.meta[ACT]
            t = hists[v.name].best_clip(act.bits, act.clip_hi)
            if not depthwise_readers(v):
                dense += 1
                whole = v.meta[HIST].best_clip(act.bits, False, upper=act.clip_hi)
                t = np.where(t > 0, whole ** (1 - DENSE_STRENGTH) * np.where(t > 0, t, 1.0) ** DENSE_STRENGTH, whole)
            apply_channel_thresholds(graph, v, t, "equalize_channels")
        logger.info("gave %d activations per-channel clipping thresholds (%d read by dense convs, at strength %.2g)",
                    len(values), dense, DENSE_STRENGTH)
        return ir.passes.PassResult(model, modified=True)
