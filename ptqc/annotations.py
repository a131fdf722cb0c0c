"""What the passes tell each other, stored in the IR's in-memory ``meta`` of values and nodes.

* ``value.meta[ACT]``: :class:`ActQuant`, set by plan_quantization, exponent filled by pot_scales.
* ``value.meta[HIST]``: :class:`ptqc.quant.Histogram`, set by calibrate.
* ``value.meta[CLIP]``: a learned clipping threshold (float units), set by learn_clip_ranges and used by
  absorb_clip_range.
* ``value.meta[MEAN]``: per-channel mean (axis 1) of a weighted layer's input, set by calibrate.
* ``node.meta[MOMENT]``: :class:`ptqc.hessian.SecondMoment` of a weighted layer's input, set by calibrate
  when GPTQ is on.
* ``node.meta[WEIGHT]``: :class:`WeightQuant` on Conv/Gemm/MatMul, filled by pot_scales.
* ``node.meta[BN]``: :class:`BnStats` on a Conv/Gemm that absorbed a BatchNormalization.
* ``node.meta[ARCQ]``: :class:`Compensation` on a Conv that carries ARCQ's remainder terms, set by
  compensate_remainders and written by emit_qdq.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ptqc.quant import offset_factor

ACT = "ptqc.act"
HIST = "ptqc.hist"
CLIP = "ptqc.clip"
MEAN = "ptqc.mean"
MOMENT = "ptqc.moment"
WEIGHT = "ptqc.weight"
BN = "ptqc.bn"
ARCQ = "ptqc.arcq"

#: Ops that consume a weight initializer and accumulate in int32.
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
#: Ops whose output has the input's scale: the requantization is the identity.
PASSTHROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout")
#: Ops ptqc runs on integers: their data inputs are quantized.
INTEGER_OPS = WEIGHTED_OPS + PASSTHROUGH_OPS + (
    "Add", "Concat", "AveragePool", "GlobalAveragePool", "ReduceSum", "Relu", "Clip", "Pad",
)
#: Activations that fold into the preceding requantization as integer saturation.
FUSABLE_ACTS = ("Relu", "Clip")


@dataclasses.dataclass
class ActQuant:
    """Quantizer of one activation tensor: ``bits``-wide, signed or unsigned, scale ``2**exp``."""

    bits: int
    signed: bool
    exp: int | None = None
    #: sharing group: every value of a group ends up with the same exponent
    group: int = -1
    #: float bounds of a fused Relu/Clip (None = unbounded)
    clip_lo: float | None = None
    clip_hi: float | None = None
    #: the fused Relu/Clip node, removed when the QDQ graph is written
    fused: object | None = None
    #: factor the tensor was multiplied by relative to the float model (absorb_clip_range's weight
    #: rescaling), or one factor per channel (equalize_channels); written to the QDQ file so that a report
    #: can compare against the float model
    rescale: float | np.ndarray = 1.0
    #: AQuant's rounding border per channel and level (``quant.border_codes``), or None: round to nearest
    border: np.ndarray | None = None


@dataclasses.dataclass
class WeightQuant:
    """Per-output-channel quantization of a weighted op."""

    bits: int
    #: axis of the weight initializer that indexes output channels
    axis: int
    role: str = ""  # "first", "last" or ""
    #: float bias per output channel (zeros when the layer has none); passes may correct it
    bias: np.ndarray | None = None
    #: ``exps`` and ``q`` are what the DequantizeLinear holds (the *container*): ``q * 2**exps`` per channel
    exps: np.ndarray | None = None
    q: np.ndarray | None = None  # integer weights, same shape as the float weights
    #: per output channel, the grid offset z (``quant.WEIGHT_OFFSETS``): the row's values are ``2^e (k + z)``
    #: with codes k in the signed b-bit range; None = 0 everywhere.  :meth:`codes` and :meth:`set_codes` convert
    #: between those codes and the container
    offset: np.ndarray | None = None
    #: the offsets a rounding pass may choose from for this layer (set by pot_scales); (0,) = none
    offsets: tuple[float, ...] = (0.0,)
    bias_q: np.ndarray | None = None  # int32 bias at scale 2**(e_in + exps)
    #: what was done to this layer, in pipeline order (written to the node's metadata)
    methods: list[str] = dataclasses.field(default_factory=list)

    def dequantized(self) -> np.ndarray:
        """The weights the quantized layer computes with: ``q * 2**exps`` per output channel (float64)."""
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return self.q * np.exp2(self.exps.reshape(shape).astype(np.float64))

    def computed_bias(self, e_in: int | None) -> np.ndarray:
        """The bias the layer computes with: after legalize_scales, the int32 ``bias_q`` the writer emits at the
        accumulator scale ``2**(e_in + exps)``; before it (or without an input exponent), the float bias."""
        if self.bias_q is None or e_in is None:
            return self.bias
        return self.bias_q * np.exp2((e_in + self.exps).astype(np.float64))

    def row_view(self, per_row: np.ndarray, ndim: int | None = None) -> np.ndarray:
        """Per-channel values shaped to broadcast against the weight tensor (of rank ``ndim``, default q's)."""
        shape = [1] * (self.q.ndim if ndim is None else ndim)
        shape[self.axis] = -1
        return np.asarray(per_row).reshape(shape)

    def codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes k like ``q``, grid exponents e per channel, offsets z per channel): ``w = 2^e (k + z)``."""
        z = np.zeros(self.exps.shape) if self.offset is None else self.offset
        m = offset_factor(z)
        k = np.round(self.q / self.row_view(m) - self.row_view(z)).astype(np.int64)
        return k, np.asarray(self.exps, np.int64) + (m == 2), z

    def set_codes(self, k: np.ndarray, e: np.ndarray, z: np.ndarray | None = None) -> None:
        """Store codes ``k`` on grids ``2^e (k + z)`` (``e``, ``z`` per channel) in the container form."""
        e = np.asarray(e, np.int64).reshape(-1)
        z = None if z is None or not np.any(z) else np.asarray(z, np.float64).reshape(-1)
        self.offset = z
        if z is None:
            self.q, self.exps = np.asarray(k).astype(np.int64), e
            return
        m = offset_factor(z)
        rank = np.ndim(k)
        k = np.asarray(k, np.float64)
        self.q = np.round(self.row_view(m, rank) * (k + self.row_view(z, rank))).astype(np.int64)
        self.exps = e - (m == 2)


@dataclasses.dataclass
class BnStats:
    """The BatchNormalization parameters a layer absorbed: kept for range estimates and loss weighting."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float


