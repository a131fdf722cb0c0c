"""RAPQ's whole-network trade-off: adjust activation exponents against the end-to-end error.

Per-tensor least-squares exponents are chosen one tensor at a time.  A coarser grid (less clipping, more
rounding) or a finer one can be better for the *network*, because errors interact downstream.  The pass
runs a simulation of the quantized model (``ptqc.simulate``, activation scales fed as inputs, so one
onnxruntime session evaluates every candidate) on ``samples`` calibration images and guarantees:

* every activation group's exponent is a local optimum of the squared error between the float and the
  quantized logits under single moves of -1/+1 (greedy coordinate descent in topological order, at most
  ``sweeps`` sweeps; LAPQ/RAPQ-style derivative-free search, methods.md 2.3);
* the end-to-end error after the pass is never larger than before it (a move is kept only if it lowers it);
* an exponent fixed by absorb_clip_range only moves to a finer grid, so its clip never needs an extra op.
"""

from __future__ import annotations

__all__ = ["SearchActExponentsPass"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc import progress, runtime, simulate
from ptqc.annotations import ACT
from ptqc.data import Dataset
from ptqc.passes.calibrate import float_session, run_batch
from ptqc.quant import int_range

logger = logging.getLogger(__name__)


class SearchActExponentsPass(ir.passes.InPlacePass):
    """Greedy +-1 search of activation exponents on the float-vs-quantized logit error."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int = 64, sweeps: int = 2):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.samples = samples
        self.sweeps = sweeps

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = simulate.planned_values(model)
        if not values:
            return ir.passes.PassResult(model, modified=False)
        sim = simulate.build(model, scale_inputs=True)
        session = runtime.make_session(sim.proto, what="the simulated model")
        out_name = session.get_outputs()[0].name
        fp_session = float_session(model, [])
        batches = list(self.data.head(self.samples, self.batch_size))
        targets = [run_batch(fp_session, sim.input_name, batch, [out_name])[0] for batch in batches]
        norm = sum(float((t.astype(np.float64) ** 2).sum()) for t in targets) or 1.0

        def error(exps: dict[str, int]) -> float:
            feed = simulate.scale_feed(model, sim, exps)
            total = 0.0
            for x, t in zip(batches, targets):
                y = runtime.run(session, {sim.input_name: x, **feed}, [out_name])[0]
                total += float(((y - t).astype(np.float64) ** 2).sum())
            return total / norm

        groups: dict[int, list[ir.Value]] = {}
        for v in values:
            groups.setdefault(v.meta[ACT].group, []).append(v)
        current = {v.name: v.meta[ACT].exp for v in values}
        start = best = error(current)
        moves = 0
        for _ in range(self.sweeps):
            improved = False
            for members in progress.steps(list(groups.values()), "search exponents", unit="tensor"):
                act = members[0].meta[ACT]
                pinned = act.clip_hi is not None and act.fused is not None and np.isclose(
                    act.clip_hi, int_range(act.bits, act.signed)[1] * 2.0**act.exp)
                for delta in ((-1,) if pinned else (-1, 1)):
                    trial = dict(current)
                    for v in members:
                        trial[v.name] += delta
                    err = error(trial)
                    if err < best:
                        best, current = err, trial
                        moves += 1
                        improved = True
                        break
            if not improved:
                break
        for v in values:
            v.meta[ACT].exp = current[v.name]
        logger.info("activation exponent search: %d moves, relative logit error %.4g -> %.4g", moves, start, best)
        model.graph.meta["ptqc.act_search"] = (start, best, moves)
        return ir.passes.PassResult(model, modified=bool(moves))
