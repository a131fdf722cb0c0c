"""Block reconstruction in numpy: AdaRound over several layers at once, activation quantization in the loop.

A *block* is a run of Conv / Relu / Clip / Add nodes with one input tensor and one output tensor (an inverted
residual block, a depthwise-pointwise pair).  Layer-wise rounding fits each layer to its own output; here the
rounding of every low-bit layer in the block is learned against the block's output, so that a layer can
compensate the rounding of the layers and the activation quantizers before it (BRECQ, with QDrop's random
dropping of activation quantization).

The block is evaluated on small spatial *windows*, not whole feature maps.  One output window of ``out x out``
positions depends on a window of each tensor inside the block (the receptive field); positions of a window
that fall outside the feature map are the convolutions' zero padding, so each computed tensor is multiplied by
a mask of the positions inside its map.  The window forward is therefore exact: it computes what the whole
block computes at those output positions, on a small fraction of the work.  Windows are NHWC.

The forward and its gradient (matmuls for dense convolutions, multiply-adds over the taps for depthwise ones,
straight-through estimates through the activation quantizers) are written out by hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ptqc.adaround import GAMMA, ZETA, _h, _init_v, adam_step
from ptqc.annotations import ACT
from ptqc.passes.emit_qdq import container
from ptqc.passes.fold_batchnorm import const
from ptqc.quant import BORDER_STEPS, int_range

SUPPORTED = ("Conv", "Relu", "Clip", "Add")
FROZEN = 12.0  # |v| of a hardened rounding variable: h(v) is exactly 0 or 1 (and flat) well before it


@dataclasses.dataclass
class Conv:
    name: str
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    depthwise: bool


@dataclasses.dataclass
class Window:
    """Rows (index 0) and columns (index 1) of a tensor a block needs for an output window at origin o:
    ``scale * o + offset`` .. ``+ size - 1``."""

    scale: np.ndarray
    offset: np.ndarray
    size: np.ndarray


def conv_spec(node: ir.Node) -> Conv | None:
    """Conv attributes the window engine supports (2-D, no dilation, dense or depthwise), else None."""
    w = const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 4:
        return None
    a = node.attributes
    if a.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or tuple(a.get_ints("dilations", (1, 1))) != (1, 1):
        return None
    group = a.get_int("group", 1)
    depthwise = group > 1 and group == w.shape[0] and w.shape[1] == 1
    if group > 1 and not depthwise:
        return None
    return Conv(node.name, (w.shape[2], w.shape[3]), tuple(a.get_ints("strides", (1, 1))),
                tuple(a.get_ints("pads", (0, 0, 0, 0))), depthwise)


def clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    if node.op_type == "Relu":
        return 0.0, None
    lo = const(node.inputs[1]) if len(node.inputs) > 1 else None
    hi = const(node.inputs[2]) if len(node.inputs) > 2 else None
    lo = node.attributes.get_float("min", None) if lo is None else float(lo)
    hi = node.attributes.get_float("max", None) if hi is None else float(hi)
    return lo, hi


def quantizer(value: ir.Value) -> tuple[float, float, float] | None:
    """(step, lo, hi) of a planned activation, in float, exactly as the emitted QDQ graph computes it."""
    act = value.meta.get(ACT)
    if act is None or act.exp is None:
        return None
    zp, lo, hi = container(act)
    s = 2.0**act.exp
    return s, (lo - zp) * s, (hi - zp) * s


class Block:
    """A single-input, single-output run of Conv/Relu/Clip/Add nodes, in topological order."""

    def __init__(self, nodes: list[ir.Node], quantized_input: bool = True):
        self.nodes = nodes
        produced = {v.name for n in nodes for v in n.outputs}
        inputs = {n.inputs[0].name for n in nodes if n.op_type in ("Conv", "Relu", "Clip")}
        inputs |= {v.name for n in nodes if n.op_type == "Add" for v in n.inputs}
        external = sorted(inputs - produced)
        if len(external) != 1:
            raise ValueError(f"a block needs one input tensor, got {external}")
        self.input = external[0]
        value = next(v for n in nodes for v in n.inputs if v is not None and v.name == self.input)
        if quantized_input and quantizer(value) is None:
            raise ValueError(f"the block input {self.input} is not a quantized activation")
        self.output = nodes[-1].outputs[0].name
        self.convs = {n.name: conv_spec(n) for n in nodes if n.op_type == "Conv"}
        if any(c is None for c in self.convs.values()):
            raise ValueError("unsupported Conv in block")
        self.layers = [n for n in nodes if n.op_type == "Conv"]
        self.quant = {v.name: q for n in nodes for v in n.outputs if (q := quantizer(v)) is not None}
        self.bounds = {n.name: clip_bounds(n) for n in nodes if n.op_type in ("Relu", "Clip")}

    # --- geometry -------------------------------------------------------------------------------------
    def plan(self, out: int) -> dict[str, Window]:
        """The window of every tensor for an ``out x out`` output window (origin o = 0 at scale 1)."""
        win = {self.output: Window(np.ones(2, int), np.zeros(2, int), np.full(2, out))}
        for node in reversed(self.nodes):
            for name, w in self.needs(node, win[node.outputs[0].name]).items():
                have = win.get(name)
                if have is None:
                    win[name] = Window(w.scale.copy(), w.offset.copy(), w.size.copy())
                    continue
                if not np.array_equal(have.scale, w.scale):
                    raise ValueError(f"{name}: consumers at different strides")
                lo = np.minimum(have.offset, w.offset)
                hi = np.maximum(have.offset + have.size, w.offset + w.size)
                win[name] = Window(have.scale, lo, hi - lo)
        return win

    def needs(self, node: ir.Node, w_out: Window) -> dict[str, Window]:
        """The window of each data input that ``node`` reads to produce ``w_out``."""
        if node.op_type == "Conv":
            c = self.convs[node.name]
            s, k, p = np.array(c.strides), np.array(c.kernel), np.array(c.pads[:2])
            return {node.inputs[0].name: Window(w_out.scale * s, w_out.offset * s - p, (w_out.size - 1) * s + k)}
        data = node.inputs if node.op_type == "Add" else node.inputs[:1]
        return {v.name: w_out for v in data}

    def map_sizes(self, in_hw: tuple[int, int]) -> dict[str, np.ndarray]:
        sizes = {self.input: np.array(in_hw)}
        for node in self.nodes:
            x = sizes[node.inputs[0].name]
            if node.op_type == "Conv":
                c = self.convs[node.name]
                p = np.array(c.pads[:2]) + np.array(c.pads[2:])
                x = (x + p - np.array(c.kernel)) // np.array(c.strides) + 1
            sizes[node.outputs[0].name] = x
        return sizes


@dataclasses.dataclass
class Windows:
    """Sampled windows of one block: its input (quantized and float model), masks of every tensor, and (when
    sampled with the float model's block output) the float output window."""

    x_q: np.ndarray  # (n, h, w, c) float32
    x_f: np.ndarray
    masks: dict[str, np.ndarray]  # (n, h, w, 1) float32, 1 inside the feature map
    y_f: np.ndarray | None = None  # (n, out, out, c) float32

    def take(self, idx: np.ndarray) -> Windows:
        return Windows(self.x_q[idx], self.x_f[idx], {k: m[idx] for k, m in self.masks.items()},
                       None if self.y_f is None else self.y_f[idx])


def sample_windows(block: Block, win: dict[str, Window], x_q: np.ndarray, x_f: np.ndarray, count: int,
                   rng: np.random.Generator, y_f: np.ndarray | None = None) -> Windows:
    """``count`` random output windows over a batch of NCHW block inputs (quantized and float), and of the float
    block output ``y_f`` (NCHW) if given: the window forward's float result there, read off the whole map."""
    sizes = block.map_sizes(x_q.shape[2:])
    out = win[block.output]
    top = np.maximum(sizes[block.output] - out.size, 0)
    img = rng.integers(0, x_q.shape[0], size=count)
    oy = rng.integers(0, top[0] + 1, size=count)
    ox = rng.integers(0, top[1] + 1, size=count)
    w_in = win[block.input]
    pad = int(max(0, -w_in.offset.min(), (w_in.offset + w_in.size).max()))  # generous: origins start inside
    pq = np.pad(x_q, ((0, 0), (0, 0), (pad, pad + w_in.size[0]), (pad, pad + w_in.size[1])))
    pf = np.pad(x_f, ((0, 0), (0, 0), (pad, pad + w_in.size[0]), (pad, pad + w_in.size[1])))
    r0 = w_in.scale[0] * oy + w_in.offset[0] + pad
    c0 = w_in.scale[1] * ox + w_in.offset[1] + pad
    ry = r0[:, None] + np.arange(w_in.size[0])[None]
    cx = c0[:, None] + np.arange(w_in.size[1])[None]
    # advanced indices around a slice: numpy puts the indexed dims first -> (n, h, w, c)
    wq = pq[img[:, None, None], :, ry[:, :, None], cx[:, None, :]]
    wf = pf[img[:, None, None], :, ry[:, :, None], cx[:, None, :]]
    masks = {}
    for name, w in win.items():
        if name == block.input:
            continue
        rows = w.scale[0] * oy[:, None] + w.offset[0] + np.arange(w.size[0])[None]
        cols = w.scale[1] * ox[:, None] + w.offset[1] + np.arange(w.size[1])[None]
        inside_r = (rows >= 0) & (rows < sizes[name][0])
        inside_c = (cols >= 0) & (cols < sizes[name][1])
        masks[name] = (inside_r[:, :, None] & inside_c[:, None, :])[..., None].astype(np.float32)
    target = None
    if y_f is not None:
        py = np.pad(y_f, ((0, 0), (0, 0), (0, out.size[0]), (0, out.size[1])))  # a map smaller than the window
        ry = oy[:, None] + np.arange(out.size[0])[None]
        cx = ox[:, None] + np.arange(out.size[1])[None]
        target = np.ascontiguousarray(py[img[:, None, None], :, ry[:, :, None], cx[:, None, :]], np.float32)
    return Windows(np.ascontiguousarray(wq, np.float32), np.ascontiguousarray(wf, np.float32), masks, target)


# --- forward and backward ----------------------------------------------------------------------------
def _taps(x: np.ndarray, c: Conv, out_hw) -> list[tuple[int, int, np.ndarray]]:
    sh, sw = c.strides
    ho, wo = out_hw
    return [(ky, kx, x[:, ky : ky + (ho - 1) * sh + 1 : sh, kx : kx + (wo - 1) * sw + 1 : sw])
            for ky in range(c.kernel[0]) for kx in range(c.kernel[1])]


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, c: Conv, out_hw) -> np.ndarray:
    """NHWC window convolution without padding; w in ONNX layout (O, I/g, kh, kw)."""
    taps = _taps(x, c, out_hw)
    dt = x.dtype
    if c.depthwise:
        y = np.zeros(taps[0][2].shape, dt)
        for ky, kx, t in taps:
            y += t * w[:, 0, ky, kx].astype(dt)
        return y + b.astype(dt)
    cols = taps[0][2] if len(taps) == 1 else np.concatenate([t for _, _, t in taps], axis=-1)
    wmat = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).astype(dt)
    # one 2-D product: numpy runs a 4-D ``cols @ wmat.T`` as one small GEMM per (image, row), about ten times
    # slower on these windows, and that was most of block reconstruction's time
    y = cols.reshape(-1, cols.shape[-1]) @ wmat.T
    y += b.astype(dt)
    return y.reshape(cols.shape[:3] + (w.shape[0],))


