"""Serialize the IR model and write it atomically: a failed run leaves no file behind."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnx_ir as ir

from ptqc.errors import PtqcError

#: onnxruntime 1.31 reads IR versions up to 13; opset 21 needs IR 10.
IR_VERSION = 10


def to_proto(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    proto.ir_version = max(IR_VERSION, min(proto.ir_version, IR_VERSION))
    return proto


def check_writable(path: str) -> None:
    """Refuse early an output path that cannot be written, before any work is done."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise PtqcError(f"output path is a directory: {path}")
    if not os.path.isdir(folder):
        raise PtqcError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise PtqcError(f"output folder is not writable: {folder}")


def umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_atomic(proto: onnx.ModelProto, path: str) -> None:
    """Write the model to a temporary file beside ``path`` and rename it into place."""
    write_atomic(proto.SerializeToString(deterministic=True), path, ".onnx.tmp")


def write_atomic(data: bytes, path: str, suffix: str = ".tmp") -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: never a half-written file."""
    check_writable(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ptqc-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
