"""Layer-wise second moments and Hessian-based rounding (GPTQ), in numpy.

For a layer ``y = W x`` the output error of quantized weights ``Q`` is ``E||(Q - W) x||^2 =
tr((Q - W) H (Q - W)^T)`` with ``H = E[x x^T]`` over the im2col patches the layer sees (per group for grouped
and depthwise convs).  Rows (output channels) are independent given ``H``, which makes a per-row choice of
the power-of-two exponent exact.
"""

from __future__ import annotations

import numpy as np

from ptqc.quant import int_range

#: At most this many output positions per image enter H (a strided subset; the rest adds little) ...
MAX_POSITIONS = 4096
#: ... and no more than this many per entry of a patch: a depthwise 3x3 layer's 9x9 H is settled by far
#: fewer samples than a 1x1 layer's 960x960 one.  16 rather than 32: EfficientNet-Lite0 w8a8 compile
#: 14.3 -> 12.7 s, logit SNR on 744 held-back images 18.5 -> 18.7 dB (MobileNetV2 17.03 -> 17.06 dB)
POSITIONS_PER_DIM = 16


class SecondMoment:
    """Streams ``H = E[x x^T]`` of a Conv/Gemm/MatMul's input patches, per group: shape (groups, d, d)."""

    def __init__(self, op: str, w_shape: tuple[int, ...], group: int = 1, kernel=(1, 1), strides=(1, 1),
                 pads=(0, 0, 0, 0), dilations=(1, 1)):
        self.op = op
        self.group = group
        self.kernel, self.strides, self.pads, self.dilations = tuple(kernel), tuple(strides), tuple(pads), tuple(dilations)
        d = int(np.prod(w_shape[1:])) if op == "Conv" else None
        self.d = d
        self.max_positions = MAX_POSITIONS if d is None else min(MAX_POSITIONS, POSITIONS_PER_DIM * d)
        self.h: np.ndarray | None = None
        #: the sum of the patches (groups, d), for :attr:`covariance`
        self.total: np.ndarray | None = None
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        """Add a batch of the layer's input (float32 products, float64 running sum)."""
        self._accumulate(self.columns(x))

    def columns(self, x: np.ndarray) -> np.ndarray:
        """The layer's input vectors for a batch, one per column: (groups, d, samples), float32 (im2col
        patches for a Conv, the rows of a Gemm/MatMul input otherwise)."""
        if self.op != "Conv":
            return x.reshape(x.shape[0], -1).astype(np.float32, copy=False).T[None]
        return self.patches(x)

    def _accumulate(self, p: np.ndarray) -> None:
        h = np.matmul(p, p.transpose(0, 2, 1)).astype(np.float64)
        total = p.sum(axis=2, dtype=np.float64)
        self.h = h if self.h is None else self.h + h
        self.total = total if self.total is None else self.total + total
        self.n += p.shape[2]

    def patches(self, x: np.ndarray) -> np.ndarray:
        """im2col of a batch, transposed: (groups, C/g * kh * kw, samples) with rows in the OIHW flatten
        order, float32.

        At most ``max_positions`` output positions per image are kept (a regular stride over them).  Each
        tap is copied out whole and the rows are gathered in blocks of contiguous samples: interleaving the
        taps element by element cost 0.8 s per 5x5 depthwise layer of EfficientNet-Lite0.
        """
        x = x.astype(np.float32, copy=False)
        n, c, _, _ = x.shape
        kh, kw = self.kernel
        sh, sw = self.strides
        dh, dw = self.dilations
        top, left, bottom, right = self.pads
        g = self.group
        cg = c // g
        if (kh, kw) == (1, 1) and not any(self.pads):
            sub = x[:, :, ::sh, ::sw]
            positions = sub.shape[2] * sub.shape[3]
            step = -(-positions // self.max_positions)
            flat = sub.reshape(n, g, cg, positions)[:, :, :, ::step]
            return np.ascontiguousarray(flat.transpose(1, 2, 0, 3)).reshape(g, cg, -1)
        xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        ho = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
        wo = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
        stride = max(1, int(np.ceil(np.sqrt(ho * wo / self.max_positions))))  # same step along rows and columns
        taps = np.stack([xp[:, :, ky * dh : ky * dh + (ho - 1) * sh + 1 : sh * stride,
                               kx * dw : kx * dw + (wo - 1) * sw + 1 : sw * stride]
                         for ky in range(kh) for kx in range(kw)])  # (taps, n, c, Ho', Wo')
        positions = taps.shape[3] * taps.shape[4]
        taps = taps.reshape(kh * kw, n, g, cg, positions)
        # -> (g, cg, taps, n, positions) -> (g, cg * kh * kw, n * positions)
        return np.ascontiguousarray(taps.transpose(2, 3, 0, 1, 4)).reshape(g, cg * kh * kw, n * positions)

    @property
    def value(self) -> np.ndarray:
        return self.h / max(self.n, 1)

    @property
    def covariance(self) -> np.ndarray:
        """``E[(x - m)(x - m)^T]``: the loss of weight errors whose mean effect a bias takes back."""
        m = self.total / max(self.n, 1)
        return self.value - m[:, :, None] * m[:, None, :]


def for_layer(node, cls: type = None) -> SecondMoment | None:
    """A SecondMoment (or ``cls``) accumulator shaped for an onnx_ir Conv/Gemm/MatMul node (None if unsupported)."""
    cls = cls or SecondMoment
    tensor = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if tensor is None:
        return None
    shape = tuple(tensor.shape)
    if node.op_type != "Conv":
        return cls(node.op_type, shape)
    attrs = node.attributes
    k = shape[2:]
    pads = tuple(attrs.get_ints("pads", (0, 0, 0, 0)))
    if len(k) != 2 or len(pads) != 4 or attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    return cls("Conv", shape, group=attrs.get_int("group", 1), kernel=k,
                        strides=tuple(attrs.get_ints("strides", (1, 1))), pads=pads,
                        dilations=tuple(attrs.get_ints("dilations", (1, 1))))


def row_loss(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per-row ``(q - w) H (q - w)^T``: w, q (g, r, d), h (g, d, d) -> (g, r)."""
    dw = q - w
    return np.einsum("grd,gde,gre->gr", dw, h, dw, optimize=True)


def gptq(w: np.ndarray, h: np.ndarray, exps: np.ndarray, bits: int, damp: float = 0.01, block: int = 128,
         act_order: bool = True, floor_ceil: bool = True, offset: np.ndarray | float = 0.0) -> np.ndarray:
    """GPTQ rounding on per-row power-of-two grids; returns integer codes.

    w: (g, r, d) weights, h: (g, d, d) second moments, exps: (g, r) exponents; signed ``bits``; ``offset``
    (scalar or (g, r)) the rows' grid offsets z: a code k stands for ``2^e (k + z)``.

    ``floor_ceil`` keeps every code at the floor or ceiling of its original weight (AdaRound's solution
    space): the error feedback still chooses the rounding direction, but no weight moves by more than one
    step.  Without it, GPTQ moves weights freely along directions the calibration data never excites
    (dead or constant channels make H nearly singular), which measured as a collapse on MobileNetV2.
    """
    qmin, qmax = int_range(bits, True)
    w = np.array(w, dtype=np.float64)
    s_full = np.exp2(exps.astype(np.float64))[:, :, None]
    z = np.broadcast_to(np.asarray(offset, np.float64), exps.shape)
    lo_all = np.clip(np.floor(w / s_full - z[:, :, None]), qmin, qmax)
    hi_all = np.clip(lo_all + 1, qmin, qmax)
    if not floor_ceil:
        lo_all = np.full_like(w, qmin)
        hi_all = np.full_like(w, qmax)
    h = np.array(h, dtype=np.float64)
    g, r, d = w.shape
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    if dead.any():
        gi, di = np.nonzero(dead)
        h[gi, di, di] = 1.0
        w[gi, :, di] = 0.0
    perm = None
    if act_order and g == 1:
        perm = np.argsort(-np.einsum("gii->gi", h)[0], kind="stable")
        w = w[:, :, perm]
        h = h[:, perm][:, :, perm]
        lo_all, hi_all = lo_all[:, :, perm], hi_all[:, :, perm]
    mean_diag = np.einsum("gii->gi", h).mean(axis=1)
    h = h + (damp * mean_diag)[:, None, None] * np.eye(d)[None]
    hinv = np.linalg.inv(h)
    u = np.linalg.cholesky(hinv).transpose(0, 2, 1)  # upper: hinv = u^T u
    s = np.exp2(exps.astype(np.float64))[:, :, None]  # (g, r, 1)
    codes = np.zeros((g, r, d), dtype=np.int64)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1 = w[:, :, i1:i2].copy()
        err1 = np.zeros_like(w1)
        for k in range(i2 - i1):
            col = w1[:, :, k]
            q = np.clip(np.round(col / s[:, :, 0] - z), lo_all[:, :, i1 + k], hi_all[:, :, i1 + k])
            codes[:, :, i1 + k] = q
            diag_u = u[:, i1 + k, i1 + k][:, None]
            err = (col - (q + z) * s[:, :, 0]) / diag_u
            w1[:, :, k:] -= err[:, :, None] * u[:, None, i1 + k, i1 + k : i2]
            err1[:, :, k] = err
        if i2 < d:
            w[:, :, i2:] -= np.einsum("grb,gbe->gre", err1, u[:, i1:i2, i2:], optimize=True)
    if perm is not None:
        inv = np.argsort(perm)
        codes = codes[:, :, inv]
    return codes


def gptq_pot(w: np.ndarray, h: np.ndarray, exps: np.ndarray, bits: int, search: tuple[int, ...] = (-1, 0, 1),
             offsets: tuple[float, ...] = (0.0,)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with each row's exponent chosen from ``exps + search`` (and its grid offset from ``offsets``) by
    the H-weighted loss (RAPQ's rounding-vs-clipping trade-off, exact per row).  Returns (codes, exponents,
    offsets), the codes k standing for ``2^e (k + z)``."""
    best_codes = best_exps = best_loss = best_z = None
    for delta in search:
        e = exps + delta
        for z in offsets:
            codes = gptq(w, h, e, bits, offset=z)
            loss = row_loss(w, (codes + z) * np.exp2(e.astype(np.float64))[:, :, None], h)
            if best_loss is None:
                best_codes, best_exps, best_loss, best_z = codes, e.copy(), loss, np.full(e.shape, z)
                continue
            better = loss < best_loss
            best_codes[better] = codes[better]
            best_exps[better] = e[better]
            best_z[better] = z
            best_loss = np.where(better, loss, best_loss)
    return best_codes, best_exps, best_z


class PairedMoment(SecondMoment):
    """Streams, for a layer, H~ = E[x~ x~^T], C = E[x~ x^T] and H = E[x x^T] from paired quantized (x~)
    and float (x) inputs, plus the mean of x~ per input channel."""

    def add_pair(self, x_q: np.ndarray, x: np.ndarray) -> None:
        pq, pf = self.columns(x_q), self.columns(x)
        hq = np.matmul(pq, pq.transpose(0, 2, 1)).astype(np.float64)
        c = np.matmul(pq, pf.transpose(0, 2, 1)).astype(np.float64)
        hf = np.matmul(pf, pf.transpose(0, 2, 1)).astype(np.float64)
        if self.h is None:
            self.h, self.c, self.hf = hq, c, hf
        else:
            self.h, self.c, self.hf = self.h + hq, self.c + c, self.hf + hf
        self.n += pq.shape[2]

    def target(self, w: np.ndarray, mode: str = "asym", ridge: float = 1e-4, min_ratio: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
        """(metric, target weights) for GPTQ.

        ``asym``: metric E[x~ x~^T], target W* = W C^T H~^-1 (the weights that best map quantized inputs to
        the float outputs).  ``qdrop``: the expectation of the same loss under QDrop's element-wise 50% mix
        of x~ and x: metric E[xb xb^T] + diag(E[(x~ - x)^2]) / 4 with xb = (x~ + x)/2, cross E[xb x^T].
        ``w`` is (g, r, d); returns metric (g, d, d) and target (g, r, d).
        """
        n = max(self.n, 1)
        hq, c, hf = self.h / n, self.c / n, self.hf / n
        if mode == "qdrop":
            diff = np.einsum("gii->gi", hq) - 2 * np.einsum("gii->gi", c) + np.einsum("gii->gi", hf)
            metric = 0.25 * (hq + c + c.transpose(0, 2, 1) + hf)
            idx = np.arange(metric.shape[1])
            metric[:, idx, idx] += 0.25 * np.maximum(diff, 0)
            cross = 0.5 * (c + hf)
        else:
            metric, cross = hq, c
        level = np.einsum("gii->gi", metric).mean(axis=1)
        # a ridge of 1e-4 of the mean diagonal: at 1e-2 the shrinkage it adds cost more than the fit gained
        # (MobileNetV2 w8a4, first depthwise layer: output error 1.80% of the signal with W, 3.16% with the
        # 1e-2 solution, 1.57% with 1e-4)
        # keep W where there is nothing to fit (input always zero), or too few samples for a d-dim fit
        dead = (level <= 0) | (self.n < min_ratio * metric.shape[1])
        eye = np.eye(metric.shape[1])[None]
        damp = (ridge * np.where(dead, 1.0, level))[:, None, None] * eye
        # W* = W cross^T metric^-1, solved rather than inverted
        target = np.linalg.solve(metric + damp, np.matmul(cross, w.transpose(0, 2, 1))).transpose(0, 2, 1)
        target[dead] = w[dead]
        return metric, target
