"""Benchmark the accuracy-debugging features of issue #5 on the real ImageNet models.

    python bench/bench_report.py                       # everything below, JSON lines to bench/results/report.jsonl
    python bench/bench_report.py --only keep8 --bits w4a4
    python bench/render.py bench/results/compile.jsonl ... bench/results/report.jsonl > docs/benchmarks.md

* report: compile MobileNetV2 at --bits with --report; its numbers, and (with Chromium) a screenshot of the
  page into docs/ (--screenshot).
* keep8: val500 top-1 with each of the report's five worst layers (lowest SQNR alone) kept at 8 bits, one
  at a time, and, as a contrast, the five best low-bit layers: if the ranking means something, the first
  five gain more.
* data_free: w8a8 without calibration data (BatchNorm statistics) next to 256 calibration images, on every
  model (those without BatchNorm are refused, and the record says so).
* max_drop: `--max-drop` on MobileNetV2 at w4a8 and w4a4; its held-out estimate and the val500 drop.

Models and images come from --shared (default $PTQC_SHARED or ../shared); without them the script exits.
Validation images are only ever evaluated on, never calibrated or searched on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench_compile import HERE, MODELS, emit

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("PTQC_SHARED", os.path.join(HERE, "..", "..", "shared")))
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=["report", "keep8", "data_free", "max_drop"])
    ap.add_argument("--max-drop-bits", nargs="*", default=["w4a8", "w4a4"])
    ap.add_argument("--max-drop-budgets", nargs="*", type=float, default=[1.0], help="--max-drop budgets to run.")
    ap.add_argument("--eval-size", type=int, default=744, help="Held-out calibration images --max-drop scores on.")
    ap.add_argument("--max-drop-labels", action="store_true",
                    help="Score --max-drop by measured top-1 on the held-out calibration images (imagenet/calib/labels.txt).")
    ap.add_argument("--screenshot", default=os.path.join(HERE, "..", "docs", "report_mobilenet_v2_w4a4.png"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "report.jsonl"))
    args = ap.parse_args()

    import onnx

    import ptqc
    from ptqc import mixed, report, report_html
    from ptqc.config import QuantConfig, parse_shorthand
    from ptqc.data import make_preprocess
    from ptqc.errors import PtqcError
    from ptqc.evaluate import evaluate_arrays, load_labelled

    calib = os.path.join(args.shared, "imagenet", "calib")
    val = os.path.join(args.shared, "imagenet", "val")
    if not os.path.isdir(calib) or not os.path.isdir(val):
        sys.exit(f"bench: {args.shared}/imagenet not found; pass --shared or set PTQC_SHARED")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    work = tempfile.mkdtemp(prefix="ptqc-bench-report-")
    wb, ab = parse_shorthand(args.bits)
    val_cache: dict[str, tuple] = {}

    def val_data(name):
        if name not in val_cache:
            val_cache[name] = load_labelled(val, os.path.join(val, "labels.txt"), make_preprocess(MODELS[name]))
        return val_cache[name]

    def top1(model_or_path, name) -> float:
        x, y = val_data(name)
        return evaluate_arrays(model_or_path, x, y, threads=2).top1

    name = "mobilenet_v2_1.0_224"
    path = os.path.join(args.shared, "models", f"{name}.onnx")
    pre = make_preprocess(MODELS[name])
    fp_top1 = top1(path, name)
    cfg = QuantConfig(wb, ab, calib_size=args.calib_size)
    rep = None
    if "report" in args.only or "keep8" in args.only:
        start = time.perf_counter()
        result = ptqc.compile(path, calib, cfg, pre)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        # held-out images when the calibration folder has them: on the images the model was fitted to, the
        # figures look better than they are (docs/design.md)
        data, measured_on = report.measurement_data(calib, pre, 32, cfg.calib_size)
        rep = report.analyse(path, result.model, data, samples=32, measured_on=measured_on)
        report_s = time.perf_counter() - start
        base_top1 = top1(result.model, name)
        html_path = os.path.join(work, "report.html")
        report_html.write(rep, html_path)
        rec = {"kind": "report", "model": name, "bits": args.bits, "fp32_top1": fp_top1, "top1": base_top1,
               "compile_s": round(compile_s, 1), "report_s": round(report_s, 1), "samples": rep.samples,
               "logit_snr_db": round(rep.logit_snr_db, 2), "agreement": round(rep.agreement, 1),
               "measured_on": measured_on,
               "html_kb": round(os.path.getsize(html_path) / 1024, 1),
               "worst": [[layer.name, round(layer.sqnr_alone_db, 2)] for layer in rep.worst_layers(5)],
               "hints": rep.hints}
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium and "report" in args.only:
            profile = os.path.join(work, "profile")
            dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                                  f"file://{html_path}"], capture_output=True, text=True, timeout=120).stdout
            rec["chromium_rendered"] = 'data-rendered="ok"' in dom
            if args.screenshot:
                subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={args.screenshot}",
                                "--window-size=1280,2300", f"file://{html_path}"], capture_output=True, timeout=120)
                rec["screenshot"] = os.path.relpath(args.screenshot, os.path.join(HERE, ".."))
        emit(rec, args.out)
    if "keep8" in args.only:
        low = [layer for layer in rep.layers if layer.weight_bits < 7 or layer.input_bits < 8]
        ranked = sorted(low, key=lambda layer: layer.sqnr_alone_db)
        groups = [("worst", ranked[:5]), ("best", ranked[-5:])]
        for group, layers in groups:
            for layer in layers:
                q = ptqc.compile(path, calib, mixed.with_raised(cfg, [layer.name]), pre).model
                acc = top1(q, name)
                emit({"kind": "keep8", "model": name, "bits": args.bits, "group": group, "layer": layer.name,
                      "rank": ranked.index(layer) + 1, "of": len(ranked), "sqnr_alone_db": round(layer.sqnr_alone_db, 2),
                      "top1": acc, "gain": round(acc - base_top1, 2), "base_top1": base_top1}, args.out)
    if "data_free" in args.only:
        for model_name, preset in MODELS.items():
            mpath = os.path.join(args.shared, "models", f"{model_name}.onnx")
            fp = top1(mpath, model_name)
            for label, data in (("data-free", None), (f"{args.calib_size} images", calib)):
                start = time.perf_counter()
                try:
                    q = ptqc.compile(mpath, data, QuantConfig(8, 8, calib_size=args.calib_size), make_preprocess(preset)).model
                except PtqcError as exc:
                    emit({"kind": "data_free", "model": model_name, "bits": "w8a8", "calibration": label,
                          "refused": str(exc)}, args.out)
                    continue
                seconds = time.perf_counter() - start
                acc = top1(q, model_name)
                emit({"kind": "data_free", "model": model_name, "bits": "w8a8", "calibration": label,
                      "fp32_top1": fp, "top1": acc, "drop": round(fp - acc, 2), "compile_s": round(seconds, 1)}, args.out)
    if "max_drop" in args.only:
        labels = os.path.join(calib, "labels.txt") if args.max_drop_labels else None
        held, held_y = mixed.held_out(calib, pre, args.calib_size, args.eval_size, labels)
        scored_by = "top-1 with labels" if held_y is not None else "confidence lost on changed answers"
        for bits, budget in ((b, d) for d in args.max_drop_budgets for b in args.max_drop_bits):
            b_w, b_a = parse_shorthand(bits)
            start = time.perf_counter()
            try:
                new_cfg, choice = mixed.max_drop(path, calib, QuantConfig(b_w, b_a, calib_size=args.calib_size), pre,
                                                 budget, held, held_y)
            except PtqcError as exc:
                emit({"kind": "max_drop", "model": name, "bits": bits, "budget": budget, "refused": str(exc),
                      "scored_by": scored_by}, args.out)
                continue
            # the search compiled the chosen model itself when its trials ran without AdaRound
            q = choice.result.model if choice.result is not None else ptqc.compile(path, calib, new_cfg, pre).model
            seconds = time.perf_counter() - start
            out = os.path.join(work, f"maxdrop_{bits}_{budget:g}.onnx")
            onnx.save(q, out)
            acc = top1(q, name)
            emit({"kind": "max_drop", "model": name, "bits": bits, "budget": budget, "raised": choice.raised,
                  "n_raised": len(choice.raised), "ranked": len(choice.ranking), "floated": choice.floated,
                  "float_trials": choice.float_trials, "held_out_drop": round(choice.estimate, 2),
                  "held_out_bound": round(choice.upper, 2), "held_out_images": len(held),
                  "scored_by": scored_by + (", AdaRound on the chosen model" if new_cfg.use_adaround else ""),
                  "trials": choice.trials, "fp32_top1": fp_top1, "top1": acc, "drop": round(fp_top1 - acc, 2),
                  "weights_mb": round(choice.size_mb, 3), "search_s": round(seconds, 1)}, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
