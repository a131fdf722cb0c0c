"""Per-layer precision (--bits NAME=N, TOML config) and the sensitivity ranking, on small graphs."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import ptqc
from graphs import inputs, mobilenet_like, resnet_like
from ptqc.cli import main
from ptqc.config import load_toml, parse_layer_bits
from ptqc.errors import PtqcError
from ptqc.inspect import inspect_model
from ptqc.sensitivity import analyse, layer_names, logit_snr

CALIB = inputs(48, seed=5)


def _widths(model):
    rows = {r.name: r for r in inspect_model(model).rows}
    return {name: (r.w_bits, r.a_bits.split("->")[0]) for name, r in rows.items() if r.op in ("Conv", "Gemm")}


def test_layer_bits_override_weights_and_input():
    model = resnet_like(1)
    names = [n for n, _ in layer_names(model)]
    mid, other = names[1], names[2]
    cfg = ptqc.QuantConfig(4, 4, calib_size=48, layer_bits={mid: 8, other: "w2a8"})
    q = ptqc.compile(model, CALIB, cfg).model
    w = _widths(q)
    assert w[mid] == ("8", "8") and w[other] == ("2+zp", "8")  # 2-bit rows get grid offsets (zero points)
    assert w[names[3]] == ("4", "4")
    assert inspect_model(q).ok


def test_first_layer_output_is_8_bit_under_the_first_last_policy():
    """BRECQ/RAPQ's first/last-layer convention keeps the first layer's output quantizer at 8 bits, not
    only its weights and input: in mobilenet_like that is the fused Clip the depthwise conv reads.  With the
    policy off (--all-low-bit) it is at the activation width like every other activation."""
    model = mobilenet_like(0)
    names = [n for n, _ in layer_names(model)]
    rows = lambda **kw: {r.name: r for r in inspect_model(ptqc.compile(model, CALIB, ptqc.QuantConfig(
        4, 4, calib_size=48, adaround=False, block_recon=False, **kw)).model).rows}
    on, off = rows(), rows(first_last_8bit=False)
    assert on[names[0]].a_bits.split("->")[1] == "8" and on[names[1]].a_bits.split("->")[0] == "8"
    assert on[names[1]].w_bits == "4" and on[names[1]].a_bits.split("->")[1] == "4"  # the rest stays low-bit
    assert off[names[0]].a_bits.split("->")[1] == "4" and off[names[1]].a_bits.split("->")[0] == "4"


def test_raised_layer_raises_an_output_only_an_add_reads():
    """resnet_like's second block conv writes a tensor only the residual Add reads: no other layer's setting
    reaches it, so raising that conv raises it too; the first block conv's output feeds a layer, and stays."""
    model = resnet_like(1)
    names = [n for n, _ in layer_names(model)]
    branch, inner = names[2], names[1]
    outputs = lambda q: {r.name: r.a_bits.split("->")[1] for r in inspect_model(q).rows if r.op == "Conv"}
    compiled = lambda bits: outputs(ptqc.compile(model, CALIB, ptqc.QuantConfig(
        4, 4, calib_size=48, layer_bits=bits, residual_bits=4)).model)
    base = compiled({})
    assert base[branch] == base[inner] == "4"
    assert compiled({branch: 8})[branch] == "8"
    assert compiled({inner: 8})[inner] == "4"


def test_residual_branch_width():
    """By default a conv output that only the residual Add reads is requantized to residual_bits (8), the sum
    and every other activation to act_bits; residual_bits=act_bits puts the branch on that width.  The shortcut
    is the stem's output (through the MaxPool), 8-bit under the first-layer policy."""
    model = resnet_like(1)
    names = [n for n, _ in layer_names(model)]
    branch, inner = names[2], names[1]

    def widths(**kw):
        q = ptqc.compile(model, CALIB, ptqc.QuantConfig(4, 4, calib_size=48, adaround=False, block_recon=False, **kw)).model
        report = inspect_model(q)
        assert report.ok
        rows = {r.name: r for r in report.rows}
        adds = [r.a_bits for r in report.rows if r.op == "Add"]
        return rows[branch].a_bits.split("->")[1], rows[inner].a_bits.split("->")[1], adds

    assert widths() == ("8", "4", ["8/8->4"])  # Add(branch, shortcut)
    assert widths(residual_bits=4) == ("4", "4", ["4/8->4"])
    assert widths(residual_bits=2) == ("4", "4", ["4/8->4"])  # never below act_bits


