"""Rewrite a GlobalAveragePool that feeds a linear layer as a sum, with 1/(H*W) folded into that layer.

Average pooling divides by H*W (49 for a 7x7 map), which is not a power of two and so not a shift.  Where
the pooled tensor goes, through Flatten/Reshape/Squeeze only, into a 1x1 Conv, a Gemm or a MatMul with
constant weights, the pass guarantees:

* the GlobalAveragePool is replaced by ``ReduceSum(axes=[2, 3], keepdims=1)``;
* that layer's weights are divided by H*W, so the model computes the same function;
* the pooled tensor keeps its name.

A GlobalAveragePool with any other consumer, or with an unknown spatial size, is left alone; ``ptqc inspect``
reports it as a step that is not a shift.
"""

from __future__ import annotations

__all__ = ["GapToSumPass"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.passes.fold_batchnorm import const, new_initializer

logger = logging.getLogger(__name__)

_SHAPE_ONLY = ("Flatten", "Reshape", "Squeeze")


class GapToSumPass(ir.passes.InPlacePass):
    """GlobalAveragePool -> ReduceSum where a following linear layer can absorb the 1/(H*W)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "GlobalAveragePool":
                continue
            x = node.inputs[0]
            if x.shape is None or len(x.shape) != 4 or not all(isinstance(d, int) for d in x.shape[2:]):
                continue
            area = int(x.shape[2]) * int(x.shape[3])
            linear = self._linear_consumer(graph, node.outputs[0])
            if linear is None:
                continue
            w = const(linear.inputs[1])
            lname = linear.name or linear.outputs[0].name
            linear.replace_input_with(1, new_initializer(graph, f"{lname}_W_sum", (w / area).astype(w.dtype)))
            axes = new_initializer(graph, f"{node.name or 'gap'}_axes", np.array([2, 3], dtype=np.int64))
            red = ir.node("ReduceSum", [x, axes], attributes={"keepdims": 1}, name=f"{node.name or 'gap'}_sum")
            graph.insert_before(node, red)
            out = node.outputs[0]
            red.outputs[0].shape = out.shape
            red.outputs[0].type = out.type
            red.outputs[0].doc_string = f"sum over {area} positions; 1/{area} folded into {lname}"
            out.replace_all_uses_with(red.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            name = out.name
            out.name = None
            red.outputs[0].name = name
            count += 1
        if count:
            logger.info("rewrote %d GlobalAveragePool nodes as sums", count)
        return ir.passes.PassResult(model, modified=bool(count))

    @staticmethod
    def _linear_consumer(graph: ir.Graph, value: ir.Value) -> ir.Node | None:
        while True:
            if value in graph.outputs or len(value.uses()) != 1:
                return None
            user = next(iter(value.uses())).node
            if user.op_type in _SHAPE_ONLY:
                value = user.outputs[0]
                continue
            if user.inputs[0] is not value or len(user.inputs) < 2:
                return None
            w = const(user.inputs[1])
            if w is None or len(user.inputs[1].uses()) != 1:
                return None
            if user.op_type == "Conv":
                if w.ndim != 4 or w.shape[2:] != (1, 1) or user.attributes.get_int("group", 1) != 1:
                    return None
                return user
            if user.op_type in ("Gemm", "MatMul") and w.ndim == 2:
                if user.op_type == "Gemm" and user.attributes.get_int("transA", 0):
                    return None
                return user
            return None
