"""AQuant: learn a rounding border per channel and level for every low-bit activation quantizer.

Round-to-nearest decides between the two codes around ``u = x / 2^e`` at the fixed border 0.5.  The
quantizer only sees the quantized network's activation ``x~``, which already carries the errors of every
layer before it; what the next layer should get is the float network's value ``y``.  AQuant (methods.md 3)
replaces the border by one that depends on the channel ``c`` and the integer level ``k = floor(u)``:
``q = k + 1[u >= k + B[c, k]]``.  The levels, the scale ``2^e`` and the code range do not change, so every
requantization is still a shift; the border is one extra comparison per element, written as explicit ONNX
ops (``emit_qdq``) that ``ptqc inspect`` counts as extra ops.  This is AQuant's coarse-grained, per-(channel,
level) border (family F2); the per-channel constant and affine families are re-tunings of the producer's
bias and weights, which the compensation bias and block reconstruction already do.

For every planned activation below 8 bits with a channel axis, the pass guarantees:

* ``meta[ACT].border`` holds ``B`` (channels x levels), each a multiple of ``1 / BORDER_STEPS`` in [0, 1]
  (see ``ptqc.quant.border_codes``), or stays None where no border lowers the error;
* each ``B[c, k]`` minimises the squared error ``sum (q - y / 2^e)^2`` (``y / 2^e`` clipped to the code
  range) over the calibration elements of channel ``c`` whose level is ``k``, with ``x~`` from the quantized
  model (``ptqc.simulate``) and ``y`` from the float model on the same images.  Changing ``B[c, k]`` moves only those elements
  between codes ``k`` and ``k + 1``, so the minimum is exact over the ``BORDER_STEPS + 1`` candidates; the
  next layer's loss with its second moment cut to its diagonal has the same minimiser per channel;
* a (channel, level) seen fewer than ``MIN_COUNT`` times keeps 0.5, and so does one whose best border does
  not lower the error;
* the tensors are fitted one at a time in graph order, each on the quantized model with the borders
  before it in place (one onnxruntime session, the borders fed as inputs, one run over the images per
  tensor).  Fitted all at once, from the model without borders, each border also corrected what the
  borders before it had already corrected: on a small residual graph (``tests/graphs.linear_stream``) the
  logit SNR fell 21.0 -> 14.9 dB while every border alone raised it;
* the error each border saves is logged, summed over the tensors.

It runs last, after the exponents are final (``legalize_scales``), and is off by default: it lowers its own
objective but not the network's error once reconstruction has run.  MobileNetV2 w4a4 (val500 top-1 /
top-1 agreement with FP32 on 744 held-back images / logit SNR): 64.6 / 65.5% / 2.76 dB without borders,
60.2 / 58.3% / 2.30 dB with them (summed relative error of the 50 tensors 0.0552 -> 0.0509, +306 s);
MobileNetV1 68.8 / 65.9% / 5.80 dB -> 66.8 / 65.2% / 5.22 dB; EfficientNet-Lite0 75.6 / 81.6% / 4.94 dB ->
74.0 / 78.8% / 4.22 dB.  Fitted before AdaRound instead, with block
reconstruction rounding at the borders, MobileNetV2 scored 58.8 / 53.5% / 2.31 dB.  Without any
reconstruction (GPTQ and bias correction only) the borders raise the logit SNR but still lower top-1:
51.6 / 48.5% / 0.40 dB -> 45.6 / 44.4% / 1.39 dB.  A border that pulls each value towards its float
expectation given the quantized one shrinks the tensor towards its mean, which lowers the squared error and
also the margins the classifier needs.  With block reconstruction, the pipeline does not run this pass:
``reconstruct_blocks`` learns the borders of each block's inner activations on the block's output instead,
AQuant's way (docs/design.md).
"""

from __future__ import annotations

