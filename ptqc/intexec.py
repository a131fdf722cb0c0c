"""Run an integer program (:mod:`ptqc.intprog`) in numpy: int64 codes, int32 accumulators, shifts, saturation.

Only integers flow between steps.  The one float step is at each end: the graph input is quantized
(``round_half_even(x / 2^e)``, what onnxruntime's QuantizeLinear does at the data boundary), and a layer
whose output leaves as float (the logits) returns ``acc * 2^e``.

Convolutions and matrix products sum integer products through float64 BLAS.  That is exact: every partial
sum is an integer no larger than the worst-case accumulator, which ``ptqc verify`` requires to fit int32
(:func:`ptqc.intprog.accumulator_bounds`), so far below 2^53, and float64
represents such integers exactly, so the result equals integer accumulation bit for bit, only faster.
Every accumulator is checked against the int32 range; the first overflow is reported, not wrapped.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ptqc.intprog import INT32_MAX, Program, Step


@dataclasses.dataclass
class Overflow:
    step: str
    index: tuple[int, ...]
    value: int


@dataclasses.dataclass
class Outcome:
    values: dict[str, np.ndarray]
    overflows: list[Overflow]


def shift_round(acc: np.ndarray, k: np.ndarray | int, rounding: str) -> np.ndarray:
    """``acc * 2^k`` in integers: a left shift for k >= 0, else an arithmetic right shift by -k that rounds
    half to even or half up (add 2^(m-1), then shift)."""
    acc = np.asarray(acc, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    left = np.left_shift(acc, np.maximum(k, 0))
    m = np.maximum(-k, 0)
    if not np.any(m):
        return left
    m1 = np.maximum(m, 1)  # m = 0 entries are taken from `left`; keep the arithmetic defined there
    half = np.left_shift(np.int64(1), m1 - 1)
    if rounding == "half-up":
        right = np.right_shift(acc + half, m1)
    else:
        q = np.right_shift(acc, m1)
        r = acc - np.left_shift(q, m1)
        right = q + ((r > half) | ((r == half) & ((q & 1) == 1))).astype(np.int64)
    return np.where(k >= 0, left, right)


def _channel(arr: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along axis 1 of an ndim-dimensional tensor."""
    return np.asarray(arr).reshape((1, -1) + (1,) * (ndim - 2))


