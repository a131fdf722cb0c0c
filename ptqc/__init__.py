"""ptqc: a power-of-two post-training quantization compiler for ONNX.

>>> import ptqc
>>> result = ptqc.compile("model.onnx", calib="images/", config=ptqc.QuantConfig(weight_bits=4, act_bits=8))
>>> onnx.save(result.model, "model.ptqc.onnx")
"""

__version__ = "0.1.0"

from ptqc.config import QuantConfig  # noqa: E402
from ptqc.errors import PtqcError  # noqa: E402
from ptqc.pipeline import CompileResult, compile  # noqa: E402

__all__ = ["CompileResult", "PtqcError", "QuantConfig", "compile", "__version__"]
