"""The per-layer report: its numbers recomputed by hand on a small graph, the HTML page, and the CLI."""

import base64
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import ptqc
from graphs import Builder, inputs, resnet_like, run
from ptqc import report, report_html
from ptqc.cli import main
from ptqc.data import ArrayData


def chain_1x1() -> onnx.ModelProto:
    """x -> 1x1 Conv -> Relu -> 1x1 Conv -> Relu -> GAP -> Flatten -> Gemm: every layer is easy to redo in numpy."""
    b = Builder(3)
    x = b.node("Relu", [b.conv("input", 3, 6, k=1)])
    x = b.node("Relu", [b.conv(x, 6, 8, k=1)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    w = b.rng.normal(0, 0.3, (5, 8)).astype(np.float32)
    b.node("Gemm", [x, b.init("fcW", w), b.init("fcB", np.zeros(5, np.float32))], transB=1)
    b.nodes[-1].output[0] = "logits"
    return b.model("input", "logits", ["N", 3, 4, 4], ["N", 5])


@pytest.fixture(scope="module")
def compiled():
    model = chain_1x1()
    x = inputs(40, size=4, seed=5)
    q = ptqc.compile(model, x[:24], ptqc.QuantConfig(weight_bits=4, act_bits=4, calib_size=24)).model
    rep = report.analyse(model, q, ArrayData(x[24:]), samples=16, batch_size=5)
    return model, q, x[24:], rep


def _snr(ref, other) -> float:
    ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    return 10 * math.log10(np.sum(ref**2) / np.sum((ref - other) ** 2))


def _dq_params(q: onnx.ModelProto, tensor: str):
    """(scale, zero point, code lo, code hi) of the activation quantizer of ``tensor``, read from the file."""
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == f"{tensor}_DequantizeLinear_Output")
    producer = {o: n for n in q.graph.node for o in n.output}
    src = producer[dq.input[0]]
    lo, hi = (int(inits[src.input[1]]), int(inits[src.input[2]])) if src.op_type == "Clip" else (0, 255)
    return float(inits[dq.input[1]]), int(inits[dq.input[2]]), lo, hi


def _fake_quant(x, scale, zp, lo, hi):
    return (np.clip(np.round(x / scale) + zp, lo, hi) - zp) * scale


def test_input_quantizer_numbers_by_hand(compiled):
    _, q, x, rep = compiled
    x = x[:16].astype(np.float64)
    t = rep.tensors["input"]
    scale, zp, lo, hi = _dq_params(q, "input")
    xq = _fake_quant(x, scale, zp, lo, hi)
    assert t.sqnr_db == pytest.approx(_snr(x, xq), abs=1e-6)
    # the graph input is quantized first, so accumulated and quantizer-alone SQNR are the same number
    assert t.quant_sqnr_db == pytest.approx(t.sqnr_db, abs=1e-6)
    top, bottom = (hi - zp) * scale, (lo - zp) * scale
    outside = (x > top) | (x < bottom)
    assert t.clip_ratio == pytest.approx(outside.mean(), abs=1e-12)
    clipped = np.clip(x, bottom, top)
    assert t.clip_error == pytest.approx(np.mean((x - clipped) ** 2), rel=1e-9, abs=1e-15)
    assert t.round_error == pytest.approx(np.mean((clipped - xq) ** 2), rel=1e-9)


def test_accumulated_sqnr_of_every_tensor_by_hand(compiled):
    model, q, x, rep = compiled
    x = x[:16]
    fp = report.prepare_float(model)
    names = list(rep.tensors)
    inner = [n for n in names if n != "input"]
    fp_vals = dict(zip(inner, run(_with_outputs(fp, inner), x, inner)))
    q_names = [f"{n}_DequantizeLinear_Output" for n in names]
    q_vals = dict(zip(names, run(_with_outputs(q, q_names), x, q_names)))
    fp_vals["input"] = x
    for name in names:
        ref = fp_vals[name] * rep.tensors[name].fp_scale
        assert rep.tensors[name].sqnr_db == pytest.approx(_snr(ref, q_vals[name]), abs=1e-5), name


def test_first_layer_alone_by_hand(compiled):
    """Quantized input, integer weights, int32 bias and the output quantizer, on the float input, in numpy."""
    model, q, x, rep = compiled
    x = x[:16].astype(np.float64)
    layer = rep.layers[0]
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    node = next(n for n in q.graph.node if n.name == layer.name)
    w_dq, b_dq = producer[node.input[1]], producer[node.input[2]]
    w = inits[w_dq.input[0]].astype(np.float64) * inits[w_dq.input[1]].reshape(-1, 1, 1, 1)
    bias = inits[b_dq.input[0]].astype(np.float64) * inits[b_dq.input[1]]
    xq = _fake_quant(x, *_dq_params(q, layer.input_tensor))
    acc = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], xq) + bias.reshape(1, -1, 1, 1)
    out = _fake_quant(acc, *_dq_params(q, layer.output_tensor))
    fp = report.prepare_float(model)
    ref = run(_with_outputs(fp, [layer.output_tensor]), x.astype(np.float32), [layer.output_tensor])[0]
    ref = ref * rep.tensors[layer.output_tensor].fp_scale
    assert layer.sqnr_alone_db == pytest.approx(_snr(ref, out), abs=1e-5)
    # the first layer sees no upstream error but its own input rounding: alone == accumulated there
    assert layer.sqnr_alone_db == pytest.approx(layer.sqnr_db, abs=1e-6)
    assert layer.weight_bits == 7 and layer.input_bits == 8  # first layer: 8-bit policy, pair-safe grid