def conv2d(x: np.ndarray, w: np.ndarray, group: int, strides, pads, dilations) -> np.ndarray:
    """Integer 2-D convolution (no bias): int64 (N, C, H, W) codes, int (O, C/g, kh, kw) weights."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError("only 2-D convolutions are supported")
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
    wf = w.astype(np.float64)

    def tap(ky: int, kx: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
        return xp[:, c0:c1, ky * dh : ky * dh + (ho - 1) * sh + 1 : sh, kx * dw : kx * dw + (wo - 1) * sw + 1 : sw]

    if cg == 1 and group == c:  # depthwise (with channel multiplier o // c): one multiply-add per tap
        mult = o // c
        out = np.zeros((n, o, ho, wo))
        for ky in range(kh):
            for kx in range(kw):
                t = tap(ky, kx)
                if mult > 1:
                    t = np.repeat(t, mult, axis=1)
                out += t * wf[:, 0, ky, kx][None, :, None, None]
        return np.rint(out).astype(np.int64)
    og = o // group
    out = np.empty((n, o, ho * wo))
    for gi in range(group):
        taps = [tap(ky, kx, gi * cg, (gi + 1) * cg) for ky in range(kh) for kx in range(kw)]
        cols = np.stack(taps, axis=2).reshape(n, cg * kh * kw, ho * wo)  # (c, ky, kx) order, as w flattens
        out[:, gi * og : (gi + 1) * og] = np.matmul(wf[gi * og : (gi + 1) * og].reshape(og, -1), cols)
    return np.rint(out.reshape(n, o, ho, wo)).astype(np.int64)


def maxpool(x: np.ndarray, kernel, strides, pads, dilations, ceil_mode: int) -> np.ndarray:
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    size = []
    for length, k, s, d, p0, p1 in ((h, kh, sh, dh, top, bottom), (w, kw, sw, dw, left, right)):
        span = length + p0 + p1 - (k - 1) * d - 1
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= length + p0:
            out -= 1  # the last window must start inside the input or its left padding
        size.append(out)
    ho, wo = size
    need_b = max(bottom, (ho - 1) * sh + (kh - 1) * dh + 1 - h - top)
    need_r = max(right, (wo - 1) * sw + (kw - 1) * dw + 1 - w - left)
    low = np.iinfo(np.int64).min
    xp = np.pad(x, ((0, 0), (0, 0), (top, need_b), (left, need_r)), constant_values=low)
    out = np.full((n, c, ho, wo), low, dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            t = xp[:, :, ky * dh : ky * dh + (ho - 1) * sh + 1 : sh, kx * dw : kx * dw + (wo - 1) * sw + 1 : sw]
            np.maximum(out, t, out=out)
    return out


def _axes(step: Step, ins, idx: int = 1):
    if len(ins) > idx and ins[idx] is not None:
        return [int(a) for a in np.asarray(ins[idx]).reshape(-1)]
    return step.attrs.get("axes")


def _move(step: Step, ins: list) -> np.ndarray:
    """Data movement and int64 shape arithmetic, with ONNX semantics, on any dtype."""
    op, a, x = step.op, step.attrs, ins[0]
    if op in ("Identity", "Dropout"):
        return x
    if op == "Flatten":
        axis = a.get("axis", 1) % max(x.ndim, 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    if op == "Reshape":
        shape = [int(s) for s in np.asarray(ins[1]).reshape(-1)]
        if not a.get("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Transpose":
        return np.transpose(x, a.get("perm"))
    if op == "Squeeze":
        axes = _axes(step, ins)
        return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
    if op == "Unsqueeze":
        out = x
        axes = sorted(ax % (x.ndim + len(_axes(step, ins))) for ax in _axes(step, ins))
        for ax in axes:
            out = np.expand_dims(out, ax)
        return out
    if op == "Pad":
        pads = [int(p) for p in np.asarray(ins[1]).reshape(-1)]
        axes = _axes(step, ins, 3) or list(range(x.ndim))
        width = [(0, 0)] * x.ndim
        half = len(pads) // 2
        for i, ax in enumerate(axes):
            width[ax % x.ndim] = (pads[i], pads[i + half])
        if any(p < 0 for pw in width for p in pw):
            raise ValueError("negative pads are not supported")
        return np.pad(x, width)
    if op == "MaxPool":
        k = a["kernel_shape"]
        return maxpool(x, k, a.get("strides", [1] * len(k)), a.get("pads", [0] * 2 * len(k)),
                       a.get("dilations", [1] * len(k)), a.get("ceil_mode", 0))
    if op == "Shape":
        shape = np.array(x.shape, dtype=np.int64)
        return shape[a.get("start", 0) : a.get("end", None)]
    if op == "Gather":
        return np.take(x, np.asarray(ins[1]).astype(np.int64), axis=a.get("axis", 0))
    if op == "Concat":
        return np.concatenate([np.asarray(i) for i in ins], axis=a["axis"])
    if op == "Slice":
        starts, ends = np.asarray(ins[1]).reshape(-1), np.asarray(ins[2]).reshape(-1)
        axes = np.asarray(ins[3]).reshape(-1) if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
        steps = np.asarray(ins[4]).reshape(-1) if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), np.int64)
        sl = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            sl[int(ax)] = slice(int(s), int(min(e, np.iinfo(np.int64).max)), int(st))
        return x[tuple(sl)]
    if op == "Cast":
        return np.asarray(x).astype(np.int64)
    if op == "Softmax":
        axis = a.get("axis", -1)
        z = np.exp(x - x.max(axis=axis, keepdims=True))
        return z / z.sum(axis=axis, keepdims=True)
    raise ValueError(f"no executor for {op}")


class Executor:
    """Runs a :class:`Program` on float inputs; ``Outcome.values`` holds every tensor it computed."""

    def __init__(self, program: Program):
        self.p = program

    def const(self, step: Step, key: str):
        name = step.consts.get(key)
        return None if name is None else self.p.arrays[name]

    def run(self, feeds: dict[str, np.ndarray]) -> Outcome:
        p = self.p
        values: dict[str, np.ndarray] = dict(feeds)
        overflows: list[Overflow] = []

        def check(step: Step, acc: np.ndarray) -> None:
            big = np.abs(acc) > INT32_MAX
            if np.any(big):
                idx = tuple(int(i) for i in np.argwhere(big)[0])
                overflows.append(Overflow(step.name, idx, int(acc[idx])))

        for step in p.steps:
            ins = [values[i] if i else self.const(step, str(n)) for n, i in enumerate(step.inputs)]
            if step.op == "QuantizeInput":
                x = np.asarray(ins[0], dtype=np.float64) / 2.0 ** step.attrs["exp"]
                out = np.clip(np.rint(x), step.requant["lo"], step.requant["hi"]).astype(np.int64)
            elif step.kind in ("shape", "float"):
                if step.op in ("Conv", "Gemm"):
                    acc = self.accumulate(step, ins[0])
                    check(step, acc)
                    out = acc * np.exp2(_channel(self.p.arrays[step.dequant["exp"]], acc.ndim).astype(np.float64))
                else:
                    out = _move(step, ins)
            else:
                acc = self.accumulate(step, *ins)
                check(step, acc)
                shift = step.requant["shift"]
                if isinstance(shift, str):
                    shift = _channel(p.arrays[shift], acc.ndim)
                out = np.clip(shift_round(acc, shift, p.rounding), step.requant["lo"], step.requant["hi"])
            values[step.output] = out
        return Outcome(values, overflows)

    def accumulate(self, step: Step, *ins) -> np.ndarray:
        """The int64 accumulator of a step, before its requantization."""
        op, a = step.op, step.attrs
        if op == "Conv":
            w = self.const(step, "w")
            acc = conv2d(ins[0], w, a["group"], a["strides"], a["pads"], a["dilations"])
        elif op == "Gemm":
            w = self.const(step, "w").astype(np.float64)
            x = ins[0].astype(np.float64)
            acc = np.rint(np.matmul(x.reshape(-1, x.shape[-1]), w.T)).astype(np.int64).reshape(*x.shape[:-1], -1)
        elif op == "Add":
            acc = np.left_shift(ins[0].astype(np.int64), a["align"][0]) + np.left_shift(ins[1].astype(np.int64), a["align"][1])
        elif op == "Concat":
            acc = np.concatenate([np.left_shift(np.asarray(x, np.int64), s) for x, s in zip(ins, a["align"])], axis=a["axis"])
        elif op == "ReduceSum":
            axes = _axes(step, ins)
            keep = bool(a.get("keepdims", 1))
            if axes is None and a.get("noop_with_empty_axes", 0):
                acc = ins[0]
            else:
                acc = np.sum(ins[0], axis=None if axes is None else tuple(axes), keepdims=keep, dtype=np.int64)
        elif op in ("Relu", "Clip"):
            acc = ins[0]
        else:
            acc = _move(step, ins)
        if op in ("Conv", "Gemm"):
            b = self.const(step, "b")
            if b is not None:
                acc = acc + _channel(b.astype(np.int64), acc.ndim)
        return acc


def run(program: Program, feeds: dict[str, np.ndarray]) -> Outcome:
    return Executor(program).run(feeds)
