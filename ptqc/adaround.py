"""AdaRound through a layer's activation, with QDrop's input mixing: soft rounding learned by Adam in numpy.

For one weighted layer with per-row power-of-two grids ``s`` (shape (g, r, 1)), float weights ``W`` (g, r, d)
and paired input patch rows ``x~`` (quantized model) and ``x`` (float model), both (n, g, d), the problem is

    min_{V, b}  E || f(W~(V) x_mix + b) - f(W x + b0) ||^2  +  lam * sum(1 - |2 h(V) - 1|^beta)

with ``W~ = s * clip(floor(W/s) + h(V), qmin, qmax)``, ``h`` AdaRound's rectified sigmoid, ``f`` the layer's
fused Relu/Clip (identity when there is none), and ``x_mix`` QDrop's element-wise 50/50 mix of ``x~`` and
``x`` drawn afresh each step.  Unlike the quadratic layer loss GPTQ minimises, errors that ``f`` cuts away
(negative pre-activations before a ReLU, values above a ReLU6 bound) cost nothing here, and the weights face
the rounding noise of their real input.  The gradient is written out by hand (two matmuls per step).

Every code stays at the floor or the ceiling of ``W/s`` (AdaRound's box), which keeps the solution close to W;
the bias is learned alongside.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ptqc.quant import int_range

ZETA, GAMMA = 1.1, -0.1


def _h(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(frac: np.ndarray) -> np.ndarray:
    """V with h(V) = frac (AdaRound's initialisation), frac in [0, 1]."""
    p = np.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def adam_step(param: np.ndarray, grad: np.ndarray, moments: list, k: int, lr: float, beta1: float = 0.9,
              beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step on ``param``, in place.  ``moments`` is its [first, second] moment pair, replaced in place
    (0.0 before the first step); ``k`` counts the steps from 1."""
    moments[0] = beta1 * moments[0] + (1 - beta1) * grad
    moments[1] = beta2 * moments[1] + (1 - beta2) * grad**2
    param -= lr * (moments[0] / (1 - beta1**k)) / (np.sqrt(moments[1] / (1 - beta2**k)) + eps)


def activation(y: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    if lo is None and hi is None:
        return y
    return np.clip(y, lo, hi)


def apply(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``y[n, g, r] = sum_d w[g, r, d] x[n, g, d]``: rows of patches in, rows of outputs out."""
    if w.shape[1] == 1:  # depthwise: one output per group, elementwise is faster than g tiny matmuls
        return np.einsum("ngd,gd->ng", x, w[:, 0].astype(x.dtype), optimize=False)[:, :, None]
    return np.stack([x[:, k] @ w[k].T.astype(x.dtype) for k in range(w.shape[0])], axis=1)


def weight_grad(grad_y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The gradient in w of ``sum(grad_y * apply(w, x))``: (g, r, d)."""
    if grad_y.shape[2] == 1:
        return np.einsum("ng,ngd->gd", grad_y[:, :, 0], x, optimize=False)[:, None, :].astype(np.float64)
    return np.stack([grad_y[:, k].T @ x[:, k] for k in range(x.shape[1])]).astype(np.float64)


def layer_loss(w: np.ndarray, b: np.ndarray, x: np.ndarray, target: np.ndarray, lo, hi, chunk: int = 4096) -> float:
    """Mean squared error of ``f(w x + b)`` against ``target``; w (g, r, d), b (g, r), x (n, g, d),
    target (n, g, r)."""
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        y = activation(apply(w, x[i : i + chunk]) + b[None].astype(x.dtype), lo, hi)
        total += float(np.sum((y - target[i : i + chunk]).astype(np.float64) ** 2))
    return total / target.size


def objective(v: np.ndarray, b: np.ndarray, base: np.ndarray, s: np.ndarray, x: np.ndarray, target: np.ndarray,
              lo: float | None, hi: float | None, scale: float, bits: int,
              z: np.ndarray | float = 0.0) -> tuple[float, np.ndarray, np.ndarray]:
    """The reconstruction term and its gradients in V and b: ``mean(f(W~(V) x + b) - target)^2 / scale``,
    with x (n, g, d) and target (n, g, r); ``z`` the rows' grid offsets ((g, r, 1) or scalar)."""
    qmin, qmax = int_range(bits, True)
    sig = 1.0 / (1.0 + np.exp(-v))
    h_raw = sig * (ZETA - GAMMA) + GAMMA
    q_soft = base + np.clip(h_raw, 0.0, 1.0)
    inside = (q_soft >= qmin) & (q_soft <= qmax)
    pre = apply(s * (np.clip(q_soft, qmin, qmax) + z), x) + b[None].astype(x.dtype)
    diff = activation(pre, lo, hi) - target
    loss = float(np.mean(diff.astype(np.float64) ** 2) / scale)
    grad_y = (2.0 / (diff.size * scale)) * diff
    if lo is not None:
        grad_y = grad_y * (pre > lo)
    if hi is not None:
        grad_y = grad_y * (pre < hi)
    grad_v = weight_grad(grad_y, x) * s * inside * ((h_raw > 0) & (h_raw < 1)) * (ZETA - GAMMA) * sig * (1 - sig)
    return loss, grad_v, grad_y.sum(axis=0).astype(np.float64)


@dataclasses.dataclass
class Result:
    codes: np.ndarray  # (g, r, d) integers
    bias: np.ndarray  # (g, r)
    #: mean squared error on the quantized input (no mixing): the starting codes, and the result
    before: float
    after: float


def adaround(w: np.ndarray, exps: np.ndarray, bits: int, bias: np.ndarray, x_q: np.ndarray, x_f: np.ndarray,
             lo: float | None = None, hi: float | None = None, init_codes: np.ndarray | None = None,
             init_bias: np.ndarray | None = None, iters: int = 100, batch: int = 1024, lr: float = 1e-2,
             quantized_share: float = 0.5, lam: float = 0.01, warmup: float = 0.2, seed: int = 0,
             offset: np.ndarray | None = None) -> Result:
    """Soft-round ``w`` (g, r, d) on grids ``2**exps * (k + offset)`` (g, r); inputs (n, g, d), rows first so
    that a batch of rows is one contiguous gather.  ``bias`` is the float model's (the target's), ``init_bias``
    the starting point of the learned one (default: ``bias``).

    ``quantized_share`` is the probability that an input element comes from ``x_q`` rather than ``x_f`` (QDrop's
    mix at 0.5; 1 is AdaRound's asymmetric reconstruction on quantized inputs alone).

    ``init_codes`` (e.g. GPTQ's) sets the starting rounding direction where a code lies in the box; the
    returned codes are never worse, on the quantized input, than those starting codes rounded into the box.
    """
    rng = np.random.default_rng(seed)
    qmin, qmax = int_range(bits, True)
    s = np.exp2(exps.astype(np.float64))[:, :, None]
    z = 0.0 if offset is None else np.asarray(offset, np.float64)[:, :, None]  # codes k stand for s (k + z)
    w = w.astype(np.float64)
    base = np.floor(w / s - z)
    frac = w / s - z - base
    if init_codes is not None:
        up = init_codes > base  # a code at ceil: start near 1; at floor: near 0
        inside = (init_codes == base) | (init_codes == base + 1)
        frac = np.where(inside, np.where(up, 0.9, 0.1), frac)
    start = np.clip(base + (frac >= 0.5), qmin, qmax)
    v = _init_v(frac)
    b0 = bias.astype(np.float64)
    b = (b0 if init_bias is None else init_bias.astype(np.float64)).copy()
    x_q = np.asarray(x_q, dtype=np.float32)
    x_f = np.asarray(x_f, dtype=np.float32)
    n = x_q.shape[0]
    target = activation(apply(w, x_f) + b0[None].astype(np.float32), lo, hi)
    scale = max(float(np.mean(target.astype(np.float64) ** 2)), 1e-12)
    before = layer_loss(s * (start + z), b, x_q, target, lo, hi)
    moments_v, moments_b = [0.0, 0.0], [0.0, 0.0]  # Adam's, for V and b
    b_lr = lr * max(float(np.sqrt(np.mean(b0**2))), 1e-3) * 0.1
    count = max(1, int(warmup * iters))
    for it in range(iters):
        idx = rng.integers(0, n, size=min(batch, n))
        if quantized_share >= 1:
            x = x_q[idx]
        elif quantized_share <= 0:
            x = x_f[idx]
        else:
            # QDrop: each element comes from the quantized input with this probability, else from the float one
            # (random bytes are cheap)
            xq = x_q[idx]
            pick = np.frombuffer(rng.bytes(xq.size), np.uint8).reshape(xq.shape) < int(round(256 * quantized_share))
            x = np.where(pick, xq, x_f[idx])
        _, grad_v, grad_b = objective(v, b, base, s, x, target[idx], lo, hi, scale, bits, z)
        sig = 1.0 / (1.0 + np.exp(-v))
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(h_raw, 0.0, 1.0)
        if it >= count:
            beta = 20.0 + (2.0 - 20.0) * (it - count) / max(1, iters - count)
            t = 2 * h - 1
            # d/dh of lam * mean(1 - |2h - 1|^beta)
            grad_h = -lam * beta * np.abs(t) ** (beta - 1) * np.sign(t) * 2 / h.size
            grad_v = grad_v + grad_h * ((h_raw > 0) & (h_raw < 1)) * (ZETA - GAMMA) * sig * (1 - sig)
        adam_step(v, grad_v, moments_v, it + 1, lr)
        adam_step(b, grad_b, moments_b, it + 1, b_lr)
    codes = np.clip(base + (_h(v) >= 0.5), qmin, qmax)
    after = layer_loss(s * (codes + z), b, x_q, target, lo, hi)
    if after > before:
        return Result(start, b0 if init_bias is None else init_bias.astype(np.float64), before, before)
    return Result(codes, b, before, after)
