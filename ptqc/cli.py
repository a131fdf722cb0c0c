"""The ``ptqc`` command line: compile, inspect, eval, fetch, demo.

Every command is a thin layer over the Python API.  Bad input ends with one ``error: ...`` line on stderr
and exit code 2, and never leaves a half-written output file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from ptqc import progress
from ptqc.config import QuantConfig
from ptqc.errors import PtqcError

logger = logging.getLogger("ptqc")

SHORTHANDS = ("w8a8", "w4a8", "w4a4", "w3a3", "w2a4", "w2a2")


def _fail_cleanly(fn):
    """Turn PtqcError (and a few OS errors) into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PtqcError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory; try a smaller --batch-size or --calib-size", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)

    return wrapper


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not verbose:
        for noisy in ("onnx_ir", "ptqc.passes"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    progress.DISABLE = True if quiet else None


def _preprocess_options(fn):
    fn = click.option("--preprocess", "preset", default="tf", show_default=True,
                      type=click.Choice(["tf", "lite", "torch"]),
                      help="Image preprocessing preset: tf = px/127.5-1, lite = (px-127)/128, torch = ImageNet mean/std.")(fn)
    fn = click.option("--size", type=int, default=None, help="Input image size S (default 224): resize to S/0.875, centre-crop S.")(fn)
    fn = click.option("--mean", type=str, default=None, help="Per-channel mean in pixel units, e.g. 123.7,116.3,103.5.")(fn)
    fn = click.option("--std", type=str, default=None, help="Per-channel std in pixel units, e.g. 58.4,57.1,57.4.")(fn)
    return fn


def _floats(text: str | None, what: str):
    if text is None:
        return None
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise PtqcError(f"--{what} takes comma-separated numbers, got {text!r}") from None


def _make_pre(preset, size, mean, std):
    from ptqc.data import make_preprocess

    return make_preprocess(preset, size, _floats(mean, "mean"), _floats(std, "std"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ptqc")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Log every pass.")
def main(quiet: bool, verbose: bool) -> None:
    """ptqc: power-of-two post-training quantization for ONNX CNNs.

    Every scale is 2^e, so every requantization step is an integer shift.
    """
    _setup_logging(quiet, verbose)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", default=None,
              help="Calibration data: a folder of images, or a .npy/.npz of input tensors. Without it, activation "
                   "ranges come from the model's BatchNorm statistics (data-free; the input range from --preprocess).")
@click.option("-o", "--output", default=None, help="Output path [default: <model>.ptqc.onnx beside the input].")
@click.option("--pot/--no-pot", default=True, show_default=True, help="Power-of-two scales (the only mode ptqc has).")
@click.option("--w8a8", "shorthand", flag_value="w8a8", help="8-bit weights, 8-bit activations (the default).")
@click.option("--w4a8", "shorthand", flag_value="w4a8", help="4-bit weights, 8-bit activations.")
@click.option("--w4a4", "shorthand", flag_value="w4a4", help="4-bit weights, 4-bit activations.")
@click.option("--w3a3", "shorthand", flag_value="w3a3", help="3-bit weights, 3-bit activations.")
@click.option("--w2a4", "shorthand", flag_value="w2a4", help="2-bit weights, 4-bit activations.")
@click.option("--w2a2", "shorthand", flag_value="w2a2", help="2-bit weights, 2-bit activations.")
@click.option("--weight-bits", type=int, default=None, help="Weight bit width, 2-8 (overrides the shorthand).")
@click.option("--bits", "layer_bits", multiple=True, metavar="NAME=N",
              help="Per-layer precision (repeatable): layer NAME's weights and input at N bits, or NAME=wXaY; "
                   "an output only Adds or pooling read is raised with it.")
@click.option("--keep-float", "keep_float", multiple=True, metavar="NAME",
              help="Leave layer NAME in float (repeatable); the model is then not integer-only.")
@click.option("--max-drop", type=float, default=None, metavar="POINTS",
              help="Raise the most harmful layers to 8 bits until the top-1 drop on held-out samples (those after "
                   "--calib-size in --calib) is at most POINTS with 95% confidence; estimated as the float "
                   "model's confidence lost on changed answers, or measured with --labels. If every layer at 8 bits "
                   "still misses it, the fewest layers that meet it are kept float (see --no-float-fallback).")
@click.option("--float-fallback/--no-float-fallback", default=True, show_default=True,
              help="Let --max-drop keep layers float when 8 bits everywhere misses the budget; without it that is "
                   "refused, and the model stays integer-only.")
@click.option("--target-size", type=float, default=None, metavar="MB",
              help="Raise the most harmful layers to 8 bits while the weights fit in MB megabytes.")
@click.option("--eval-size", type=int, default=256, show_default=True, help="Held-out samples for --max-drop.")
@click.option("--labels", default=None, help="Labels of --calib images ('filename index' per line), for --max-drop.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the per-layer error report, one self-contained HTML file.")
@click.option("--report-samples", type=int, default=32, show_default=True,
              help="Samples the report measures on: those after the --calib-size calibration samples in --calib "
                   "(held out), or its first ones when it has no more.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="TOML file of settings (QuantConfig fields, bits = \"w4a4\", and a [layers] table); "
                   "command-line options win.")
@click.option("--act-bits", type=int, default=None, help="Activation bit width, 2-8 (overrides the shorthand).")
@click.option("--residual-bits", type=int, default=None,
              help="Bit width of a layer output only residual Adds read (the branch before the sum; the sum gets "
                   "the activation width). The W/A results of BRECQ/QDrop/RAPQ leave it unquantized [default: 8; "
                   "never below the activation width].")
@click.option("--all-low-bit", is_flag=True, help="Quantize first and last layers to the low bit width too.")
@click.option("--calib-size", type=int, default=QuantConfig.calib_size, show_default=True,
              help="Use N samples: the first N of an array; of an image folder, N spread evenly over its sorted names.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Calibration batch size (calibration memory grows with it; block reconstruction keeps one block "
                   "input of every calibration sample).")
@click.option("--act-calib", type=click.Choice(["auto", "mse", "max"]), default="auto", show_default=True,
              help="Activation exponent: least squared error, or no clipping; auto = max for unsigned 8-bit tensors, mse otherwise.")
@click.option("--no-pair-safe", is_flag=True,
              help="Give the first layer full 8-bit weights; onnxruntime's int8 kernel on CPUs without VNNI may "
                   "then saturate there (docs/integer.md).")
@click.option("--no-bias-correction", is_flag=True, help="Skip the compensation bias.")
@click.option("--no-absorb", is_flag=True, help="Keep ReLU6 bounds as integer Clips instead of rescaling weights.")
@click.option("--gptq/--no-gptq", default=None, help="GPTQ weight rounding on the power-of-two grids [default: on].")
@click.option("--gptq-target", type=click.Choice(["float", "asym", "qdrop"]), default="float", show_default=True,
              help="What GPTQ fits: float-input statistics, or layer by layer from the quantized input (slower).")
@click.option("--equalize-channels/--no-equalize-channels", default=None,
              help="Below 8 bits, a per-channel clipping threshold for Relu/Clip outputs that convs read (half-way "
                   "from the per-tensor one where a dense conv reads), absorbed into the weights [default: on below "
                   "8-bit activations when block reconstruction runs].")
@click.option("--equalize-residual/--no-equalize-residual", default=None,
              help="Multiply each residual stream (the signed tensors residual Adds join) by the factor in [1, 2) "
                   "that best fits its power-of-two grids; exact (weights of its writers and readers) [default: on "
                   "below 8-bit activations].")
@click.option("--learn-clip/--no-learn-clip", default=None,
              help="Below 8-bit activations, learn the clipping thresholds of each block's inner Relu/Clip outputs "
                   "on the block's output error (per channel where depthwise convs read them) [default: on when "
                   "any activation is below 8 bits and weights are at least 4 bits].")
@click.option("--adaround/--no-adaround", default=None,
              help="After GPTQ, refine low-bit layers one by one by AdaRound on the error after each layer's "
                   "activation, facing its quantized input [default: on when any weights are below 8 bits, for "
                   "the layers block reconstruction does not learn again]. "
                   "Minutes instead of seconds; --max-drop trials run without it (docs/benchmarks.md).")
@click.option("--adaround-iters", type=int, default=None, help="Adam steps per layer for --adaround [default: 100].")
@click.option("--block-recon/--no-block-recon", default=None,
              help="After AdaRound, learn the rounding of each block's low-bit layers together against the block's "
                   "output, with its activation quantizers in the loop (BRECQ/QDrop-style, numpy) "
                   "[default: on when any weights or activations are below 8 bits; with every weight at 8 bits it "
                   "learns the 8-bit layers].")
@click.option("--block-iters", type=int, default=None,
              help="Adam steps per block for --block-recon [default: 600 below 4-bit weights, else 300].")
@click.option("--block-freeze", type=float, default=None,
              help="Share (0-1) of --block-recon's steps after the warm-up over which its rounding variables are "
                   "hardened, the most decided first; 0 hardens them all at the end, as AdaRound does "
                   "[default: 0.8 below 4-bit weights, else 0].")
@click.option("--weight-offsets/--no-weight-offsets", default=None,
              help="Give each output channel of the inner layers of at most 6 bits a grid offset of 0, 1/2, 1 or "
                   "-1/2 steps (a per-channel weight zero point; scales stay 2^e), chosen by the rounding loss "
                   "[default: on for layers below 4 bits].")
@click.option("--refit-head/--no-refit-head", default=None,
              help="Fit the last layer by ridge regression from the quantized features to the float model's output, "
                   "cross-validated over the calibration images, and keep it only where the held-out error falls "
                   "[default: on when any activation is below 8 bits].")
@click.option("--act-search", is_flag=True,
              help="Search activation exponents by +-1 on the end-to-end logit error (slow; see docs/benchmarks.md).")
@click.option("--act-borders", is_flag=True,
              help="AQuant: a rounding border per channel and level for activations below 8 bits, learned on each "
                   "block's output after its rounding (fitted to the float model's values with --no-block-recon); "
                   "written as explicit ops (ptqc inspect counts them; export-int refuses them).")
@click.option("--arcq", type=float, default=None, metavar="SHARE",
              help="ARCQ remainder compensation: the weight and input rounding remainders of this share (0-1) of the "
                   "low-bit convs with ARCQ's highest critical-layer score, as two more convolutions each (3x those "
                   "layers' MACs; ptqc inspect counts them, export-int refuses them) [default: off].")
@click.option("--rounding", type=click.Choice(["half-even", "half-up"]), default="half-even", show_default=True,
              help="How requantizing shifts round: half-even (QuantizeLinear's rule) or half-up (add 2^(m-1), "
                   "shift), which costs one Add per requantizing op.")
@_preprocess_options
@_fail_cleanly
def compile(model, calib, output, pot, shorthand, weight_bits, layer_bits, keep_float, max_drop, float_fallback, target_size, eval_size,
            labels, report_path, report_samples, config_file, act_bits, residual_bits, all_low_bit, calib_size, batch_size,
            act_calib, no_pair_safe, no_bias_correction, no_absorb, gptq, gptq_target, equalize_channels, equalize_residual, learn_clip, adaround,
            adaround_iters, block_recon, block_iters, block_freeze, weight_offsets, refit_head, act_search, act_borders, arcq, rounding, preset,
            size, mean, std):
    """Quantize MODEL (FP32 ONNX) to a power-of-two QDQ model."""
    import ptqc
    from ptqc.config import load_toml, parse_layer_bits, parse_shorthand
    from ptqc.writer import check_writable, save_atomic

    if not pot:
        raise PtqcError("ptqc only emits power-of-two scales; drop --no-pot")
    ctx = click.get_current_context()
    settings = load_toml(config_file) if config_file else {}
    given = {k for k in ctx.params if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    if shorthand:
        settings["weight_bits"], settings["act_bits"] = parse_shorthand(shorthand)
    flags = {"weight_bits": weight_bits, "act_bits": act_bits, "residual_bits": residual_bits, "first_last_8bit": not all_low_bit,
             "calib_size": calib_size, "batch_size": batch_size, "act_method": act_calib,
             "bias_correction": not no_bias_correction, "absorb_clip": not no_absorb, "gptq": gptq,
             "gptq_target": gptq_target, "equalize_channels": equalize_channels, "equalize_residual": equalize_residual,
             "learn_clip": learn_clip,
             "adaround": adaround,
             "adaround_iters": adaround_iters, "block_recon": block_recon, "block_iters": block_iters,
             "block_freeze": block_freeze, "weight_offsets": weight_offsets, "refit_head": refit_head, "act_search": act_search, "act_borders": act_borders, "arcq": arcq, "rounding": rounding,
             "pair_safe_first": not no_pair_safe}
    source = {"first_last_8bit": "all_low_bit", "act_method": "act_calib", "bias_correction": "no_bias_correction",
              "absorb_clip": "no_absorb", "pair_safe_first": "no_pair_safe"}
    for key, value in flags.items():
        if source.get(key, key) in given or key not in settings:
            if value is not None:
                settings[key] = value
    if layer_bits:
        settings["layer_bits"] = {**settings.get("layer_bits", {}), **parse_layer_bits(layer_bits)}
    if keep_float:
        settings["keep_float"] = [*settings.get("keep_float", []), *keep_float]
    config = QuantConfig(**settings)
    if output is None:
        base = model[:-5] if model.endswith(".onnx") else model
        output = f"{base}.ptqc.onnx"
    check_writable(output)
    if report_path:
        check_writable(report_path)
    pre = _make_pre(preset, size, mean, std)
    if calib is None:
        if max_drop is not None or target_size is not None or report_path:
            raise PtqcError("--max-drop, --target-size and --report need data; pass --calib")
    choice = None
    if max_drop is not None or target_size is not None:
        from ptqc import mixed

        if max_drop is not None and target_size is not None:
            raise PtqcError("give --max-drop or --target-size, not both")
        if max_drop is not None:
            held, y = mixed.held_out(calib, pre, config.calib_size, eval_size, labels)
            config, choice = mixed.max_drop(model, calib, config, pre, max_drop, held, y, float_fallback=float_fallback)
        else:
            config, choice = mixed.target_size(model, calib, config, pre, target_size)
        click.echo(choice.describe(), err=True)
    result = choice.result if choice is not None and choice.result is not None else ptqc.compile(model, calib, config, pre)
    if choice is not None:
        entry = result.model.metadata_props.add()
        entry.key, entry.value = "ptqc.mixed_precision", choice.describe()
    save_atomic(result.model, output)
    size_mb = os.path.getsize(output) / 2**20
    samples = f"{result.calib_samples} calibration samples" if calib is not None else "data-free"
    click.echo(f"wrote {output} ({config.tag}, power-of-two, {samples}, "
               f"{result.timings['total']:.1f} s, {size_mb:.1f} MB)")
    if report_path:
        _write_report(model, result.model, calib, pre, report_samples, report_path, result.calib_samples)


def _write_report(model, quantized, calib, pre, samples, path, skip: int) -> None:
    from ptqc import report, report_html

    data, measured_on = report.measurement_data(calib, pre, samples, skip)
    rep = report.analyse(model, quantized, data, samples=samples, measured_on=measured_on)
    report_html.write(rep, path)
    worst = ", ".join(f"{layer.name} {layer.sqnr_alone_db:.1f} dB" for layer in rep.worst_layers(3))
    click.echo(f"wrote {path} (logit SNR {rep.logit_snr_db:.1f} dB, top-1 agreement {rep.agreement:.1f}% on "
               f"{measured_on}; worst layers alone: {worst})")


@main.command(name="inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--allow-non-shift", is_flag=True, help="Report non-shift steps and float ops without failing.")
@_fail_cleanly
def inspect_cmd(model, as_json, allow_non_shift):
    """Per-layer bits, scale exponents and requant shifts of a QDQ model.

    Exits 1 if any scale is not a power of two, any requantization is not a shift, or a float op is hidden
    between quantized layers.
    """
    from ptqc.inspect import format_table, inspect_model
    from ptqc.loader import read_model

    report = inspect_model(read_model(model))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
    else:
        click.echo(format_table(report))
        for extra, count in report.extra_ops.items():
            click.echo(f"extra ops: {count} x {extra}")
        if report.extra_macs:
            share = f" (+{100.0 * report.extra_macs / report.macs:.1f}% of the model's {report.macs:,})" if report.macs else ""
            click.echo(f"extra MACs per sample: {report.extra_macs:,}{share}")
        for msg in report.problems:
            click.echo(f"PROBLEM: {msg}")
        for msg in report.non_shift:
            click.echo(f"NOT A SHIFT: {msg}")
        for msg in report.float_ops:
            click.echo(f"FLOAT: {msg}")
        verdict = "PASS" if report.ok else "FAIL"
        click.echo(f"{verdict}: {len(report.rows)} ops; all scales powers of two: {not report.problems}; "
                   f"all requantizations shifts: {not report.non_shift and not report.float_ops}")
    if report.problems or (not allow_non_shift and not report.ok):
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", default=None,
              help="Images folder, .npy or .npz of inputs [default: random inputs over the input quantizer's range].")
@click.option("--count", type=int, default=32, show_default=True, help="Number of samples to compare on.")
@click.option("--program", "program_dir", default=None,
              help="Run the reference from this export-int folder instead of lowering MODEL again.")
@click.option("--fused", is_flag=True,
              help="Compare with onnxruntime's fused int8 kernels instead of the graph's QDQ semantics.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_preprocess_options
@_fail_cleanly
def verify(model, data, count, program_dir, fused, as_json, preset, size, mean, std):
    """Check MODEL bit for bit against an integer-only reference.

    The reference runs from integer weights, int32 biases and shift amounts alone; onnxruntime runs the QDQ
    file with every quantized tensor exposed.  Exits 1 at the first differing tensor, on a possible int32
    overflow, or where the graph is not integer (a non-power-of-two scale, a weight outside its bit width).
    """
    from ptqc.data import open_dataset
    from ptqc.intprog import Program
    from ptqc.loader import read_model
    from ptqc.verify import random_inputs, verify as run_verify

    import numpy as np

    from ptqc.intprog import LoweringError, lower

    proto = read_model(model)
    program = Program.load(program_dir) if program_dir else None
    if data:
        ds = open_dataset(data, _make_pre(preset, size, mean, std), limit=count)
        x = np.concatenate(list(ds.batches(16)))
    else:
        try:
            x = random_inputs(proto, program or lower(proto), count)
        except LoweringError:
            x = np.zeros((0,), np.float32)  # verify reports the lowering error itself, before reading inputs
    report = run_verify(proto, x, program, fuse=fused)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
    else:
        for msg in report.warnings:
            click.echo(f"warning: {msg}")
        for msg in report.errors:
            click.echo(f"FAIL: {msg}")
        if report.mismatch is not None:
            click.echo(f"FAIL: {report.mismatch} ({report.mismatched_tensors} of {report.tensors} tensors differ)")
        if report.samples:
            floats = ", ".join(f"{k} max |diff| {v:g}" for k, v in report.float_outputs.items())
            click.echo(f"{'PASS' if report.ok else 'FAIL'}: {report.tensors} quantized tensors, {report.samples} samples, "
                       f"{report.compared_values} values compared, rounding {report.rounding}"
                       f"{', float outputs: ' + floats if floats else ''}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, help="Calibration images folder or .npy/.npz.")
@click.option("--w4a8", "shorthand", flag_value="w4a8", help="Score each layer at 4-bit weights, 8-bit input.")
@click.option("--w4a4", "shorthand", flag_value="w4a4", default=True, help="... at 4-bit weights and input (the default).")
@click.option("--w3a3", "shorthand", flag_value="w3a3", help="... at 3-bit weights and input.")
@click.option("--w2a4", "shorthand", flag_value="w2a4", help="... at 2-bit weights, 4-bit input.")
@click.option("--w2a2", "shorthand", flag_value="w2a2", help="... at 2-bit weights and input.")
@click.option("--calib-size", type=int, default=64, show_default=True, help="Calibration samples per compile.")
@click.option("--eval-size", type=int, default=64, show_default=True,
              help="Held-out samples scored: the ones after the calibration samples in the same data.")
@click.option("--labels", default=None, help="Labels file ('filename index' per line) to also report top-1.")
@click.option("--top", type=int, default=10, show_default=True, help="Rows to print.")
@click.option("--json", "as_json", is_flag=True, help="Print every layer's scores as JSON.")
@_preprocess_options
@_fail_cleanly
def sensitivity(model, calib, shorthand, calib_size, eval_size, labels, top, as_json, preset, size, mean, std):
    """Rank layers by the loss from quantizing each one alone to the low bit width (the rest at 8 bits).

    Compiles the model once per layer, so it takes minutes on a real network (a progress bar shows the ETA).
    Keep the worst layers at 8 bits with `ptqc compile --bits NAME=8`.
    """
    from ptqc.config import parse_shorthand
    from ptqc.mixed import held_out
    from ptqc.sensitivity import analyse

    wb, ab = parse_shorthand(shorthand)
    pre = _make_pre(preset, size, mean, std)
    held, y = held_out(calib, pre, calib_size, eval_size, labels, what="sensitivity")
    result = analyse(model, calib, QuantConfig(wb, ab, calib_size=calib_size), held, y, pre)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=1))
        return
    click.echo(f"logit SNR vs FP32 on {len(held)} held-out samples: all layers 8-bit {result.baseline_snr_db:.2f} dB, "
               f"all at w{wb}a{ab} {result.low_snr_db:.2f} dB")
    click.echo(f"{'rank':>4}  {'layer':40s} {'op':5s} {'SNR dB':>7s} {'agree %':>8s}" + ("  top-1 %" if y is not None else ""))
    for i, s in enumerate(result.layers[:top], 1):
        line = f"{i:>4}  {s.name[-40:]:40s} {s.op:5s} {s.snr_db:7.2f} {s.agreement:8.1f}"
        click.echo(line + (f"  {s.top1:7.1f}" if s.top1 is not None else ""))


@main.command(name="report")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("quantized", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, help="Images folder or .npy/.npz to measure on.")
@click.option("-o", "--output", default=None, help="HTML file [default: <quantized>.report.html].")
@click.option("--samples", type=int, default=32, show_default=True, help="Samples to measure on.")
@click.option("--skip", type=int, default=None,
              help="Leave out the first N samples of --calib when it has more [default: the number QUANTIZED was "
                   "calibrated on, from its metadata, so that the same folder gives held-out samples: the fitted "
                   "passes make calibration samples look better than unseen ones].")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON instead of writing HTML.")
@_preprocess_options
@_fail_cleanly
def report_cmd(model, quantized, calib, output, samples, skip, as_json, preset, size, mean, std):
    """Per-layer error of QUANTIZED (a ptqc QDQ model) against MODEL (its float source), as one HTML page.

    Per layer: bits, exponents, shifts, methods, SQNR alone and accumulated, clipping ratio, and the split of
    each activation quantizer's error into rounding and clipping; figures and advice on what to try.
    """
    from ptqc import report
    from ptqc.loader import read_model
    from ptqc.writer import check_writable

    pre = _make_pre(preset, size, mean, std)
    if skip is None:
        meta = {p.key: p.value for p in read_model(quantized).metadata_props}
        skip = int(meta.get("ptqc.calib_samples", "0") or 0)
    if skip < 0:
        raise PtqcError(f"--skip must be at least 0, got {skip}")
    if as_json:
        data, measured_on = report.measurement_data(calib, pre, samples, skip)
        rep = report.analyse(model, quantized, data, samples=samples, measured_on=measured_on)
        click.echo(json.dumps(rep.as_dict(), indent=1, default=float))
        return
    if output is None:
        base = quantized[:-5] if quantized.endswith(".onnx") else quantized
        output = f"{base}.report.html"
    check_writable(output)
    _write_report(model, quantized, calib, pre, samples, output, skip)


@main.command(name="export-int")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, help="Folder to write program.json and arrays.npz into.")
@_fail_cleanly
def export_int(model, output):
    """Write MODEL's integer program for hardware flows: integer weights, int32 biases, shift amounts,
    bit widths and zero points per layer (arrays.npz) and the layer graph (program.json)."""
    from ptqc.export import export_program

    summary = export_program(model, output)
    click.echo(summary)


@main.command(name="eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--images", required=True, help="Folder of labelled images.")
@click.option("--labels", required=True, help="File with 'filename index' per line.")
@click.option("--limit", type=int, default=None,
              help="Evaluate N images only (spread over the folder, as --calib-size takes them).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@_preprocess_options
@_fail_cleanly
def eval_cmd(model, images, labels, limit, batch_size, preset, size, mean, std):
    """Top-1 / top-5 accuracy of MODEL in onnxruntime."""
    from ptqc.evaluate import evaluate_folder

    acc = evaluate_folder(model, images, labels, _make_pre(preset, size, mean, std), batch_size, limit)
    click.echo(f"top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%  ({acc.n} images)")


@main.command()
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the models in the manifest.")
@click.option("--from", "source", default=None, help="Fetch from this URL or path instead of the manifest's URL.")
@click.option("--cache-dir", default=None, help="Cache folder [default: $PTQC_CACHE or ~/.cache/ptqc].")
@_fail_cleanly
def fetch(name, list_, source, cache_dir):
    """Download a model from the manifest, verify its sha256, and cache it."""
    from ptqc.fetch import fetch_model, load_manifest

    manifest = load_manifest()
    if list_ or not name:
        for entry in manifest.values():
            click.echo(f"{entry['name']:28s} {entry['input_size']:>4d}px  {entry['preprocess']:5s}  {entry['description']}")
        return
    path = fetch_model(name, source=source, cache_dir=cache_dir)
    click.echo(path)


@main.command()
@click.option("--bits", "bits", default="w4a4", show_default=True, type=click.Choice(SHORTHANDS))
@click.option("-o", "--output", default=None, help="Where to write the quantized demo model [default: a temp dir].")
@_fail_cleanly
def demo(bits, output):
    """Compile the small model that ships with ptqc and compare FP32 vs quantized accuracy."""
    from ptqc.demo import run_demo

    run_demo(bits, output, echo=click.echo)


if __name__ == "__main__":
    main()
