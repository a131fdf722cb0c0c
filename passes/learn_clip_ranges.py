"""Learn the clipping thresholds of low-bit activations inside blocks, on the block's output error.

``absorb_clip_range`` gives every unsigned fused Relu/Clip output between weighted layers a continuous
clipping threshold, chosen by the least squared error of that tensor alone.  The error that matters is the
one a block passes on: a threshold that clips a channel the next layer weighs heavily costs more than its
own squared error says, and the errors of a block's quantizers add up.  This pass chooses the thresholds of
each block's inner activations together, the way LSQ/QDrop learn activation step sizes, but before any
weight is rounded: the weights stay float, so only the activation grids are learned.

For every block (``reconstruct_blocks.find_blocks``) with such tensors inside, and for every such tensor that
ends a block and starts the next (then the two blocks are run as one), the pass guarantees:

* the block is run on windows of its float input, and each of those tensors is quantized on a grid of
  ``2^b - 1`` steps from 0 to its threshold ``t`` (the continuous grid ``absorb_clip_range`` will lay on
  the power-of-two one);
* the thresholds start at the least-squares ones and are learned by Adam on ``log t`` against the float
  block's output, never above the activation's own bound (6 for ReLU6);
* they are kept, as ``value.meta[CLIP]``, only when the block's output error with them is below the error with
  the least-squares thresholds on the same windows; ``absorb_clip_range`` then uses them.

A tensor whose readers are all depthwise convs gets one threshold per channel instead (started from each
channel's least-squares threshold on the window values), applied by the pass itself, after every block was
learned on the unchanged float model, as ``equalize_channels`` applies its own: the producer's row ``c`` and
the readers' channel ``c`` are rescaled, and the tensor's exponent is fixed.  Per-tensor thresholds only go to
``meta[CLIP]``.  The block errors (relative to the output's energy), summed before and after, go to
``graph.meta["ptqc.clip_loss"]``.
"""

from __future__ import annotations