def conv_backward(g: np.ndarray, x: np.ndarray, w: np.ndarray, c: Conv, need_dx: bool, need_dw: bool = True):
    """Gradients in the weights (ONNX layout), the bias and (if asked) the input window; without ``need_dw``
    only the input's (the weights' and the bias's are None)."""
    out_hw = g.shape[1:3]
    taps = _taps(x, c, out_hw)
    sh, sw = c.strides
    ho, wo = out_hw
    dx = np.zeros_like(x) if need_dx else None
    dw = np.zeros(w.shape, np.float64) if need_dw else None
    if c.depthwise:
        for ky, kx, t in taps:
            if need_dw:
                dw[:, 0, ky, kx] = np.einsum("nhwc,nhwc->c", g, t, optimize=False)
            if need_dx:
                dx[:, ky : ky + (ho - 1) * sh + 1 : sh, kx : kx + (wo - 1) * sw + 1 : sw] += g * w[:, 0, ky, kx].astype(x.dtype)
    else:
        cin = x.shape[-1]
        g2 = g.reshape(-1, g.shape[-1])
        if need_dw:
            cols = taps[0][2] if len(taps) == 1 else np.concatenate([t for _, _, t in taps], axis=-1)
            dmat = g2.T @ cols.reshape(-1, cols.shape[-1])
            dw[:] = dmat.reshape(w.shape[0], c.kernel[0], c.kernel[1], cin).transpose(0, 3, 1, 2)
        if need_dx:
            wmat = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).astype(x.dtype)
            dcols = (g2 @ wmat).reshape(g.shape[:3] + (-1,))
            for i, (ky, kx, _) in enumerate(taps):
                dx[:, ky : ky + (ho - 1) * sh + 1 : sh, kx : kx + (wo - 1) * sw + 1 : sw] += dcols[..., i * cin : (i + 1) * cin]
    db = g.sum(axis=(0, 1, 2)).astype(np.float64) if need_dw else None
    return dw, db, dx


_BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


def select(dst: np.ndarray, src: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``dst`` with ``src``'s elements where ``where`` holds, in place: ``np.copyto(dst, src, where=where)``, bit
    for bit.  For float arrays it blends the bit patterns under an all-ones mask instead, about three times
    faster than numpy's masked copy on QDrop's random masks, which was the widest tensors' costliest pass."""
    bits = _BITS.get(dst.dtype)
    if bits is None or src.dtype != dst.dtype or src.shape != dst.shape or not dst.flags.c_contiguous \
            or not src.flags.c_contiguous:
        np.copyto(dst, src, where=where)
        return dst
    mask = np.negative(where.astype(bits))  # all ones where src is taken
    d, s = dst.view(bits), src.view(bits)
    diff = np.bitwise_xor(d, s)
    diff &= mask
    d ^= diff
    return dst


#: half-width, in steps, of the triangular kernel that spreads a border's gradient over the fractions near it
BORDER_WIDTH = 0.1


def border_round(y: np.ndarray, s: float, lo: float, hi: float, border: np.ndarray):
    """``y`` on the grid ``s * [lo/s, hi/s]``, each element rounded up from its level ``k = floor(y / s)`` when its
    fraction reaches ``border[k - lo/s, c]`` (channels last): ``ptqc.quant.border_codes``' rule, and the written
    model's (``ptqc.borders``), in the window's dtype.  With a power-of-two ``s`` and borders on a 1/2^n grid every
    step is exact, so the result equals theirs bit for bit.  Also returns what :func:`border_grad` needs: each
    element's fraction, its border, and its (level, channel) cell."""
    dt = y.dtype.type
    lo_k, hi_k = int(round(lo / s)), int(round(hi / s))
    u = np.multiply(y, dt(1.0 / s)) if np.frexp(s)[0] == 0.5 else np.divide(y, dt(s))
    np.clip(u, lo_k, hi_k, out=u)
    k = np.floor(u)
    np.minimum(k, hi_k - 1, out=k)
    frac = np.subtract(u, k, out=u)
    channels = y.shape[-1]
    cell = (k - lo_k).astype(np.int32)
    cell *= channels
    cell += np.arange(channels, dtype=np.int32)
    b = np.take(np.asarray(border, dt).reshape(-1), cell)
    k += frac >= b
    k *= dt(s)
    return k, (frac, b, cell, dt(s), border.shape)


def border_grad(g: np.ndarray, frac: np.ndarray, b: np.ndarray, cell: np.ndarray, s, shape) -> np.ndarray:
    """The gradient of the loss in each border, from ``g``, its gradient at the rounded output.  Raising a border
    by ``d`` moves the elements whose fraction lies within ``d`` above it one step down (``-s`` each), so the
    gradient is ``-s`` times the sum of ``g`` over the elements at the border: a first-order estimate, spread by a
    triangular kernel of half-width ``BORDER_WIDTH`` over the nearby fractions."""
    d = np.abs(frac - b)
    near = d < BORDER_WIDTH
    weight = (1.0 - d[near] / BORDER_WIDTH) * g[near] * (-s / BORDER_WIDTH)
    return np.bincount(cell[near], weights=weight.astype(np.float64), minlength=int(np.prod(shape))).reshape(shape)


def _crop(x: np.ndarray, have: Window, need: Window) -> np.ndarray:
    d = need.offset - have.offset
    return x[:, d[0] : d[0] + need.size[0], d[1] : d[1] + need.size[1]]


class Program:
    """A block's window forward and backward, with each layer's weights given as arrays."""

    def __init__(self, block: Block, out: int):
        self.block = block
        self.win = block.plan(out)
        # node -> input name -> window it reads
        self.need = {node.name: block.needs(node, self.win[node.outputs[0].name]) for node in block.nodes}

    def forward(self, x: np.ndarray, masks: dict[str, np.ndarray], weights: dict[str, tuple[np.ndarray, np.ndarray]],
                quantize: bool, drop: float = 0.0, rng: np.random.Generator | None = None,
                quant: dict[str, tuple] | None = None, record: bool = True,
                borders: dict[str, np.ndarray] | None = None):
        """Output window, and the tape for :meth:`backward` (only with ``record``; without it the masks the
        backward needs are not computed).  ``drop`` is QDrop's chance that an element of an inner activation
        skips its quantizer.  ``quant`` replaces the block's own inner quantizers by ``(step, lo, hi)`` (scalars,
        or arrays per channel): :meth:`backward` then also gives the gradient in each step, with ``lo`` and
        ``hi`` moving with it (a fixed code range).  ``borders`` rounds the inner tensors it names at AQuant
        borders instead of 0.5 (:func:`border_round`; one row per level, one column per channel), and
        :meth:`backward` then also gives their gradient, under ``"<tensor>/border"``."""
        if borders and drop > 0:
            raise ValueError("rounding borders are learned with every element quantized (drop=0)")
        learn_steps = quant is not None
        quant = self.block.quant if quant is None else quant
        vals = {self.block.input: x}
        tape = {}
        for node in self.block.nodes:
            ins = [_crop(vals[name], self.win[name], w) for name, w in self.need[node.name].items()]
            out = node.outputs[0].name
            if node.op_type == "Conv":
                w, b = weights[node.name]
                y = conv_forward(ins[0], w, b, self.block.convs[node.name], self.win[out].size)
            elif node.op_type == "Add":
                y = ins[0] + (ins[1] if len(ins) > 1 else ins[0])
            else:
                lo, hi = self.block.bounds[node.name]
                if record:
                    passes = None if lo is None else ins[0] > lo
                    if hi is not None:
                        passes = ins[0] < hi if passes is None else np.logical_and(passes, ins[0] < hi, out=passes)
                    tape[node.name] = np.ones(ins[0].shape, bool) if passes is None else passes
                y = np.clip(ins[0], lo, hi)
            q = quant.get(out) if quantize and out != self.block.output else None
            if q is not None:
                clip_lo, clip_hi = self.block.bounds.get(node.name, (None, None))
                s, lo, hi = q
                # a Relu/Clip output inside the quantizer's range never saturates it: no straight-through mask
                # (all true), and no clip after rounding when the range's ends are on the grid
                inside = (clip_lo is not None and clip_hi is not None and np.ndim(lo) == 0 and np.ndim(hi) == 0
                          and lo <= clip_lo and clip_hi <= hi)
                if record and (learn_steps or not inside):
                    tape[out + "/ste"] = (y >= lo) & (y <= hi)
                if learn_steps and record:
                    tape[out + "/pre"] = (y, q)
                exact = np.ndim(s) == 0 and np.frexp(s)[0] == 0.5 and y.dtype.type(s) == s
                if borders is not None and out in borders:
                    yq, cells = border_round(y, s, lo, hi, borders[out])
                    if record:
                        tape[out + "/border"] = cells
                elif exact and np.isfinite(y.dtype.type(1.0 / s)):
                    # a power-of-two step the window's dtype holds, and its reciprocal: in place, in that dtype;
                    # the same values as below, with a third of the passes over the widest tensors
                    yq = np.multiply(y, y.dtype.type(1.0 / s))
                    np.round(yq, out=yq)
                    yq *= y.dtype.type(s)
                    if not (inside and np.round(lo / s) * s == lo and np.round(hi / s) * s == hi):
                        np.clip(yq, lo, hi, out=yq)
                else:
                    yq = np.clip(np.round(y / s) * s, lo, hi).astype(y.dtype)
                if drop > 0:
                    keep = np.frombuffer(rng.bytes(y.size), np.uint8).reshape(y.shape) < int(round(256 * drop))
                    select(yq, y, keep)
                y = yq
            if out in masks:
                y *= masks[out]  # y is this node's own new array (conv, sum, clip or quantizer output)
            vals[out] = y
        return vals[self.block.output], (vals, tape)

    def backward(self, grad: np.ndarray, state, masks, weights,
                 weight_grads: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Gradients of every Conv's weights and bias (not with ``weight_grads=False``), given the gradient at
        the output window; and, under ``"<tensor>/step"``, of every inner quantizer's step, under
        ``"<tensor>/border"`` of every rounding border the forward used."""
        vals, tape = state
        grads = {self.block.output: grad.copy()}  # the output window: small; the masks below apply in place
        out_grads = {}
        for node in reversed(self.block.nodes):
            out = node.outputs[0].name
            g = grads.pop(out, None)
            if g is None:
                continue
            # g is this function's own array (a copy of the output gradient, or an accumulator built below),
            # so the masks apply in place
            if out in masks:
                g *= masks[out]
            ste = tape.get(out + "/ste")
            if ste is not None and out + "/pre" in tape:
                y, (s, lo, hi) = tape[out + "/pre"]
                # d quantizer / d step: the rounding residue inside, the code bound where it saturates
                dq = np.where(ste, np.round(y / s) - y / s, np.where(y > hi, hi / s, lo / s))
                axes = (0, 1, 2) if np.ndim(s) else None
                out_grads[out + "/step"] = np.sum((g * dq).astype(np.float64), axis=axes)
            cells = tape.get(out + "/border")
            if cells is not None:
                out_grads[out + "/border"] = border_grad(g, *cells)
            if ste is not None:
                np.multiply(g, ste, out=g)
            needs = self.need[node.name]
            if node.op_type == "Conv":
                name = next(iter(needs))
                x = _crop(vals[name], self.win[name], needs[name])
                w, _ = weights[node.name]
                need_dx = name != self.block.input
                dw, db, dx = conv_backward(g, x, w, self.block.convs[node.name], need_dx, weight_grads)
                if weight_grads:
                    out_grads[node.name] = (dw, db)
                parts = [(name, dx)] if need_dx else []
            elif node.op_type == "Add":
                parts = [(name, g) for name in needs if name != self.block.input]
            else:
                name = next(iter(needs))
                parts = [] if name == self.block.input else [(name, np.multiply(g, tape[node.name], out=g))]
            for name, gi in parts:
                full = grads.get(name)
                if full is None and len(parts) == 1 and gi.shape == vals[name].shape:
                    grads[name] = gi  # the whole window: no accumulator to fill (gi is not used again)
                    continue
                if full is None:
                    full = grads[name] = np.zeros(vals[name].shape, vals[name].dtype)
                d = needs[name].offset - self.win[name].offset
                full[:, d[0] : d[0] + gi.shape[1], d[1] : d[1] + gi.shape[2]] += gi
        return out_grads


@dataclasses.dataclass
class Layer:
    """One low-bit Conv whose rounding is learned: ``W~ = s * (clip(base + h(V), qmin, qmax) + z)``."""

    w: np.ndarray  # float weights (O, I, kh, kw), float64
    s: np.ndarray  # (O, 1, 1, 1)
    bits: int
    codes: np.ndarray  # starting integer codes
    bias: np.ndarray  # starting bias (O,)
    z: np.ndarray | float = 0.0  # grid offsets (O, 1, 1, 1): a code k stands for s (k + z)


@dataclasses.dataclass
class Result:
    codes: dict[str, np.ndarray]
    bias: dict[str, np.ndarray]
    before: float
    after: float
    borders: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (levels, channels), learned ones


#: Adam's step size for the rounding borders, in steps of the activation grid
BORDER_LR = 0.01
#: Adam steps of :func:`fit_borders`
BORDER_ITERS = 100


def _loss(prog: Program, data: Windows, weights, target: np.ndarray, lo, hi, chunk: int = 512,
          borders: dict[str, np.ndarray] | None = None) -> float:
    total = 0.0
    for i in range(0, data.x_q.shape[0], chunk):
        sl = slice(i, i + chunk)
        y, _ = prog.forward(data.x_q[sl], {k: m[sl] for k, m in data.masks.items()}, weights, quantize=True,
                            record=False, borders=borders)
        total += float(np.sum((np.clip(y, lo, hi) - target[sl]).astype(np.float64) ** 2))
    return total / target.size


def _output_grad(y: np.ndarray, target: np.ndarray, lo, hi, scale: float) -> np.ndarray:
    """The gradient of the block loss ``mean((clip(y, lo, hi) - target)^2) / scale`` in the output window ``y``."""
    diff = np.clip(y, lo, hi) - target
    g = (2.0 / (diff.size * scale)) * diff
    if lo is not None:
        g = g * (y > lo)
    if hi is not None:
        g = g * (y < hi)
    return g.astype(np.float32)


def fit_borders(prog: Program, data: Windows, weights, target: np.ndarray, lo, hi, start: dict[str, np.ndarray],
                pool: np.ndarray | None = None, iters: int = BORDER_ITERS, batch: int = 128,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """AQuant's rounding borders (tensor -> levels x channels) of the block's inner activations named in
    ``start``, learned by Adam (``BORDER_LR``, gradient :func:`border_grad`) on the block output error with
    ``weights`` fixed, on the windows ``pool`` (all of them by default); every element quantized and the input
    quantized, as at inference.  Each border stays in ``[1, BORDER_STEPS] / BORDER_STEPS`` and ends on that
    grid, where the written model's ops are exact."""
    rng = rng or np.random.default_rng(0)
    pool = np.arange(data.x_q.shape[0]) if pool is None else pool
    scale = max(float(np.mean(target[pool].astype(np.float64) ** 2)), 1e-12)
    low = 1.0 / BORDER_STEPS
    # p: Adam's variable; the borders in use are clip(p), so a p pushed past an end can come back
    state = {name: dict(p=np.asarray(b0, np.float64).copy(), m=[0.0, 0.0]) for name, b0 in start.items()}
    for it in range(iters):
        idx = pool[rng.integers(0, pool.size, size=min(batch, pool.size))]
        sub = data.take(idx)
        current = {name: np.clip(st["p"], low, 1.0) for name, st in state.items()}
        y, tape = prog.forward(sub.x_q, sub.masks, weights, quantize=True, borders=current)
        g = _output_grad(y, target[idx], lo, hi, scale)
        grads = prog.backward(g, tape, sub.masks, weights, weight_grads=False)
        for name, st in state.items():
            adam_step(st["p"], grads[name + "/border"], st["m"], it + 1, BORDER_LR)
    return {name: np.clip(np.round(st["p"] * BORDER_STEPS), 1, BORDER_STEPS) / BORDER_STEPS
            for name, st in state.items()}


def reconstruct(prog: Program, data: Windows, float_weights: dict[str, tuple[np.ndarray, np.ndarray]],
                fixed: dict[str, tuple[np.ndarray, np.ndarray]], learn: dict[str, Layer], iters: int = 300,
                batch: int = 128, lr: float = 3e-2, drop: float = 0.5, lam: float = 0.01, warmup: float = 0.2,
                seed: int = 0, check: int = 4096, freeze: float = 0.0,
                borders: dict[str, np.ndarray] | None = None) -> Result:
    """Learn the rounding and bias of the ``learn`` layers so that the block's output on quantized (QDrop-mixed)
    input matches the float block's output on float input (``data.y_f``).  ``fixed`` layers keep their quantized
    weights.  The result is never worse than the starting codes on ``check`` of the quantized windows (drawn at
    random, evaluated without dropping): the error before and after on all of them took a third of the pass's
    time.  ``freeze`` is the share of the steps after the warm-up over which the rounding variables are hardened,
    a growing share of each layer's at every step (0: all at the end, as AdaRound does).

    ``borders`` (inner tensor -> starting borders, levels x channels): once the rounding is final, AQuant's
    rounding borders of those activations are learned on the block with its final weights (:func:`fit_borders`),
    on the windows outside the check, and kept (``Result.borders``) only if they lower the error on the check's
    windows.  Learned together with the rounding instead, under QDrop's mix, they lowered the block error less
    (MobileNetV2 w4a4, three blocks: -8%, -0.7%, -0.8% against -16%, -3%, -13%)."""
    rng = np.random.default_rng(seed)
    out_q = prog.block.quant.get(prog.block.output)
    lo, hi = (out_q[1], out_q[2]) if out_q is not None else (None, None)
    if data.y_f is None:
        raise ValueError("block reconstruction needs windows sampled with the float block output (y_f)")
    target = np.clip(data.y_f, lo, hi)
    scale = max(float(np.mean(target.astype(np.float64) ** 2)), 1e-12)
    state = {}
    for name, layer in learn.items():
        qmin, qmax = int_range(layer.bits, True)
        base = np.floor(layer.w / layer.s - layer.z)
        inside = (layer.codes == base) | (layer.codes == base + 1)
        frac = np.where(inside, np.where(layer.codes > base, 0.9, 0.1), layer.w / layer.s - layer.z - base)
        state[name] = dict(v=_init_v(frac), base=base, b=layer.bias.astype(np.float64).copy(), qmin=qmin, qmax=qmax,
                           mv=[0.0, 0.0], mb=[0.0, 0.0], frozen=np.zeros(base.shape, bool), hard=0,
                           b_lr=lr * max(float(np.sqrt(np.mean(float_weights[name][1] ** 2))), 1e-3) * 0.1)

    def hard(name) -> tuple[np.ndarray, np.ndarray]:
        st = state[name]
        return np.clip(st["base"] + (_h(st["v"]) >= 0.5), st["qmin"], st["qmax"]), st["b"]

    start = {**fixed, **{n: (l.s * (np.clip(l.codes, *int_range(l.bits, True)) + l.z), l.bias)
                         for n, l in learn.items()}}
    n = data.x_q.shape[0]
    probe = np.sort(rng.choice(n, size=min(n, check), replace=False))
    sub_p, target_p = data.take(probe), target[probe]
    before = _loss(prog, sub_p, start, target_p, lo, hi)
    count = max(1, int(warmup * iters))
    # progressive hardening: from the end of the warm-up until ``freeze`` of the way through the run, the most
    # decided rounding variables are set to their hard value (v at +-FROZEN, where the rectified sigmoid is flat),
    # a growing share each step, so that the ones still soft learn to compensate the ones already rounded
    stop = count + freeze * (iters - count)
    for it in range(iters):
        if freeze and it >= count:
            share = min(1.0, (it - count + 1) / max(1.0, stop - count))
            for st in state.values():
                want = int(np.ceil(share * st["v"].size)) - st["hard"]
                if want <= 0:
                    continue
                v = st["v"].reshape(-1)
                margin = np.where(st["frozen"].reshape(-1), -1.0, np.abs(_h(v) - 0.5))
                pick = np.argpartition(-margin, want - 1)[:want]
                v[pick] = np.where(_h(v[pick]) >= 0.5, FROZEN, -FROZEN)
                st["frozen"].reshape(-1)[pick] = True
                st["hard"] += want
                for m in st["mv"]:  # arrays since the first step (the warm-up has at least one)
                    m.reshape(-1)[pick] = 0.0
        idx = rng.integers(0, n, size=min(batch, n))
        sub = data.take(idx)
        pick = np.frombuffer(rng.bytes(sub.x_q.size), np.uint8).reshape(sub.x_q.shape) < 128
        x = select(sub.x_f, sub.x_q, pick)  # sub holds copies (take), so x_f can take the mix
        weights = dict(fixed)
        soft = {}
        for name, st in state.items():
            sig = 1.0 / (1.0 + np.exp(-st["v"]))
            h_raw = sig * (ZETA - GAMMA) + GAMMA
            q_soft = st["base"] + np.clip(h_raw, 0.0, 1.0)
            soft[name] = (sig, h_raw, q_soft)
            weights[name] = (learn[name].s * (np.clip(q_soft, st["qmin"], st["qmax"]) + learn[name].z), st["b"])
        y, tape = prog.forward(x, sub.masks, weights, quantize=True, drop=drop, rng=rng)
        grads = prog.backward(_output_grad(y, target[idx], lo, hi, scale), tape, sub.masks, weights)
        beta = 20.0 + (2.0 - 20.0) * (it - count) / max(1, iters - count)
        for name, st in state.items():
            sig, h_raw, q_soft = soft[name]
            dw, db = grads[name]
            dh = (ZETA - GAMMA) * sig * (1 - sig) * ((h_raw > 0) & (h_raw < 1))
            gv = dw * learn[name].s * ((q_soft >= st["qmin"]) & (q_soft <= st["qmax"])) * dh
            if freeze:
                gv[st["frozen"]] = 0.0
            if it >= count:
                h = np.clip(h_raw, 0.0, 1.0)
                tt = 2 * h - 1
                # the rounding term is lam * sum(1 - |2h - 1|^beta) / sqrt(layer size).  With the mean (/ size)
                # its pull towards 0 or 1 was too weak in 300 steps: in MobileNetV2's blocks 30-56% of the h
                # ended between 0.01 and 0.99 (3-11% with the square root), and the hard codes lost what the
                # soft ones had learned (block Conv_10..14 output error 8.40 -> 7.30, with the root 6.63)
                gv = gv - lam * beta * np.abs(tt) ** (beta - 1) * np.sign(tt) * 2 / np.sqrt(h.size) * dh
            adam_step(st["v"], gv, st["mv"], it + 1, lr)
            adam_step(st["b"], db, st["mb"], it + 1, st["b_lr"])
    final = {name: hard(name) for name in learn}
    end = {**fixed, **{n: (learn[n].s * (c + learn[n].z), b) for n, (c, b) in final.items()}}
    after = _loss(prog, sub_p, end, target_p, lo, hi)
    learned = {}
    if borders:
        # the borders see only windows the check does not use, so the check is a fair test of them
        pool = np.setdiff1d(np.arange(n), probe) if n > probe.size else np.arange(n)
        learned = fit_borders(prog, data, end, target, lo, hi, borders, pool, batch=batch, rng=rng)
        with_borders = _loss(prog, sub_p, end, target_p, lo, hi, borders=learned)
        if with_borders < after:
            after = with_borders
        else:
            learned = {}
    if after > before:
        return Result({n: l.codes for n, l in learn.items()}, {n: l.bias for n, l in learn.items()}, before, before)
    return Result({n: c for n, (c, _) in final.items()}, {n: b for n, (_, b) in final.items()}, before, after,
                  learned)
