"""Benchmark ptqc compile against FP32 and onnxruntime's quantize_static on the real ImageNet models.

    python bench/bench_compile.py                      # all models, w8a8 w4a8 w4a4 w2a4, 256 calibration images
    python bench/bench_compile.py --models mobilenet_v2_1.0_224 --bits w8a8 --rss-sweep
    python bench/render.py bench/results/compile.jsonl > docs/benchmarks.md

Prints one JSON line per measurement (and appends it to --out).  Each compile runs in a child process, so
its seconds and peak RSS are its own.  Every record names the commit of the checkout this script sits in
(``-dirty`` when its ptqc/ or passes/ differ from that commit), so run it from the checkout whose ptqc is
installed: ``git worktree add /tmp/snap <commit>; pip install /tmp/snap; python /tmp/snap/bench/...``.
Models and images come from --shared (default $PTQC_SHARED or ../shared); without them the script exits
with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MODELS = {"mobilenet_v2_1.0_224": "tf", "mobilenet_v1_0.75_224": "tf", "efficientnet_lite0_bn": "lite"}

#: the methods later columns add, off in the earlier variants so that each column measures what it names
_LATER_OFF = dict(adaround=False, block_recon=False, learn_clip=False, equalize_residual=False)
#: Ablation variants: each adds one method to the one before; "default" is what `ptqc compile` does.
VARIANTS = {
    "rtn": dict(_LATER_OFF, bias_correction=False, absorb_clip=False, gptq=False, continuous_clip=False),
    "bc": dict(_LATER_OFF, bias_correction=True, absorb_clip=False, gptq=False, continuous_clip=False),  # + bias
    "absorb": dict(_LATER_OFF, bias_correction=True, absorb_clip=True, gptq=False, continuous_clip=False),
    "gptq": dict(_LATER_OFF, bias_correction=True, absorb_clip=True, gptq=True, continuous_clip=False),
    "clip": dict(_LATER_OFF),  # + continuous clipping thresholds below 8 bits
    "learnclip": dict(_LATER_OFF, learn_clip=None),  # + thresholds learned on block outputs
    "adaround": dict(_LATER_OFF, adaround=True),  # clip + AdaRound below 8-bit weights
    "default": {},  # + block reconstruction below 8-bit weights
    "equalize": dict(equalize_channels=True),  # + per-channel thresholds (option)
    # the default + ARCQ's remainder compensation on that share of the low-bit convs (opt-in; extra MACs recorded)
    "arcq25": dict(arcq=0.25),
    "arcq50": dict(arcq=0.5),
    "arcq100": dict(arcq=1.0),
}
HERE = os.path.dirname(os.path.abspath(__file__))


def source_commit() -> str | None:
    """The short commit of the checkout this script is in, ``-dirty`` if its ptqc/ or passes/ differ from it;
    None outside a git checkout."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "ptqc",
                                "passes"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------- workers
def worker_ptqc(args) -> dict:
    import onnx

    import ptqc
    from ptqc.config import parse_shorthand
    from ptqc.data import make_preprocess

    wb, ab = parse_shorthand(args.bits[0] if isinstance(args.bits, list) else args.bits)
    variant = args.variants[0] if isinstance(args.variants, list) else args.variants
    start = time.perf_counter()
    config = ptqc.QuantConfig(wb, ab, calib_size=args.calib_size, **VARIANTS[variant])
    res = ptqc.compile(args.model, args.calib, config, make_preprocess(args.preprocess))
    seconds = time.perf_counter() - start
    onnx.save(res.model, args.output)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "calib_samples": res.calib_samples,
            "pass_seconds": {k: round(v, 3) for k, v in res.timings.items()}, "residual_bits": config.residual_bits,
            "adaround": config.as_metadata()["ptqc.config.adaround"]}


