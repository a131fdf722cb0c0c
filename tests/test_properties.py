"""Property test: random small graphs compile, verify bit-exact against onnxruntime, and export round-trip.

Graphs are chains of blocks (plain, strided, grouped and depthwise convs, residual Adds, MaxPool, Concat,
Clip/Relu) ending in a head (GlobalAveragePool into Gemm or a 1x1 Conv, or Flatten / Reshape into Gemm), with
random widths, sizes, bit widths 2-8 and both rounding rules.  200 examples, derandomized so CI is repeatable.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptqc
from graphs import Builder
from ptqc.intexec import Executor
from ptqc.intprog import Program, lower
from ptqc.verify import verify

BLOCKS = ("conv", "conv_s2", "group", "dw", "res", "maxpool", "concat", "clip6", "relu")
HEADS = ("gap_gemm", "gap_conv", "flatten_gemm", "reshape_gemm")


@st.composite
def specs(draw):
    return {
        "seed": draw(st.integers(0, 10_000)),
        "size": draw(st.sampled_from([6, 8, 9, 12])),
        "width": draw(st.sampled_from([4, 6, 8])),
        "blocks": draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4)),
        "head": draw(st.sampled_from(HEADS)),
        "wbits": draw(st.integers(2, 8)),
        "abits": draw(st.integers(2, 8)),
        "rounding": draw(st.sampled_from(["half-even", "half-up"])),
        "first_last_8bit": draw(st.booleans()),
    }


def build(spec):
    b = Builder(spec["seed"])
    rng = b.rng
    c, size = spec["width"], spec["size"]
    x = b.node("Relu", [b.conv("input", 3, c, k=3)])
    for kind in spec["blocks"]:
        if kind == "conv":
            x = b.node("Relu", [b.conv(x, c, c, k=int(rng.choice([1, 3])))])
        elif kind == "conv_s2" and size >= 4:
            x = b.node("Relu", [b.conv(x, c, c, k=3, stride=2)])
            size = (size + 1) // 2
        elif kind == "group" and c % 2 == 0:
            x = b.node("Relu", [b.conv(x, c, c, k=3, group=2)])
        elif kind == "dw":
            x = b.conv(x, c, c, k=3, group=c)
        elif kind == "res":
            y = b.conv(b.node("Relu", [b.conv(x, c, c, k=3)]), c, c, k=1)
            x = b.node("Add", [x, y])
        elif kind == "maxpool" and size >= 4:
            x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            size //= 2
        elif kind == "concat":
            y = b.node("Relu", [b.conv(x, c, c, k=1)])
            x = b.conv(b.node("Concat", [x, y], axis=1), 2 * c, c, k=1)
        elif kind == "clip6":
            lo, hi = b.init("lo", np.array(0.0, np.float32)), b.init("hi", np.array(6.0, np.float32))
            x = b.node("Clip", [x, lo, hi])
        elif kind == "relu":
            x = b.node("Relu", [x])
    classes = 5
    head = spec["head"]
    if head == "gap_conv":
        x = b.conv(b.node("GlobalAveragePool", [x]), c, classes, k=1)
        b.node("Flatten", [x], axis=1)
    else:
        if head == "gap_gemm":
            x, feat = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), c
        elif head == "flatten_gemm":
            x, feat = b.node("Flatten", [x], axis=1), c * size * size
        else:
            x, feat = b.node("Reshape", [x, b.init("shape", np.array([0, -1], np.int64))]), c * size * size
        w = rng.normal(0, 1.0 / np.sqrt(feat), (classes, feat)).astype(np.float32)
        b.node("Gemm", [x, b.init("fcW", w), b.init("fcB", rng.normal(0, 0.1, classes).astype(np.float32))], transB=1)
    b.nodes[-1].output[0] = "logits"
    return b.model("input", "logits", ["N", 3, spec["size"], spec["size"]], ["N", classes])


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=specs())
def test_random_graphs_compile_verify_and_export(spec, tmp_path_factory):
    model = build(spec)
    rng = np.random.default_rng(spec["seed"])
    calib = np.clip(rng.normal(0, 0.6, (16, 3, spec["size"], spec["size"])), -1, 1).astype(np.float32)
    cfg = ptqc.QuantConfig(weight_bits=spec["wbits"], act_bits=spec["abits"], calib_size=16,
                           first_last_8bit=spec["first_last_8bit"], rounding=spec["rounding"], gptq_samples=16,
                           block_iters=5)
    q = ptqc.compile(model, calib, cfg).model
    x = np.clip(rng.normal(0, 0.7, (6, 3, spec["size"], spec["size"])), -1.2, 1.2).astype(np.float32)
    report = verify(q, x)
    assert report.ok, (spec, str(report.mismatch), report.errors)
    assert report.compared_values > 0 and max(report.float_outputs.values()) == 0.0
    folder = str(tmp_path_factory.mktemp("export"))
    program = lower(q)
    program.save(folder)
    again = Program.load(folder)
    a, b = Executor(program).run({"input": x}).values, Executor(again).run({"input": x}).values
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