__all__ = ["LearnActBordersPass", "best_borders"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc import progress, runtime, simulate
from ptqc.annotations import ACT
from ptqc.data import Dataset
from ptqc.passes.calibrate import float_session, run_batch
from ptqc.passes.emit_qdq import container
from ptqc.quant import BORDER_STEPS

logger = logging.getLogger(__name__)

#: a (channel, level) with fewer calibration elements than this keeps the border 0.5
MIN_COUNT = 64


def best_borders(gain: np.ndarray, count: np.ndarray, min_count: int = MIN_COUNT) -> tuple[np.ndarray, np.ndarray]:
    """Per (channel, level), the border with the least squared error, and the error it saves over 0.5.

    ``gain[c, k, j]`` sums ``(k - y)^2 - (k + 1 - y)^2`` (what rounding up saves) over the elements of channel
    ``c`` and level ``k`` whose fraction ``u - k`` lies in ``[j, j + 1) / BORDER_STEPS``; ``count[c, k]``
    counts them.  Border ``j / BORDER_STEPS`` rounds up the bins ``>= j``, so it saves the tail sum from ``j``;
    of equally good borders (empty bins between them) the nearest 0.5 is taken.
    """
    steps = gain.shape[-1]
    tail = np.concatenate([np.cumsum(gain[..., ::-1], axis=-1)[..., ::-1], np.zeros(gain.shape[:-1] + (1,))], axis=-1)
    half = steps // 2
    # among equally good borders (bins without elements between them), the one nearest 0.5
    distance = np.abs(np.arange(steps + 1) - half)
    j = np.argmax(tail - distance * 1e-9 * (np.abs(tail).max() + 1.0), axis=-1)
    saved = np.take_along_axis(tail, j[..., None], axis=-1)[..., 0] - tail[..., half]
    keep = (saved > 0) & (count >= min_count)
    return np.where(keep, j, half) / steps, np.where(keep, saved, 0.0)


class _Stats:
    """Per-(channel, level, fraction bin) sums of what rounding up saves, for one tensor."""

    def __init__(self, channels: int, lo: int, hi: int, s: float):
        self.lo, self.hi, self.s = lo, hi, s
        self.levels = hi - lo
        self.gain = np.zeros(channels * self.levels * BORDER_STEPS)
        self.count = np.zeros(channels * self.levels)
        self.energy = 0.0
        self.nearest = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        u = np.clip(x.astype(np.float64) / self.s, self.lo, self.hi)
        t = np.clip(y.astype(np.float64) / self.s, self.lo, self.hi)  # what the codes can reach of the float value
        k = np.clip(np.floor(u), self.lo, self.hi - 1)
        frac = np.minimum(((u - k) * BORDER_STEPS).astype(np.int64), BORDER_STEPS - 1)
        c = x.shape[1]
        channel = np.arange(c).reshape((1, c) + (1,) * (x.ndim - 2))
        cell = channel * self.levels + (k - self.lo).astype(np.int64)
        # an element at the top code (u = hi) rounds up whatever the border: it saves nothing to move
        gain = np.where(u < k + 1, 2 * (t - k) - 1, 0.0)
        self.gain += np.bincount((cell * BORDER_STEPS + frac).ravel(), weights=gain.ravel(), minlength=self.gain.size)
        self.count += np.bincount(cell.ravel(), minlength=self.count.size)
        self.energy += float(np.sum(t * t))
        self.nearest += float(np.sum((k + (u - k >= 0.5) - t) ** 2))


class LearnActBordersPass(ir.passes.InPlacePass):
    """Give each low-bit activation quantizer AQuant's per-(channel, level) rounding border."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int = 64):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.samples = samples

    @staticmethod
    def _eligible(model: ir.Model) -> list[ir.Value]:
        outputs = set(model.graph.outputs)
        return [v for v in simulate.planned_values(model)
                if v.meta[ACT].bits < 8 and v.producer() is not None and v not in outputs
                and v.shape is not None and len(v.shape) >= 2 and isinstance(v.shape[1], int)
                and container(v.meta[ACT])[2] > container(v.meta[ACT])[1]]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = self._eligible(model)
        if not values:
            return ir.passes.PassResult(model, modified=False)
        names = [v.name for v in values]
        # every border is a graph input, so one session serves the whole sequential fit
        sim = simulate.build(model, extra_outputs=names, border_inputs=names)
        q_session = runtime.make_session(sim.proto, what="the simulated model")
        f_session = float_session(model, names)
        batches = list(self.data.head(self.samples, self.batch_size))
        borders: dict[str, np.ndarray] = {}
        before = after = energy = 0.0
        for v in progress.steps(values, "borders", unit="tensor"):
            zp, lo, hi = container(v.meta[ACT])
            st = _Stats(v.shape[1], lo - zp, hi - zp, 2.0 ** v.meta[ACT].exp)
            feed = simulate.border_feed(model, names, borders)
            for batch in batches:
                x = runtime.run(q_session, {sim.input_name: batch, **feed}, [v.name])[0]
                y = run_batch(f_session, sim.input_name, batch, [v.name])[0]
                st.add(x, y)
            c = v.shape[1]
            border, saved = best_borders(st.gain.reshape(c, st.levels, BORDER_STEPS), st.count.reshape(c, st.levels))
            before += st.nearest
            after += st.nearest - float(saved.sum())
            energy += st.energy
            if np.any(border != 0.5):
                borders[v.name] = border
        for v in values:
            v.meta[ACT].border = borders.get(v.name)
        logger.info("rounding borders on %d of %d activations: relative squared error against the float values, "
                    "summed over them, %.4g -> %.4g", len(borders), len(values), before / max(energy, 1e-30),
                    after / max(energy, 1e-30))
        return ir.passes.PassResult(model, modified=bool(borders))