def worker_ort(args) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ptqc.data import ImageFolder, make_preprocess

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = ImageFolder(args.calib, make_preprocess(args.preprocess), args.calib_size).batches(32)

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {"input": batch}

    start = time.perf_counter()
    quantize_static(args.model, args.output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------------------------- parent
def run_worker(kind: str, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency_ms(model_path: str, batch: int, threads: int, runs: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, 224, 224)).astype(np.float32)
    for _ in range(2):
        sess.run(None, {"input": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)


def fused_convs(model_path: str) -> tuple[int, int]:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return ops.count("QLinearConv"), ops.count("Conv") + ops.count("FusedConv")


def emit(record: dict, out_path: str) -> None:
    """Print ``record`` as one JSON line and append it to ``out_path`` (numpy scalars become floats)."""
    line = json.dumps(record, sort_keys=True, default=float)
    print(line, flush=True)
    with open(out_path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("PTQC_SHARED", os.path.join(HERE, "..", "..", "shared")))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--bits", nargs="*", default=["w8a8", "w4a8", "w4a4", "w2a4"])
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--variants", nargs="*", default=["default"], choices=list(VARIANTS),
                    help="ptqc configurations to run (an ablation adds one method per variant).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ort", action="store_true", help="Skip onnxruntime quantize_static.")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--rss-sweep", action="store_true", help="Also compile w8a8 with 128 and 1024 images.")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compile.jsonl"))
    ap.add_argument("--workdir", default=None)
    # worker mode
    ap.add_argument("--worker", choices=["ptqc", "ort"])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--output")
    ap.add_argument("--preprocess")
    args = ap.parse_args()
    if args.worker:
        result = (worker_ptqc if args.worker == "ptqc" else worker_ort)(args)
        print(json.dumps(result))
        return

    from ptqc.data import make_preprocess
    from ptqc.evaluate import evaluate_arrays, load_labelled
    from ptqc.inspect import inspect_model
    from ptqc.loader import read_model

    calib = os.path.join(args.shared, "imagenet", "calib")
    val = os.path.join(args.shared, "imagenet", "val")
    if not os.path.isdir(calib) or not os.path.isdir(val):
        sys.exit(f"bench: {args.shared}/imagenet not found; pass --shared or set PTQC_SHARED")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    work = args.workdir or tempfile.mkdtemp(prefix="ptqc-bench-")
    os.makedirs(work, exist_ok=True)
    commit = source_commit()
    for name in args.models:
        model = os.path.join(args.shared, "models", f"{name}.onnx")
        if not os.path.exists(model):
            print(f"bench: skipping {name}: {model} not found", file=sys.stderr)
            continue
        pre = MODELS[name]
        x, y = load_labelled(val, os.path.join(val, "labels.txt"), make_preprocess(pre))
        common = {"model": name, "calib_images": args.calib_size, "val_images": int(len(y)), "threads": args.threads,
                  **({"commit": commit} if commit else {})}
        fp = evaluate_arrays(model, x, y, threads=args.threads)
        rec = {**common, "method": "fp32", **fp.as_dict()}
        if not args.no_latency:
            rec.update(lat_b1_ms=latency_ms(model, 1, args.threads, 30), lat_b32_ms=latency_ms(model, 32, args.threads, 10))
        emit(rec, args.out)
        fp_rec = rec
        runs = [(b, args.calib_size, v) for b in args.bits for v in args.variants]
        if args.rss_sweep:
            runs += [("w8a8", 128, "default"), ("w8a8", 1024, "default")]
        for bits, n_calib, variant in runs:
            out = os.path.join(work, f"{name}.{bits}.{variant}.{n_calib}.onnx")
            info = run_worker("ptqc", model=model, calib=calib, output=out, preprocess=pre, bits=bits,
                              calib_size=n_calib, variants=variant)
            label = f"ptqc-pot-{bits}" + ("" if variant == "default" else f"-{variant}")
            rec = {**common, "calib_images": n_calib, "method": label, "bits": bits, "variant": variant,
                   "compile_s": round(info["seconds"], 2), "peak_rss_mb": round(info["peak_rss_mb"], 1),
                   "pass_seconds": info["pass_seconds"], "calib_samples": info["calib_samples"],
                   "residual_bits": info["residual_bits"], "adaround": info["adaround"]}
            if n_calib == args.calib_size:
                acc = evaluate_arrays(out, x, y, threads=args.threads)
                report = inspect_model(read_model(out))
                rec.update(**acc.as_dict(), drop_top1=round(fp_rec["top1"] - acc.top1, 2), inspect_ok=report.ok,
                           size_mb=round(os.path.getsize(out) / 2**20, 2), macs=report.macs,
                           extra_macs=report.extra_macs)
                q, f = fused_convs(out)
                rec.update(int8_convs=q, float_convs=f)
                if not args.no_latency:
                    rec.update(lat_b1_ms=latency_ms(out, 1, args.threads, 30), lat_b32_ms=latency_ms(out, 32, args.threads, 10))
            emit(rec, args.out)
        if not args.no_ort:
            out = os.path.join(work, f"{name}.ort_int8.onnx")
            info = run_worker("ort", model=model, calib=calib, output=out, preprocess=pre, calib_size=args.calib_size)
            acc = evaluate_arrays(out, x, y, threads=args.threads)
            rec = {**common, "method": "ort-quantize_static-int8", "compile_s": round(info["seconds"], 2),
                   "peak_rss_mb": round(info["peak_rss_mb"], 1), **acc.as_dict(),
                   "drop_top1": round(fp_rec["top1"] - acc.top1, 2)}
            q, f = fused_convs(out)
            rec.update(int8_convs=q, float_convs=f)
            if not args.no_latency:
                rec.update(lat_b1_ms=latency_ms(out, 1, args.threads, 30), lat_b32_ms=latency_ms(out, 32, args.threads, 10))
            emit(rec, args.out)


if __name__ == "__main__":
    main()
