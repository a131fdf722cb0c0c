"""AQuant's rounding border as ONNX ops: one op list that the writer (``emit_qdq``) and the simulation
(``ptqc.simulate``) both build, so that the written model and the fitted one round alike.

From a float tensor ``x`` with channels on axis 1 to ``2^e * q``, exactly on the grid::

    u = clip(x / 2^e, u_lo, u_hi)                      # the fused Relu/Clip's bounds and the code range
    k = clip(floor(u), lo, hi - 1)
    q = k + (u >= table[c * levels + k - lo])          # table = k + B[c, k], one threshold per (channel, level)

``ptqc.quant.border_codes`` is the same rule in numpy.  Every step is exact in float32: ``2^e`` is a power of
two and each threshold is an integer plus a multiple of ``1 / BORDER_STEPS``.
"""

from __future__ import annotations

__all__ = ["BorderOp", "border_chain", "border_ops", "border_prefix", "border_table", "border_tensor", "border_value"]

import dataclasses

import numpy as np
import onnx


def border_prefix(tensor: str) -> str:
    """The name prefix of ``tensor``'s border ops, constants and outputs in a written model."""
    return f"{tensor}_border"


def border_value(tensor: str) -> str:
    """The border chain's last output (``2^e * q``), which the tensor's QuantizeLinear reads."""
    return f"{border_prefix(tensor)}_value"


def border_tensor(node: onnx.NodeProto) -> str | None:
    """The tensor whose rounding border ``node`` belongs to (the writer tags each op with
    ``ptqc.role = border`` and ``ptqc.tensor``), or None for any other node."""
    meta = {p.key: p.value for p in node.metadata_props}
    return meta.get("ptqc.tensor", "") if meta.get("ptqc.role") == "border" else None


@dataclasses.dataclass
class BorderOp:
    op_type: str
    inputs: list[str]
    output: str
    attrs: dict


def border_table(border: np.ndarray, lo: int) -> np.ndarray:
    """The thresholds ``k + B[c, k]``, flattened channel by channel (levels ``lo .. lo + levels - 1``)."""
    border = np.asarray(border, np.float64)
    return (border + np.arange(lo, lo + border.shape[1])[None, :]).reshape(-1).astype(np.float32)


def border_ops(prefix: str, x: str, exp: int, lo: int, hi: int, u_lo: float, u_hi: float, channels: int,
               rank: int, table: str) -> tuple[dict[str, np.ndarray], list[BorderOp]]:
    """Constants (name -> array) and ops, in order, computing ``2^exp * q`` from ``x`` into ``<prefix>_value``
    (``border_value`` when ``prefix`` is ``border_prefix``);
    ``table`` names the thresholds (a constant or a graph input, of length ``channels * (hi - lo)``)."""
    s = 2.0**exp
    levels = hi - lo
    consts = {
        f"{prefix}_inv_scale": np.array(1.0 / s, np.float32),
        f"{prefix}_scale": np.array(s, np.float32),
        f"{prefix}_u_lo": np.array(u_lo, np.float32),
        f"{prefix}_u_hi": np.array(u_hi, np.float32),
        f"{prefix}_k_lo": np.array(lo, np.float32),
        f"{prefix}_k_hi": np.array(hi - 1, np.float32),
        f"{prefix}_offset": (np.arange(channels, dtype=np.int64) * levels - lo).reshape((1, channels) + (1,) * (rank - 2)),
    }
    p = prefix
    ops = [
        BorderOp("Mul", [x, f"{p}_inv_scale"], f"{p}_u0", {}),
        BorderOp("Clip", [f"{p}_u0", f"{p}_u_lo", f"{p}_u_hi"], f"{p}_u", {}),
        BorderOp("Floor", [f"{p}_u"], f"{p}_floor", {}),
        BorderOp("Clip", [f"{p}_floor", f"{p}_k_lo", f"{p}_k_hi"], f"{p}_k", {}),
        BorderOp("Cast", [f"{p}_k"], f"{p}_k64", {"to": onnx.TensorProto.INT64}),
        BorderOp("Add", [f"{p}_k64", f"{p}_offset"], f"{p}_cell", {}),
        BorderOp("Gather", [table, f"{p}_cell"], f"{p}_threshold", {"axis": 0}),
        BorderOp("GreaterOrEqual", [f"{p}_u", f"{p}_threshold"], f"{p}_up", {}),
        BorderOp("Cast", [f"{p}_up"], f"{p}_up_f", {"to": onnx.TensorProto.FLOAT}),
        BorderOp("Add", [f"{p}_k", f"{p}_up_f"], f"{p}_code", {}),
        BorderOp("Mul", [f"{p}_code", f"{p}_scale"], f"{p}_value", {}),
    ]
    return consts, ops


def border_chain() -> list[tuple[str, list[int | None]]]:
    """The shape of :func:`border_ops`' chain, for checking a written one: each op's type, and for each of its
    inputs the index of the earlier op whose output it reads (None for the tensor and the constants)."""
    _, ops = border_ops("p", "x", 0, 0, 2, 0.0, 2.0, 1, 4, "table")
    index = {op.output: i for i, op in enumerate(ops)}
    return [(op.op_type, [index.get(x) for x in op.inputs]) for op in ops]
