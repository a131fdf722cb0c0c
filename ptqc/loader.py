"""Load an FP32 ONNX file into the IR every pass works on: validate, simplify with onnxsim, infer shapes.

Anything ptqc cannot handle is refused here with one clear :class:`PtqcError`, before work starts.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from onnx import version_converter

from ptqc.errors import PtqcError

logger = logging.getLogger(__name__)

#: Opset of everything ptqc writes: INT4/UINT4 QuantizeLinear needs 21, INT2/UINT2 needs 25.
BASE_OPSET = 21
INT2_OPSET = 25

#: Ops ptqc knows how to carry through the pipeline.  Anything else is refused by name.
KNOWN_OPS = {
    "Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "Add", "Concat", "MaxPool",
    "AveragePool", "GlobalAveragePool", "ReduceSum", "ReduceMean", "Flatten", "Reshape", "Squeeze",
    "Unsqueeze", "Transpose", "Identity", "Pad", "Sigmoid", "Mul", "Sub", "Div", "HardSigmoid",
    "HardSwish", "Softmax", "Shape", "Gather", "Constant", "Cast", "Slice", "Resize", "LeakyRelu",
    "PRelu", "Tanh", "Dropout",
}


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure becomes a one-line :class:`PtqcError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PtqcError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise PtqcError(f"model path is a directory, not an ONNX file: {path}")
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf raises a variety of DecodeError/RuntimeError types
        raise PtqcError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})".strip()) from None
    if not model.graph.node:
        raise PtqcError(f"{path} is not an ONNX model (it has no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PtqcError(f"{path} is not a valid ONNX model: {first}") from None
    return model


def check_supported(model: onnx.ModelProto) -> None:
    init_names = {i.name for i in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in init_names]:
        raise PtqcError("model has no inputs")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise PtqcError(f"unsupported op {node.domain}::{node.op_type} (node {node.name or node.output[0]})")
        if node.op_type not in KNOWN_OPS:
            raise PtqcError(f"unsupported op {node.op_type} (node {node.name or node.output[0]})")
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            arr = onnx.numpy_helper.to_array(init)
            if not np.all(np.isfinite(arr)):
                raise PtqcError(f"weight {init.name} contains NaN or Inf")


def simplify(model: onnx.ModelProto, opset: int = BASE_OPSET) -> onnx.ModelProto:
    """onnxsim constant folding and clean-up, keeping BatchNormalization (ptqc folds it itself)."""
    import onnxsim

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current < opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as exc:
            raise PtqcError(f"cannot convert the model from opset {current} to {opset}: {exc}") from None
    try:
        simplified, ok = onnxsim.simplify(model, skip_fuse_bn=True)
    except Exception as exc:
        logger.warning("onnxsim failed (%s); continuing with the unsimplified model", exc)
        return model
    if not ok:
        logger.warning("onnxsim could not verify its simplification; continuing with the unsimplified model")
        return model
    return simplified


def load(path_or_model: str | os.PathLike | onnx.ModelProto) -> ir.Model:
    """Read (or take), check, simplify and convert a model to the IR, with shapes inferred."""
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else read_model(path_or_model)
    check_supported(model)
    model = simplify(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        logger.warning("shape inference failed: %s", exc)
    irm = ir.serde.deserialize_model(model)
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(irm)
    return irm


def input_spec(model: ir.Model) -> tuple[str, tuple[int | str | None, ...]]:
    """Name and shape of the model's single data input."""
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    if len(inputs) != 1:
        raise PtqcError(f"ptqc handles models with one data input; this one has {len(inputs)}")
    value = inputs[0]
    shape = tuple(d if isinstance(d, int) else None for d in value.shape) if value.shape is not None else ()
    return value.name, shape