__all__ = ["LearnClipRangesPass"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc import progress
from ptqc.annotations import ACT, CLIP, HIST, WEIGHT, group_sizes
from ptqc.blockrec import Block, Program, Windows, sample_windows
from ptqc.data import Dataset
from ptqc.passes.calibrate import float_session, run_batch
from ptqc.passes.equalize_channels import ChannelHistogram, apply_channel_thresholds, depthwise_readers
from ptqc.passes.reconstruct_blocks import WINDOWS_PER_IMAGE, _float, find_blocks
from ptqc.quant import int_range

logger = logging.getLogger(__name__)


def eligible(v: ir.Value, group_size: dict[int, int]) -> bool:
    """An activation ``absorb_clip_range`` gives a continuous threshold: unsigned, below 8 bits, fused into a
    weighted producer, alone in its sharing group, and read by weighted layers only."""
    act = v.meta.get(ACT)
    if act is None or act.exp is not None or act.bits >= 8 or act.signed or act.fused is None:
        return False
    if (act.clip_lo or 0.0) < 0 or group_size[act.group] != 1 or HIST not in v.meta:
        return False
    producer = act.fused.inputs[0].producer()
    if producer is None or WEIGHT not in producer.meta:
        return False
    return bool(v.uses()) and all(WEIGHT in u.node.meta and u.idx == 0 for u in v.uses())


def _error(prog: Program, data: Windows, weights, target: np.ndarray, quant, chunk: int = 512) -> float:
    total = 0.0
    for i in range(0, data.x_f.shape[0], chunk):
        sl = slice(i, i + chunk)
        y, _ = prog.forward(data.x_f[sl], {k: m[sl] for k, m in data.masks.items()}, weights, quantize=True,
                            quant=quant, record=False)
        total += float(np.sum((y - target[sl]).astype(np.float64) ** 2))
    return total


def learn_thresholds(prog: Program, data: Windows, weights, start: dict[str, tuple], baseline: dict[str, float],
                     iters: int = 100, batch: int = 128, lr: float = 0.03, seed: int = 0) -> tuple[dict, float, float]:
    """Thresholds of the tensors in ``start`` (name -> (initial threshold, a scalar or one per channel; qmax;
    upper bound or None)) that lower the block's output error on ``data``.  Returns them with the error of
    ``baseline`` (one threshold per tensor) and theirs, relative to the output's energy; ``baseline`` itself
    when learning does not beat it."""
    rng = np.random.default_rng(seed)
    target = np.concatenate([
        prog.forward(data.x_f[i : i + 512], {k: m[i : i + 512] for k, m in data.masks.items()}, weights,
                     quantize=False, record=False)[0] for i in range(0, data.x_f.shape[0], 512)])
    qmax = {name: q for name, (_, q, _) in start.items()}

    def grids(t: dict) -> dict[str, tuple]:
        return {name: (t[name] / qmax[name], 0.0, t[name]) for name in start}

    log_t = {name: np.log(np.maximum(np.asarray(t, np.float64), 1e-12)) for name, (t, _, _) in start.items()}
    upper = {name: np.log(u) if u is not None else np.inf for name, (_, _, u) in start.items()}
    m1 = {name: np.zeros_like(v) for name, v in log_t.items()}
    m2 = {name: np.zeros_like(v) for name, v in log_t.items()}
    n = data.x_f.shape[0]
    for it in range(iters):
        idx = rng.integers(0, n, size=min(batch, n))
        sub = data.take(idx)
        quant = grids({name: np.exp(v) for name, v in log_t.items()})
        y, tape = prog.forward(sub.x_f, sub.masks, weights, quantize=True, quant=quant)
        diff = y - target[idx]
        grads = prog.backward((2.0 / diff.size) * diff, tape, sub.masks, weights)
        for name in start:
            g = grads.get(name + "/step", 0.0) * quant[name][0]  # d/d log t = step * d/d step
            m1[name] = 0.9 * m1[name] + 0.1 * g
            m2[name] = 0.999 * m2[name] + 0.001 * g * g
            step = (m1[name] / (1 - 0.9 ** (it + 1))) / (np.sqrt(m2[name] / (1 - 0.999 ** (it + 1))) + 1e-12)
            log_t[name] = np.minimum(log_t[name] - lr * step, upper[name])
    learned = {name: np.exp(v) for name, v in log_t.items()}
    scale = max(float(np.sum(target.astype(np.float64) ** 2)), 1e-30)
    before = _error(prog, data, weights, target, grids(baseline)) / scale
    after = _error(prog, data, weights, target, grids(learned)) / scale
    if after >= before:
        return baseline, before, before
    return learned, before, after


class LearnClipRangesPass(ir.passes.InPlacePass):
    """Choose the clipping thresholds of each block's low-bit activations together, on the block output."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int = 64, iters: int = 100,
                 windows: int = 4096, out: int = 2, channels: bool = True, seed: int = 0):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.samples = samples
        self.iters = iters
        self.windows = windows
        self.out = out
        self.channels = channels
        self.seed = seed

    @staticmethod
    def _channel_start(prog: Program, data: Windows, weights, name: str, qmax: int, upper: float | None,
                       fallback: float) -> np.ndarray:
        """Least-squares per-channel thresholds of inner tensor ``name``, on its values in the float windows
        (``fallback`` for a channel that is zero on all of them)."""
        hist = None
        for i in range(0, min(data.x_f.shape[0], 2048), 512):
            sl = slice(i, i + 512)
            _, (vals, _) = prog.forward(data.x_f[sl], {k: m[sl] for k, m in data.masks.items()}, weights, quantize=False,
                                        record=False)
            hist = hist or ChannelHistogram(vals[name].shape[-1])
            hist.add(np.ascontiguousarray(vals[name].transpose(0, 3, 1, 2)))  # NHWC windows -> channels on axis 1
        t = hist.best_clip(int(np.log2(qmax + 1)), upper)
        return np.where(t > 0, t, fallback)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        group_size = group_sizes(graph)

        def spec(v: ir.Value) -> tuple | None:
            act = v.meta[ACT]
            t = v.meta[HIST].best_clip(act.bits, False, upper=act.clip_hi)
            per_channel = self.channels and depthwise_readers(v)
            return (v, t, int_range(act.bits, False)[1], act.clip_hi, per_channel) if t > 0 else None

        work = []
        blocks = find_blocks(graph, quantized_input=False)
        for i, block in enumerate(blocks):
            inner = {}
            for node in block.nodes:
                v = node.outputs[0]
                if v.name != block.output and eligible(v, group_size) and (sp := spec(v)) is not None:
                    inner[v.name] = sp
            if inner:
                work.append((block, Program(block, self.out), inner))
            # a block's output that the next block reads (MobileNetV1's pointwise output, read by the next
            # depthwise conv) is learned on the error at the next block's output
            out = block.nodes[-1].outputs[0]
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if nxt is not None and nxt.input == out.name and eligible(out, group_size) and (sp := spec(out)) is not None:
                pair = Block(block.nodes + nxt.nodes, quantized_input=False)
                work.append((pair, Program(pair, self.out), {out.name: sp}))
        if not work:
            return ir.passes.PassResult(model, modified=False)
        input_name = next(v.name for v in graph.inputs if v.name not in graph.initializers)
        inputs = sorted({b.input for b, _, _ in work} - {input_name})
        session = float_session(model, inputs)
        rng = np.random.default_rng(self.seed)
        batches = list(self.data.head(self.samples, self.batch_size))
        per_batch = -(-self.windows // len(batches))
        parts: list[list[Windows]] = [[] for _ in work]
        for batch in progress.batches(iter(batches), "clip ranges: windows", total=sum(len(b) for b in batches)):
            arrays = dict(zip(inputs, run_batch(session, input_name, batch, inputs))) if inputs else {}
            arrays[input_name] = batch
            for k, (block, prog, _) in enumerate(work):
                x = arrays[block.input]
                parts[k].append(sample_windows(block, prog.win, x, x, min(per_batch, WINDOWS_PER_IMAGE * len(batch)), rng))
        learned = []
        before = after = 0.0
        for k, (block, prog, inner) in enumerate(progress.steps(work, "clip ranges", unit="block")):
            p = parts[k]
            data = Windows(np.concatenate([w.x_f for w in p]), np.concatenate([w.x_f for w in p]),
                           {name: np.concatenate([w.masks[name] for w in p]) for name in p[0].masks})
            parts[k] = []
            weights = {n.name: _float(n) for n in block.layers}
            baseline = {name: t for name, (_, t, _, _, _) in inner.items()}
            start = {name: (self._channel_start(prog, data, weights, name, q, hi, t) if per_channel else t, q, hi)
                     for name, (_, t, q, hi, per_channel) in inner.items()}
            t, b, a = learn_thresholds(prog, data, weights, start, baseline, iters=self.iters, seed=self.seed)
            before, after = before + b, after + a
            logger.debug("block %s..%s: output error %.4g -> %.4g", block.layers[0].name, block.layers[-1].name, b, a)
            if a < b:
                learned.extend((v, t[name]) for name, (v, *_) in inner.items())
        # applied only now: every block above was run with the weights and bounds of the float model
        for v, t in learned:
            if np.ndim(t):
                apply_channel_thresholds(graph, v, np.asarray(t), "learn_clip_ranges")
            else:
                v.meta[CLIP] = float(t)
        changed = len(learned)
        logger.info("learned the clipping thresholds of %d activations in %d blocks: summed output error %.4g -> %.4g",
                    changed, len(work), before, after)
        model.graph.meta["ptqc.clip_loss"] = (before, after)
        return ir.passes.PassResult(model, modified=changed > 0)
