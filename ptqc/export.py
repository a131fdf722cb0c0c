"""``ptqc export-int``: the integer program of a QDQ model, as numpy arrays plus a JSON manifest.

The folder holds ``program.json`` (format ``ptqc-int/1``: tensors with exponent, code range, bit width and
zero point; steps in execution order with their inputs, attributes, requantization shift and saturation) and
``arrays.npz`` (integer weights, int32 biases, per-channel shifts).  :class:`ptqc.intprog.Program.load` reads
it back, and ``ptqc verify MODEL --program DIR`` runs the reference from it alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from ptqc.errors import PtqcError
from ptqc.intprog import lower, overflow_findings
from ptqc.loader import read_model


def export_program(model_path: str, folder: str) -> str:
    """Lower ``model_path`` and write the export to ``folder`` (replaced as a whole; nothing half-written is
    left on failure).  Returns a one-line summary."""
    program = lower(read_model(model_path))
    errors, _ = overflow_findings(program)
    if errors:
        raise PtqcError(errors[0])
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise PtqcError(f"{folder} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.exists(os.path.join(folder, "program.json")):
        raise PtqcError(f"{folder} is not empty and holds no earlier export; refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ptqc-export-", dir=parent)
        os.chmod(tmp, 0o755)
    except OSError as exc:
        raise PtqcError(f"cannot write to {parent}: {exc.strerror}") from None
    try:
        program.save(tmp)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    layers = sum(1 for s in program.steps if s.op in ("Conv", "Gemm"))
    weight_bytes = sum(int(np.asarray(program.arrays[s.consts["w"]]).size) for s in program.steps if "w" in s.consts)
    return (f"wrote {folder}: {len(program.steps)} steps ({layers} layers), {len(program.tensors)} quantized tensors, "
            f"{weight_bytes} weight codes, rounding {program.rounding}")