def test_layers_read_back_with_bits_exponents_shifts_and_methods(compiled):
    _, _, _, rep = compiled
    assert [layer.op for layer in rep.layers] == ["Conv", "Conv", "Gemm"]
    mid = rep.layers[1]
    # its input is the first layer's output and its own output is pooled into the classifier: both 8-bit
    # under the first/last-layer policy, like the classifier's input
    assert (mid.weight_bits, mid.input_bits, mid.output_bits) == (4, 8, 8)
    assert mid.shifts == [mid.input_exp + e - mid.output_exp for e in mid.weight_exps]
    assert "gptq+exponent_search" in mid.methods and "bias_correction" in mid.methods
    assert rep.layers[-1].output_bits is None  # logits stay float
    assert rep.samples == 16 and 0.0 <= rep.agreement <= 100.0


def test_worst_layers_are_the_lowest_sqnr_alone(compiled):
    _, _, _, rep = compiled
    worst = rep.worst_layers(2)
    rest = [layer for layer in rep.layers if layer not in worst]
    assert all(w.sqnr_alone_db <= r.sqnr_alone_db for w in worst for r in rest)


def test_html_is_self_contained_with_decodable_figures(compiled, tmp_path):
    _, _, _, rep = compiled
    path = tmp_path / "r.html"
    report_html.write(rep, str(path))
    text = path.read_text()
    assert 'data-rendered="pending"' in text
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from elsewhere
    figures = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(figures) == 2
    for fig in figures:
        assert base64.b64decode(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count("<tr class=") == len(rep.layers)
    for hint in rep.hints:
        assert hint.split(":")[0].replace("&", "&amp;")[:40] in text.replace("&#x27;", "'")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_html_renders_in_headless_chromium(compiled, tmp_path):
    _, _, _, rep = compiled
    path = tmp_path / "r.html"
    report_html.write(rep, str(path))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stderr[-2000:]
    assert 'data-rendered="ok"' in body.group(0) and 'data-figures="2"' in body.group(0), body.group(0)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,900", path.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (900, 1200) and img.std() > 10  # not a blank page


def test_compile_api_returns_the_report():
    x = inputs(40, size=16, seed=2)
    result = ptqc.compile(resnet_like(), x, ptqc.QuantConfig(4, 4, calib_size=32), report_samples=8)
    assert result.report is not None and result.report.samples == 8
    assert len(result.report.layers) == 5 and "report" in result.timings


def test_report_cli(tmp_path):
    model, data = tmp_path / "m.onnx", tmp_path / "x.npy"
    onnx.save(resnet_like(), str(model))
    np.save(data, inputs(40, seed=4))
    out = tmp_path / "m.ptqc.onnx"
    runner = CliRunner()
    res = runner.invoke(main, ["compile", str(model), "--calib", str(data), "--w4a4", "-o", str(out),
                               "--report", str(tmp_path / "c.html"), "--report-samples", "8"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c.html").stat().st_size > 10_000
    res = runner.invoke(main, ["report", str(model), str(out), "--calib", str(data), "--samples", "8"])
    assert res.exit_code == 0, res.output
    assert os.path.exists(tmp_path / "m.ptqc.report.html")
    res = runner.invoke(main, ["report", str(model), str(model), "--calib", str(data)])
    assert res.exit_code == 2 and "no ptqc quantizers" in res.output


def test_report_measures_on_the_samples_after_the_calibration_ones(tmp_path):
    x = inputs(40, size=16, seed=6)
    data = tmp_path / "x.npy"
    np.save(data, x)
    held, text = report.measurement_data(str(data), None, 8, 24)
    np.testing.assert_array_equal(np.concatenate(list(held.batches(64))), x[24:32])
    assert text.startswith("8 held-out samples (after the first 24")
    first, text = report.measurement_data(str(data), None, 8, 40)  # nothing after the calibration samples
    np.testing.assert_array_equal(np.concatenate(list(first.batches(64))), x[:8])
    assert "the 40 the model was calibrated on" in text

    model, out = tmp_path / "m.onnx", tmp_path / "m.ptqc.onnx"
    onnx.save(resnet_like(), str(model))
    runner = CliRunner()
    res = runner.invoke(main, ["compile", str(model), "--calib", str(data), "--w4a4", "--calib-size", "24",
                               "-o", str(out), "--report", str(tmp_path / "c.html"), "--report-samples", "8"])
    assert res.exit_code == 0, res.output
    assert "on 8 held-out samples (after the first 24" in res.output
    assert "8 held-out samples (after the first 24" in (tmp_path / "c.html").read_text()
    # ptqc report skips what the model's metadata says it was calibrated on: the same numbers as x[24:32]
    expected = report.analyse(str(model), str(out), ArrayData(x[24:32]), samples=8)
    res = runner.invoke(main, ["report", str(model), str(out), "--calib", str(data), "--samples", "8", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{"):])
    assert got["measured_on"].startswith("8 held-out samples")
    assert got["logit_snr_db"] == expected.logit_snr_db and got["agreement"] == expected.agreement
    first8 = report.analyse(str(model), str(out), ArrayData(x[:8]), samples=8)
    res = runner.invoke(main, ["report", str(model), str(out), "--calib", str(data), "--samples", "8", "--json",
                               "--skip", "0"])
    got = json.loads(res.output[res.output.index("{"):])
    assert got["measured_on"] == "the first 8 samples" and got["logit_snr_db"] == first8.logit_snr_db
    assert first8.logit_snr_db != expected.logit_snr_db


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m
