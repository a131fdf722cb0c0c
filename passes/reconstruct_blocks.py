"""Block reconstruction: learn the rounding of a block's low-bit layers together, against the block's output.

The graph is cut into blocks (``ptqc.blockrec``): single-input, single-output runs of Conv/Relu/Clip/Add
that end after a dense Conv (or a residual Add) once they hold at least two Convs, i.e. the inverted residual
blocks of MobileNetV2/EfficientNet and the depthwise-pointwise pairs of MobileNetV1.  Runs with any other op
are left alone.  In topological order, for each block with a layer below 8 bits (with ``learn_8bit``, with
any quantized layer), the pass guarantees:

* the block's input comes from a simulation in which every activation is quantized and every earlier layer
  has its final integer weights and bias; the target is the float model's block output at the same positions
  (read off onnxruntime's float run, not recomputed on the windows).  Both are moved from block to block by
  running only the part of the network in between (``simulate.CutInputs``), so each image goes through each
  model about once in the whole pass;
* the codes of the layers it learns stay at the floor or the ceiling of ``W/s`` on their power-of-two grids and
  are learned jointly, with the biases, by Adam on the block output error with all of the block's inner
  activation quantizers in the loop (QDrop: each quantizer is skipped per element with probability 1/2, and the
  input is a 50/50 mix of quantized and float);
* with ``freeze`` > 0, the rounding variables are hardened progressively, the most decided first (see
  ``blockrec.reconstruct``), so the codes the run ends with are the ones its last steps trained around;
* on (up to 4096 of) its quantized input windows, the block's output error is never above that of its starting
  codes and biases;
* with ``borders``, each of the block's inner activations below 8 bits (read only inside the block) is rounded
  at AQuant borders (``meta[ACT].border``, one per channel and level, on the 1/32 grid) learned on the block
  output once the rounding is final (``blockrec.fit_borders``), if they lower the error on those 4096 windows,
  which they were not learned on; later blocks' inputs are computed with them (``CutInputs.set_border``).

8-bit layers inside a block keep their codes and take part as fixed quantized layers, unless the pass is built
with ``learn_8bit=True``: then every quantized layer of every block is learned, 8-bit ones on their 8-bit grids.
The pipeline does that when no weight is below 8 bits but some activation is (w8a4): the layers cannot fix
their own rounding much there, but their floor/ceil choices and biases can adapt to the low-bit activation
quantizers around them, which is what the blocks add at w4a4 too (MobileNetV2 w8a4 val500 top-1 63.8 without
blocks, 71.8 with them).
"""

from __future__ import annotations

