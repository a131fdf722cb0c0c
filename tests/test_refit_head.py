"""The head refit (passes/refit_head.py): its ridge solver, its cross-validated refusal, and the pass."""

import numpy as np
import pytest

import ptqc
from graphs import inputs, mobilenet_like, resnet_like, run
from ptqc.errors import PtqcError
from ptqc.passes.refit_head import FOLDS, HeadStats, ridge_refit


def _stats(a: np.ndarray, r: np.ndarray) -> HeadStats:
    a = np.hstack([a, np.ones((len(a), 1))])
    stats = HeadStats.empty(a.shape[1], r.shape[1])
    for k in range(FOLDS):
        stats.add(k, a[k::FOLDS], r[k::FOLDS])
    return stats


def test_ridge_refit_recovers_a_linear_correction_and_lowers_the_held_out_error():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 12))
    m = rng.normal(size=(13, 5))
    r = np.hstack([a, np.ones((2000, 1))]) @ m + 0.1 * rng.normal(size=(2000, 5))
    dw, info = ridge_refit(_stats(a, r))
    assert dw is not None
    assert np.linalg.norm(dw - m) < 0.05 * np.linalg.norm(m)
    assert info["cv"].min() < 0.02  # cross-validated error relative to leaving the layer alone
    assert info["strength"] <= 0.03  # plenty of clean samples: hardly any shrinkage


def test_ridge_refit_leaves_the_layer_alone_when_the_error_is_not_predictable_from_its_input():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 40))
    r = rng.normal(size=(300, 6))  # independent of the input: any fit only fits noise
    dw, info = ridge_refit(_stats(a, r))
    assert dw is None
    assert info["cv"].min() > 0.99


@pytest.mark.parametrize("make", [mobilenet_like, resnet_like])
def test_head_refit_lowers_the_output_error_on_unseen_inputs_and_keeps_shift_only_scales(make):
    from ptqc.inspect import inspect_model

    model = make()
    calib, test = inputs(256), inputs(256, seed=7)
    ref = run(model, test)[0]
    cfg = dict(weight_bits=2, act_bits=4, calib_size=256, block_recon=False, adaround=False)
    plain = ptqc.compile(model, calib, ptqc.QuantConfig(**cfg, refit_head=False)).model
    refit = ptqc.compile(model, calib, ptqc.QuantConfig(**cfg)).model
    err = lambda m: float(((run(m, test)[0] - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    assert err(refit) < 0.5 * err(plain)  # measured 0.21 (1x1 Conv head) and 0.37 (Gemm head)
    assert inspect_model(refit).ok
    heads = [n for n in refit.graph.node for p in n.metadata_props
             if p.key == "ptqc.methods" and "refit_head" in p.value]
    assert len(heads) == 1 and heads[0].op_type in ("Conv", "Gemm")


def test_head_refit_is_on_below_8_bit_activations_and_needs_data():
    assert ptqc.QuantConfig(weight_bits=4, act_bits=4).use_refit_head
    assert ptqc.QuantConfig(weight_bits=8, act_bits=4).use_refit_head
    assert not ptqc.QuantConfig(weight_bits=4, act_bits=8).use_refit_head
    assert not ptqc.QuantConfig(weight_bits=4, act_bits=4, refit_head=False).use_refit_head
    assert not ptqc.QuantConfig(weight_bits=4, act_bits=4).for_trials().use_refit_head
    assert ptqc.QuantConfig(weight_bits=4, act_bits=4).as_metadata()["ptqc.config.refit_head"] == "auto: True"
    with pytest.raises(PtqcError, match="--refit-head and --arcq need calibration data"):
        ptqc.compile(resnet_like(), None, ptqc.QuantConfig(weight_bits=8, act_bits=8, refit_head=True))