def test_tensors_beside_a_float_layer_are_8_bit():
    """A tensor a kept-float layer writes or reads that still gets a quantizer (a residual Add reads it) is at
    8 bits, whatever the activation and residual widths: no layer setting reaches it once its layer is float."""
    model = resnet_like(1)
    names = [n for n, _ in layer_names(model)]

    def quantizer_bits(keep, side):
        q = ptqc.compile(model, CALIB, ptqc.QuantConfig(4, 4, calib_size=48, residual_bits=4, adaround=False,
                                                        block_recon=False, keep_float=[keep])).model
        node = next(n for n in q.graph.node if n.name == keep)
        tensor = node.output[0] if side == "out" else node.input[0]
        ql = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
        assert len(ql) == 1
        return {p.key: p.value for p in ql[0].metadata_props}["ptqc.bits"]

    assert quantizer_bits(names[2], "out") == "8"  # the residual branch, read only by the Add
    assert quantizer_bits(names[1], "in") == "8"  # the block input, which the Add reads too


def test_unknown_layer_name_is_one_clear_error():
    with pytest.raises(PtqcError, match="no quantizable layer named 'nope'"):
        ptqc.compile(resnet_like(1), CALIB, ptqc.QuantConfig(4, 4, calib_size=16, layer_bits={"nope": 8}))


def test_layer_bits_parsing():
    assert parse_layer_bits(["a=8", "b.c=w2a4"]) == {"a": 8, "b.c": "w2a4"}
    for bad in ["a", "=8", "a=9", "a=w9a4"]:
        with pytest.raises(PtqcError):
            parse_layer_bits([bad])


def test_toml_config_and_command_line_precedence(tmp_path):
    model = resnet_like(1)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", CALIB)
    mid = layer_names(model)[1][0]
    (tmp_path / "c.toml").write_text(f'bits = "w4a4"\nbias_correction = false\ncalib_size = 32\n[layers]\n{mid} = 8\n')
    settings = load_toml(str(tmp_path / "c.toml"))
    assert settings == {"weight_bits": 4, "act_bits": 4, "bias_correction": False, "calib_size": 32, "layer_bits": {mid: 8}}
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"),
                                    "--config", str(tmp_path / "c.toml"), "--act-bits", "8", "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 0, res.output
    q = onnx.load(tmp_path / "q.onnx")
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["ptqc.config.weight_bits"] == "4" and meta["ptqc.config.act_bits"] == "8"  # the flag wins
    assert meta["ptqc.config.bias_correction"] == "False" and meta["ptqc.config.calib_size"] == "32"
    # GPTQ and the blocks read every calibration sample unless told otherwise
    assert meta["ptqc.config.gptq_samples"] == meta["ptqc.config.block_samples"] == "auto: 32"
    assert meta["ptqc.config.block_freeze"] == "auto: 0.0"  # hardening progressively is the 2- and 3-bit default
    assert meta["ptqc.config.weight_offsets"] == "auto: False"  # grid offsets are the default below 4 bits only
    assert _widths(q)[mid] == ("8", "8")
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"),
                                    "--config", str(tmp_path / "c.toml"), "--act-bits", "8", "--weight-offsets",
                                    "-o", str(tmp_path / "z.onnx")])
    assert res.exit_code == 0, res.output
    z = onnx.load(tmp_path / "z.onnx")
    assert {p.key: p.value for p in z.metadata_props}["ptqc.config.weight_offsets"] == "True"
    assert {w for w, _ in _widths(z).values()} == {"4+zp", "8", "7"}  # inner 4-bit layers; not the first and last
    (tmp_path / "bad.toml").write_text("bits = [\n")
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"),
                                    "--config", str(tmp_path / "bad.toml")])
    assert res.exit_code == 2 and "not valid TOML" in res.output


def test_logit_snr_by_hand():
    fp = np.array([[3.0, 4.0]])
    assert logit_snr(fp, fp) == float("inf")
    assert logit_snr(fp, np.array([[3.0, 3.0]])) == pytest.approx(10 * np.log10(25.0))


def test_sensitivity_ranks_every_layer_worst_first():
    model = resnet_like(2)
    held = inputs(32, seed=8)
    res = analyse(model, CALIB[:32], ptqc.QuantConfig(2, 4, calib_size=32), held)
    names = [n for n, _ in layer_names(model)]
    assert sorted(s.name for s in res.layers) == sorted(names)
    snrs = [s.snr_db for s in res.layers]
    assert snrs == sorted(snrs)
    # one layer at 2 bits loses less than the whole low-bit model but more than the 8-bit baseline
    assert res.baseline_snr_db > max(snrs) and res.baseline_snr_db > res.low_snr_db


def test_sensitivity_cli_json(tmp_path):
    onnx.save(resnet_like(2), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", inputs(64, seed=4))
    res = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"),
                                    "--calib-size", "32", "--eval-size", "32", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert len(d["layers"]) == 5 and d["layers"][0]["snr_db"] <= d["layers"][-1]["snr_db"]
    res = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"),
                                    "--calib-size", "64"])
    assert res.exit_code == 2 and "sensitivity scores on the samples after the first 64" in res.output