__all__ = ["ReconstructBlocksPass", "find_blocks", "reconstructed_blocks"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc import progress, simulate
from ptqc.annotations import ACT, WEIGHT
from ptqc.blockrec import SUPPORTED, Block, Layer, Program, Windows, conv_spec, reconstruct, sample_windows
from ptqc.data import Dataset
from ptqc.passes.emit_qdq import container
from ptqc.passes.fold_batchnorm import const

logger = logging.getLogger(__name__)

WINDOWS_PER_IMAGE = 128


def _shape_only(node: ir.Node) -> bool:
    """A node computing integer shape data (Shape, and Gather/Unsqueeze/Concat on its output): not a data path."""
    return bool(node.outputs) and all(o.dtype is not None and not o.dtype.is_floating_point() for o in node.outputs)


def _segments(graph: ir.Graph) -> list[list[ir.Node]]:
    """The graph's nodes split at every tensor that is, at that point of the topological order, the only float
    tensor still to be read (a cut every data path goes through).  Shape computations are left out: a dynamic
    batch Reshape at the end would otherwise keep a Shape of the input live through the whole network."""
    nodes = [n for n in graph if not _shape_only(n)]
    pos = {id(n): i for i, n in enumerate(nodes)}
    outputs = {v.name for v in graph.outputs}
    last: dict[str, int] = {}
    for v in list(graph.inputs) + [o for n in nodes for o in n.outputs]:
        if v.name in graph.initializers:
            continue
        uses = [pos[id(u.node)] for u in v.uses() if id(u.node) in pos]
        last[v.name] = len(nodes) if v.name in outputs else max(uses, default=-1)
    live = {v.name for v in graph.inputs if v.name not in graph.initializers and last.get(v.name, -1) >= 0}
    segments, current = [], []
    for i, node in enumerate(nodes):
        current.append(node)
        live |= {o.name for o in node.outputs if last.get(o.name, -1) > i}
        live -= {name for name in list(live) if last[name] <= i}
        if len(live) == 1:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def find_blocks(graph: ir.Graph, quantized_input: bool = True) -> list[Block]:
    """Blocks for reconstruction, in topological order (see the module docstring).  With
    ``quantized_input=False`` a block's input need not have its quantizer's exponent yet."""
    blocks, current = [], []

    def close():
        nonlocal current
        if any(n.op_type == "Conv" for n in current):
            try:
                blocks.append(Block(current, quantized_input))
            except ValueError as exc:
                logger.debug("not a block (%s): %s", exc, [n.name for n in current])
        current = []

    for seg in _segments(graph):
        ok = all(n.op_type in SUPPORTED for n in seg) and all(
            conv_spec(n) is not None and WEIGHT in n.meta for n in seg if n.op_type == "Conv")
        if not ok:
            close()
            continue
        current.extend(seg)
        convs = [n for n in current if n.op_type == "Conv"]
        uses = current[-1].outputs[0].uses()
        activation_follows = len(uses) == 1 and uses[0].node.op_type in ("Relu", "Clip")
        if len(convs) >= 2 and not conv_spec(convs[-1]).depthwise and not activation_follows:
            close()
    close()
    return blocks


def reconstructed_blocks(graph: ir.Graph, learn_8bit: bool = False) -> list[tuple[Block, ir.Node]]:
    """The blocks this pass refines, each with its head: a layer that reads the block input directly (the
    simulation exposes layer inputs, so a block whose input only reaches a Relu/Clip or an Add first is left
    alone), and only blocks with a layer below 8 bits (with ``learn_8bit``, every block with a quantized layer)."""
    out = []
    for b in find_blocks(graph):
        head = next((n for n in b.layers if n.inputs[0].name == b.input), None)
        if head is not None and any(n.meta[WEIGHT].q is not None and (learn_8bit or n.meta[WEIGHT].bits < 8)
                                    for n in b.layers):
            out.append((b, head))
    return out


def _border_tensors(block: Block, values: dict[str, ir.Value]) -> dict[str, tuple[int, int]]:
    """The block's inner activations below 8 bits that can take a rounding border (a channel axis, more than
    one code, and every reader inside the block), each with its border table's shape (levels, channels)."""
    inner = {n.name for n in block.nodes}
    names = {}
    for name in block.quant:
        v = values.get(name)
        if name in (block.input, block.output) or v is None or v.meta[ACT].bits >= 8:
            continue
        if v.shape is None or len(v.shape) < 2 or not isinstance(v.shape[1], int):
            continue
        zp, lo, hi = container(v.meta[ACT])
        if hi > lo and all(u.node.name in inner for u in v.uses()):
            names[name] = (hi - lo, v.shape[1])
    return names


def _float(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    w = const(node.inputs[1]).astype(np.float64)
    b = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return w, (np.zeros(w.shape[0]) if b is None else b.astype(np.float64).reshape(-1))


def _join(parts: list[Windows]) -> Windows:
    """The windows of every batch as one set.  Each field of ``parts`` is dropped once joined, so the pass holds
    at most one field twice, not all of them (the last MobileNetV1 blocks' 768-channel input windows are 0.8 GB
    per field at 16384 windows)."""
    fields = {}
    for field in ("x_q", "x_f", "y_f"):
        fields[field] = np.concatenate([getattr(p, field) for p in parts])
        for p in parts:
            setattr(p, field, None)
    masks = {k: np.concatenate([p.masks[k] for p in parts]) for k in parts[0].masks}
    return Windows(fields["x_q"], fields["x_f"], masks, fields["y_f"])


class ReconstructBlocksPass(ir.passes.InPlacePass):
    """Refine low-bit layers block by block, on the block output error with activation quantization inside."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int = 128, iters: int = 300,
                 windows: int = 16384, out: int = 2, batch: int = 128, seed: int = 0, learn_8bit: bool = False,
                 freeze: float = 0.0, borders: bool = False):
        super().__init__()
        self.borders = borders
        self.learn_8bit = learn_8bit
        self.freeze = freeze
        self.data = data
        self.batch_size = batch_size
        self.samples = samples
        self.iters = iters
        self.windows = windows
        self.out = out
        self.batch = batch
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks = [b for b, _ in reconstructed_blocks(graph, self.learn_8bit)]
        if not blocks:
            return ir.passes.PassResult(model, modified=False)
        quantized = [n for n in graph if WEIGHT in n.meta and n.meta[WEIGHT].q is not None]
        # the inputs of every block, quantized and float, for all the images; moved from block to block
        values = {v.name: v for v in simulate.planned_values(model)} if self.borders else {}
        bordered = {b.output: _border_tensors(b, values) for b in blocks} if self.borders else {}
        stream = simulate.CutInputs(model, quantized, quantized=True,
                                    batches=list(self.data.head(self.samples, self.batch_size)),
                                    border_inputs=sorted({n for names in bordered.values() for n in names}))
        rng = np.random.default_rng(self.seed)
        before = after = 0.0
        for block in progress.steps(blocks, "block reconstruction", unit="block"):
            prog = Program(block, self.out)
            stream.advance(block.input)
            # the float model's block output, read off at the windows, is the target
            targets = stream.floats([block.output])
            parts = []
            # at most WINDOWS_PER_IMAGE from one image: its windows overlap, so more add little
            per_batch = -(-self.windows // len(stream.batches))
            for x_q, x_f, (y_f,) in zip(stream.x_q, stream.x_f, targets):
                parts.append(sample_windows(block, prog.win, x_q, x_f,
                                            min(per_batch, WINDOWS_PER_IMAGE * len(x_q)), rng, y_f))
            del targets
            data = _join(parts)
            del parts
            float_weights = {n.name: _float(n) for n in block.layers}
            fixed, learn = {}, {}
            for n in block.layers:
                wq = n.meta[WEIGHT]
                if wq.q is None:
                    fixed[n.name] = float_weights[n.name]
                elif wq.bits >= 8 and not self.learn_8bit:
                    fixed[n.name] = (wq.dequantized(), wq.bias.astype(np.float64))
                else:
                    k, e, z = wq.codes()
                    learn[n.name] = Layer(float_weights[n.name][0], np.exp2(e.astype(np.float64)).reshape(-1, 1, 1, 1),
                                          wq.bits, k.astype(np.float64), wq.bias.astype(np.float64),
                                          z.reshape(-1, 1, 1, 1))
            start = {n: np.full(shape, 0.5) for n, shape in bordered.get(block.output, {}).items()}
            res = reconstruct(prog, data, float_weights, fixed, learn, iters=self.iters, batch=self.batch,
                              seed=self.seed, freeze=self.freeze, borders=start or None)
            for name, border in res.borders.items():
                values[name].meta[ACT].border = np.ascontiguousarray(border.T)
                stream.set_border(name, values[name].meta[ACT].border)
            before, after = before + res.before, after + res.after
            logger.debug("block %s..%s: output error %.4g -> %.4g", block.layers[0].name, block.layers[-1].name,
                         res.before, res.after)
            for n in block.layers:
                if n.name in learn:
                    wq = n.meta[WEIGHT]
                    wq.set_codes(res.codes[n.name], wq.codes()[1], wq.offset)
                    wq.bias = np.asarray(res.bias[n.name], np.float64).reshape(-1)
                    if res.after < res.before:
                        wq.methods.append("block-recon")
                if n.meta[WEIGHT].q is not None:
                    stream.fix(n)
        logger.info("block reconstruction on %d blocks: summed output error %.4g -> %.4g", len(blocks), before, after)
        model.graph.meta["ptqc.block_loss"] = (before, after)
        return ir.passes.PassResult(model, modified=True)