def group_sizes(graph) -> dict[int, int]:
    """How many planned activations each sharing group has (a tensor alone in its group can be rescaled)."""
    sizes: dict[int, int] = {}
    for node in graph:
        for v in node.outputs:
            if ACT in v.meta:
                sizes[v.meta[ACT].group] = sizes.get(v.meta[ACT].group, 0) + 1
    return sizes


@dataclasses.dataclass
class Compensation:
    """ARCQ's remainder terms of one Conv: ``Conv(x_q, R) + Conv(dx, W_hat)`` added to its accumulator.

    ``q`` holds the weight remainder ``W - W_hat`` as ``bits``-bit codes at per-channel scales ``2**exps`` (None:
    no weight term); ``act_bits`` > 0 adds the input's remainder, its float value minus its quantized value as
    ``act_bits``-bit codes at scale ``2**(e_in - act_bits)``."""

    q: np.ndarray | None
    exps: np.ndarray | None
    bits: int
    act_bits: int
    #: ARCQ's critical-layer score, and the layer's relative output error it was computed from
    score: float = 0.0
    error: float = 0.0

    def weight(self, axis: int, ndim: int) -> np.ndarray:
        """The weight remainder's values ``q * 2**exps`` (``q`` must be set), shaped like the weights."""
        shape = [1] * ndim
        shape[axis] = -1
        return self.q * np.exp2(np.asarray(self.exps, np.float64).reshape(shape))
