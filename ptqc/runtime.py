"""onnxruntime sessions for ptqc: one place for the options and for turning failures into one clear line."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from ptqc.errors import PtqcError


def make_session(model: str | os.PathLike | onnx.ModelProto, *, threads: int | None = None, arena: bool = True,
                 what: str = "the model", fuse: bool = True) -> ort.InferenceSession:
    """A CPU session for a file or a ModelProto; ``arena=False`` returns buffers to the system after each run;
    ``fuse=False`` stops at onnxruntime's basic optimizations, so QDQ groups are not fused into its int8
    kernels and the graph runs with the ONNX operators' own semantics."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not fuse:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        src = model.SerializeToString()
    else:
        src = os.fspath(model)
        if not os.path.exists(src):
            raise PtqcError(f"model file not found: {src}")
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PtqcError(f"onnxruntime cannot load {what}: {str(exc).splitlines()[0]}") from None


def run(session: ort.InferenceSession, feed: dict[str, np.ndarray], names: list[str] | None = None) -> list:
    try:
        return session.run(names, feed)
    except Exception as exc:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feed.items() if getattr(v, "ndim", 0) > 1)
        raise PtqcError(f"onnxruntime failed on {shapes}: {str(exc).splitlines()[0]}") from None


def outputs_in_batches(model_or_session, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """The first output of a model (path, ModelProto or session) on ``x``, run ``batch`` samples at a time:
    onnxruntime's memory grows with the batch, and a QDQ MobileNetV2 on 744 images in one run peaked past
    24 GB when some of its layers were float."""
    session = model_or_session if isinstance(model_or_session, ort.InferenceSession) else make_session(model_or_session)
    name = session.get_inputs()[0].name
    return np.concatenate([run(session, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
