"""Compiling small graphs: accuracy at 8 bits, power-of-two scales, shifts, ORT fusion, exact saturation."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import ptqc
from graphs import inputs, mobilenet_like, resnet_like, run
from ptqc.inspect import inspect_model
from ptqc.quant import is_pow2

CALIB = inputs(64, seed=5)


def _compile(model, wb=8, ab=8, **kw):
    return ptqc.compile(model, CALIB, ptqc.QuantConfig(weight_bits=wb, act_bits=ab, calib_size=64, **kw)).model


@pytest.fixture(scope="module")
def resnet():
    return resnet_like()


@pytest.fixture(scope="module")
def resnet_w8a8(resnet):
    return _compile(resnet)


def test_w8a8_resnet_stays_close_to_fp32(resnet, resnet_w8a8):
    x = inputs(32, seed=9)
    fp, q = run(resnet, x)[0], run(resnet_w8a8, x)[0]
    rel = np.linalg.norm(q - fp) / np.linalg.norm(fp)
    assert rel < 0.03, rel
    assert (q.argmax(1) == fp.argmax(1)).mean() >= 0.9


def test_every_scale_is_exactly_a_power_of_two(resnet_w8a8):
    inits = {i.name: numpy_helper.to_array(i) for i in resnet_w8a8.graph.initializer}
    scales = [inits[n.input[1]] for n in resnet_w8a8.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(scales) > 10
    assert all(is_pow2(s) for s in scales)


def test_every_requant_is_a_shift_and_inspect_passes(resnet_w8a8):
    report = inspect_model(resnet_w8a8)
    assert report.ok, (report.problems, report.non_shift, report.float_ops)
    convs = [r for r in report.rows if r.op == "Conv"]
    assert len(convs) == 4 and all(r.shift for r in convs)
    adds = [r for r in report.rows if r.op == "Add"]
    assert len(adds) == 1 and adds[0].shift


def test_names_are_kept_and_logits_stay_float(resnet, resnet_w8a8):
    assert [i.name for i in resnet_w8a8.graph.input] == ["input"]
    assert [o.name for o in resnet_w8a8.graph.output] == ["logits"]
    producer = {o: n for n in resnet_w8a8.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"


@pytest.mark.parametrize("kw", [{}, dict(wb=4, ab=4, adaround=True, adaround_iters=20, adaround_samples=16)],
                         ids=["w8a8", "w4a4-adaround"])
def test_output_is_deterministic(resnet, kw):
    a = _compile(resnet, **kw).SerializeToString(deterministic=True)
    b = _compile(resnet, **kw).SerializeToString(deterministic=True)
    assert a == b


def test_onnxruntime_fuses_w8a8_convs_into_int8_kernels(resnet_w8a8, tmp_path):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(resnet_w8a8.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4, ops
    assert "Conv" not in ops


@pytest.mark.parametrize("wb,ab", [(4, 4), (2, 4), (3, 3), (2, 2)])
def test_low_bit_codes_saturate_at_the_declared_range(resnet, wb, ab):
    q = _compile(resnet, wb, ab)
    assert inspect_model(q).ok
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    # weights: int8 container, values inside the b-bit range (first/last layers are 8-bit); below 4 bits a row
    # may have a grid offset z: then it holds m (k + z) for k in the b-bit range, m = 2 where z is half-integer
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8:
            meta = {p.key: p.value for p in n.metadata_props}
            bits = int(meta["ptqc.bits"])
            w = inits[n.input[0]].reshape(inits[n.input[0]].shape[0], -1).astype(np.int64)
            z = np.array([float(t) for t in meta["ptqc.offset"].split()]) if "ptqc.offset" in meta else 0 * w[:, 0]
            assert "ptqc.offset" not in meta or bits < 4
            m = np.where(z % 1 != 0, 2, 1)[:, None]
            assert np.all(w % m == m // 2)  # odd in a half-integer row
            k = w / m - z[:, None]
            assert k.min() >= -(1 << (bits - 1)) and k.max() <= (1 << (bits - 1)) - 1
    # activations: run the graph with every DequantizeLinear input exposed and check the codes
    acts = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    for n in acts:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(n.input[0], onnx.TensorProto.UINT8, None))
    outs = run(probe, inputs(16, seed=3), [n.input[0] for n in acts])
    low = 0
    for n, codes in zip(acts, outs):
        bits = int(next(p.value for p in n.metadata_props if p.key == "ptqc.bits"))
        signed = next(p.value for p in n.metadata_props if p.key == "ptqc.signed") == "1"
        zp = int(inits[n.input[2]])
        vals = codes.astype(np.int64) - zp
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        assert vals.min() >= lo and vals.max() <= hi, (n.name, vals.min(), vals.max(), bits)
        low += bits == ab
    # the block's inner Relu and the Relu after the Add; the stem's output is 8-bit (first-layer policy)
    assert low >= 2


def test_first_and_last_layers_stay_8bit_unless_all_low_bit(resnet):
    def weight_bits(model):
        return [int(next(p.value for p in n.metadata_props if p.key == "ptqc.weight_bits"))
                for n in model.graph.node if n.op_type in ("Conv", "Gemm")]

    # the first layer's 8 bits are a 7-bit grid: its signed input would saturate onnxruntime's u8 x s8 pairs
    assert weight_bits(_compile(resnet, 2, 4)) == [7, 2, 2, 2, 8]
    assert weight_bits(_compile(resnet, 2, 4, pair_safe_first=False)) == [8, 2, 2, 2, 8]
    assert weight_bits(_compile(resnet, 2, 4, first_last_8bit=False)) == [2, 2, 2, 2, 2]


def test_relu6_fused_as_integer_clip_is_exact():
    """Clip(0, 6) becomes a saturation on the integer codes; the result equals Q(Clip(x))."""
    model = mobilenet_like()
    q = _compile(model)
    report = inspect_model(q)
    assert report.ok, (report.problems, report.non_shift, report.float_ops)
    assert not any(n.op_type == "Clip" and not n.name.endswith("_saturate") for n in q.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for n in q.graph.node:
        if n.name.endswith("_saturate"):
            scale = inits[n.input[0].replace("_quantized", "_scale")]
            hi = int(inits[n.input[2]])
            assert hi == min(255, int(np.round(6.0 / scale)))
    x = inputs(32, seed=4)
    fp, out = run(model, x)[0], run(q, x)[0]
    assert np.linalg.norm(out - fp) / np.linalg.norm(fp) < 0.05


def test_dataset_head_stops_at_the_sample_count_without_reading_further():
    from ptqc.data import ArrayData

    class Counting(ArrayData):
        read = 0

        def batches(self, batch_size):
            for batch in super().batches(batch_size):
                Counting.read += 1
                yield batch

    data = Counting(np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2))
    sizes = [len(b) for b in data.head(7, 3)]
    assert sizes == [3, 3, 1] and Counting.read == 3
    assert [len(b) for b in data.head(50, 4)] == [4, 4, 2]
    assert list(data.head(0, 4)) == []
