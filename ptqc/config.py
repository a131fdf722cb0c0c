"""Quantization settings: bit widths, the first/last-layer policy and the calibration budget."""

from __future__ import annotations

import dataclasses
import re

from ptqc.errors import PtqcError

#: Bit widths ptqc can emit for weights and activations.
SUPPORTED_BITS = range(2, 9)

_SHORTHAND = re.compile(r"^w(\d)a(\d)$")


@dataclasses.dataclass
class QuantConfig:
    """Everything that decides how a model is quantized.

    ``first_last_8bit`` is the BRECQ/QDrop/RAPQ convention: the first layer's weights, input and (as BRECQ and
    RAPQ set it) output and the last layer's weights and input stay 8-bit.  The logits are never quantized.
    """

    weight_bits: int = 8
    act_bits: int = 8
    first_last_8bit: bool = True
    #: keep 8-bit weights of a layer with a signed 8-bit input within +-64 (a 7-bit grid) when that input is
    #: a graph input, i.e. the first layer: onnxruntime's AVX2 u8 x s8 kernel sums products in int16 pairs
    #: with saturation, and a signed input sits around 128 in its uint8 container, so full-range weights
    #: saturate there and onnxruntime stops computing what integer hardware computes (docs/integer.md)
    pair_safe_first: bool = True
    #: calibration samples (of an image folder, N spread over its sorted names: ``data.spread_order``).
    #: 512: GPTQ and block reconstruction read every one of them, and they overfit fewer (MobileNetV2 w4a4,
    #: logit SNR on calibration-split images 768-999: 2.73 dB at 256, 3.68 dB at 512, 3.92 dB at 768; val500
    #: top-1 67.6, 69.6 (68.5 over three seeds), 67.2, and 67.0 on all 1000; 182 / 212 / 246 / 264 s, peak
    #: memory 4.4 GB at 1000; measured on the first N images in sorted order, before data.spread_order)
    calib_size: int = 512
    batch_size: int = 16
    #: activation exponent rule: "mse" (least squared error on the histogram), "max" (no clipping), or
    #: "auto" (max for unsigned 8-bit tensors, mse for signed 8-bit ones and below 8 bits)
    act_method: str = "auto"
    #: subtract the mean output error of weight rounding from each layer's bias
    bias_correction: bool = True
    #: GPTQ weight rounding on the power-of-two grids (else round to nearest); None = on.  At 8 bits it
    #: raised top-1 agreement with FP32 on 744 held-back images (MobileNetV2 96.1 -> 96.9%, MobileNetV1
    #: 96.0 -> 96.6%, EfficientNet-Lite0 97.5 -> 97.9%) and logit SNR by 0.7-1.7 dB (bench/fidelity.py)
    gptq: bool | None = None
    #: images GPTQ's second moments come from; None = every calibration image below 8-bit weights, 32 at 8
    #: bits (rounding errors are small there, and 32 keeps the compile faster than onnxruntime's quantize_static)
    gptq_samples: int | None = None
    #: what GPTQ fits: "float" (float input statistics), "asym" (quantized input -> float output), "qdrop"
    #: (the QDrop expectation of the same); the latter two cost one more onnxruntime pass
    gptq_target: str = "float"
    #: RAPQ-style +-1 search of activation exponents on the end-to-end logit error, on this many samples.
    #: Off by default: on MobileNetV2 w4a4 it raised the logit SNR (-2.1 -> +0.1 dB) but lowered top-1
    #: agreement with FP32 (16.3% -> 10.9%) and cost 150 s.
    act_search: bool = False
    search_samples: int = 64
    #: AQuant: a rounding border per channel and integer level for the activations below 8 bits, written as
    #: explicit ops (``ptqc inspect`` counts them).  With block reconstruction, each block's inner activations
    #: get borders learned on the block output once its rounding is final (``blockrec.fit_borders``), and no
    #: other tensor gets one; without it, every low-bit activation gets borders fitted to the float model's
    #: values on ``border_samples`` images (``learn_act_borders``).  Off by default: at w4a4 the learned
    #: borders moved top-1 by less than the block seeds do, and at w2a4 they lowered it (docs/design.md)
    act_borders: bool = False
    border_samples: int = 64
    #: below 8 bits, give Relu/Clip outputs between weighted layers a least-squares *continuous* clipping
    #: threshold, by the same weight rescaling (scales stay 2^e).  MobileNetV2 w4a4: top-1 agreement with
    #: FP32 16.3% -> 21.6%; EfficientNet-Lite0 61.8% -> 62.2%
    continuous_clip: bool = True
    #: learn those continuous thresholds block by block on the block's output error (float weights, every inner
    #: low-bit activation quantized; per channel where depthwise convs read the tensor), starting from the
    #: least-squares ones.  None = on with calibration data when some activation is below 8 bits and the
    #: weights are at least 4 bits: MobileNetV2 w8a4 (no blocks) val500 top-1 / agreement 43.4 / 40.1% ->
    #: 57.0 / 51.9%; w4a4 with AdaRound and blocks (which learn against the same quantizers), bench top-1
    #: MobileNetV2 64.4 -> 64.6, MobileNetV1 62.0 -> 64.8, EfficientNet-Lite0 77.0 -> 77.4, +105-270 s (a
    #: first measurement, before the residual-stream scale and the 8-bit first-layer output, had 60.2 -> 59.0).
    #: Off below 4-bit weights: at w2a4 it gained nothing (the same three, 2.4 -> 5.0, 1.2 -> 2.0, 23.0 -> 20.6)
    #: and its 250 s put EfficientNet-Lite0's compile at 917 s, over the 15-minute bar
    learn_clip: bool | None = None
    #: below 8 bits, give each channel of a Relu/Clip output that convs read its own clipping threshold, by
    #: scaling the producer's rows and the readers' channels (scales stay 2^e): the channel's least-squares
    #: threshold where only depthwise convs read the tensor, half-way (geometrically) from the per-tensor one
    #: where a dense conv does.  None = on below 8-bit activations when block reconstruction runs (by default:
    #: always there).  w4a4, val500 top-1 / top-1 agreement with FP32 on 744 held-back images / logit
    #: SNR / harness compile s, against learned thresholds alone: MobileNetV2 64.6 / 64.2% / 2.62 dB / 536 s ->
    #: 64.6 / 65.5% / 2.76 dB / 264 s, MobileNetV1 64.8 / 64.2% / 5.43 dB / 313 s -> 68.8 / 65.9% / 5.80 dB /
    #: 182 s, EfficientNet-Lite0 77.4 / 81.5% / 5.02 dB / 772 s -> 75.6 / 81.6% / 4.94 dB / 604 s (learned
    #: thresholds then remain only for tensors this leaves).  Depthwise readers only: 65.4 / 65.1%, 66.8 / 65.9%,
    #: 75.8 / 80.6%; dense readers at full strength, MobileNetV1 67.4 / 63.7%.  Without block reconstruction
    #: (``--no-block-recon``) it is off at 8-bit weights, where learned per-channel thresholds measured better
    #: (MobileNetV2 w8a4 57.0 vs 49.0 top-1); with blocks learning the 8-bit layers, MobileNetV2 w8a4 val500 /
    #: held-out agreement / logit SNR 69.2 / 74.9% / 4.76 dB without it, 71.8 / 78.1% / 4.93 dB with it
    equalize_channels: bool | None = None
    #: multiply each residual stream (the signed tensors residual Adds join, between linear writers and
    #: readers) by the factor in [1, 2) that best fits its tensors' power-of-two grids; exact.  None = on with
    #: calibration data below 8-bit activations: w8a4 default pipeline (no blocks), val500 / held-out
    #: agreement, MobileNetV2 57.0 / 51.9% -> 57.8 / 54.8%, EfficientNet-Lite0 74.2 / 78.1% -> 76.4 / 81.2%
    #: (MobileNetV1 has no residual stream); w4a4 with blocks (the 8-bit first-layer output and the root
    #: rounding term), MobileNetV2 64.0 / 58.1% -> 63.8 / 63.6%, EfficientNet-Lite0 76.2 -> 78.8 / 81.5%
    equalize_residual: bool | None = None
    #: after GPTQ, refine each low-bit layer in order by AdaRound on the error after its activation, facing its
    #: quantized input (QDrop's mix); ``adaround_iters`` Adam steps per layer on ``adaround_samples`` images.
    #: None = on when any layer has weights below 8 bits (w4a4 val500 top-1: MobileNetV2 28.2 -> 46.2,
    #: MobileNetV1 44.0 -> 54.4, EfficientNet-Lite0 63.0 -> 68.8; MobileNetV2 w4a8 70.4 -> 71.6), at the cost of
    #: minutes instead of seconds; searches that compile many trial models (``--max-drop``, ``ptqc
    #: sensitivity``) leave it off in their trials (:meth:`for_trials`).  When block reconstruction runs, the
    #: automatic default leaves the layers a block will learn again to the blocks (they start from GPTQ's
    #: codes) and refines only the others: MobileNetV2 w4a4 val500 / held-out agreement 60.2 / 53.0% with
    #: AdaRound on every layer, 59.4 / 54.0% without it, for several minutes less on EfficientNet-Lite0
    adaround: bool | None = None
    adaround_iters: int = 100
    adaround_samples: int = 64
    #: after AdaRound, learn the rounding of each block's low-bit layers together (``ptqc.blockrec``): against
    #: the block's output, with the block's activation quantizers in the loop (BRECQ with QDrop's dropping);
    #: ``block_iters`` Adam steps per block on windows from ``block_samples`` images (None = every calibration
    #: image; the pass keeps one block input of each in memory).  None = on when any layer
    #: has weights below 8 bits, like ``adaround`` (MobileNetV2 w4a4 val500 top-1 46.2 -> 56.6, +7 minutes), and
    #: when every weight is 8-bit but some activation is below 8 bits: then the blocks learn their 8-bit layers
    #: (floor/ceil of the 8-bit grid, and the biases) against the low-bit activation quantizers.  w8a4, val500
    #: top-1 / held-out agreement / logit SNR / harness s, without -> with blocks (and ``equalize_channels``):
    #: MobileNetV2 63.8 / 64.2% / 1.85 dB / 98 s (below w4a4 with blocks, 64.6 / 65.5%) -> 71.8 / 78.1% / 4.93 dB /
    #: 291 s, MobileNetV1 65.6 / 65.7% / 5.38 dB / 148 s -> 72.8 / 78.9% / 8.46 dB / 205 s, EfficientNet-Lite0
    #: 77.6 / 84.5% / 5.72 dB / 211 s -> 80.6 / 87.2% / 7.19 dB / 540 s
    block_recon: bool | None = None
    #: None = 600 below 4-bit weights, 300 otherwise.  MobileNetV2 w2a4 (512 images, block seeds 0 and 1), val500
    #: top-1 / held-out agreement / logit SNR: 300 steps 33.4, 27.2 / 38.5, 33.6% / 1.48, 1.08 dB in 197 s, 600
    #: steps 34.2, 36.0 / 42.8, 44.9% / 1.63, 1.65 dB in 319 s; EfficientNet-Lite0 w2a4 (seed 0) 55.0 / 52.1% /
    #: 2.06 dB in 438 s -> 63.4 / 55.0% / 2.38 dB in 689 s.  At w4a4, 1000 steps measured no better
    block_iters: int | None = None
    #: the share of the Adam steps after the warm-up over which block reconstruction hardens its rounding
    #: variables, the most decided first, so that the ones still soft compensate the ones already rounded
    #: (0 = AdaRound's plain annealing, every variable hardened at the end).  None = 0.8 below 4-bit weights, 0
    #: otherwise.  At 2 bits the annealing left 32-39% of MobileNetV2's first-block variables undecided after
    #: 300 steps, and rounding them made the block worse than its starting codes
    block_freeze: float | None = None
    block_samples: int | None = None
    #: after the rounding passes, fit the last layer (the classifier) by ridge regression from the quantized
    #: features it really reads to the float model's output, the strength chosen by 5-fold cross-validation
    #: over the calibration images, and keep it only when that held-out error falls (``refit_head``).  None = on
    #: with calibration data when some activation is below 8 bits: w2a4 on 512 images, val500 top-1 / held-out
    #: agreement, MobileNetV2 34.2 / 42.8% -> 35.4 / 47.5%, MobileNetV1 20.6 / 20.6% -> 31.0 / 26.1%, in 10-20 s;
    #: at 8-bit activations it moved top-1 by -1.6 to +0.4 (docs/design.md)
    refit_head: bool | None = None
    #: ARCQ's remainder compensation (``compensate_remainders``): the weight and input rounding remainders of this
    #: share (0-1) of the Convs below 8 bits, those with ARCQ's highest critical-layer score (measured on
    #: ``arcq_samples`` calibration samples), carried by two more convolutions each: 3x the MACs of those layers,
    #: which ``ptqc inspect`` reports.  0 = off (the default; it is extra arithmetic, not a w/a setting)
    arcq: float = 0.0
    arcq_samples: int = 32
    #: give each output channel of an inner layer of at most 6 bits a grid offset z in {0, 1/2, 1, -1/2} steps
    #: (values ``2^e (k + z)``: a per-channel weight zero point, half-integer ones stored at half the step, so
    #: every scale stays 2^e), chosen with the exponent by the rounding loss.  The integer MAC then needs the
    #: zero point's term, z * sum(x), as any asymmetric weight grid does.  None = on for the layers below 4 bits:
    #: w2a4 val500 drop MobileNetV2 65.0 -> 55.8, MobileNetV1 72.6 -> 59.6, EfficientNet-Lite0 40.0 -> 25.0;
    #: MobileNetV2 w4a4 (forced on) top-1 69.6 -> 67.4, logit SNR 3.67 -> 3.84 dB (docs/design.md)
    weight_offsets: bool | None = None
    #: bit width of a layer output that only residual Adds read (the linear bottleneck of an inverted residual
    #: block, before the sum); the sum itself is quantized at ``act_bits``.  The academic W/A convention that
    #: BRECQ, QDrop and RAPQ report leaves this tensor unquantized (their quant_block.py disables the act
    #: quantizer of a block's last conv and quantizes the block output); ptqc requantizes it by a shift to this
    #: width.  Never below ``act_bits``; set it to ``act_bits`` to put every activation on the same width
    residual_bits: int = 8
    #: move ReLU6-style clip bounds onto the top of the power-of-two grid by rescaling weights
    absorb_clip: bool = True
    #: how a requantizing right shift rounds: "half-even" (QuantizeLinear's own rule, no extra ops) or
    #: "half-up" (add 2^(m-1), then shift: what shift hardware usually does; one Add per requantizing op)
    rounding: str = "half-even"
    #: per-layer precision: node name -> bit width N of that layer's weights and of its input activation, or
    #: "wXaY" for different widths (``--bits NAME=N``, or ``[layers]`` in a TOML config); an output that no
    #: layer reads (only Adds, pooling) is raised with it; layer names are those ``ptqc inspect`` and
    #: ``ptqc sensitivity`` list
    layer_bits: dict[str, int | str] = dataclasses.field(default_factory=dict)
    #: layers left in float (``--keep-float NAME``): float weights and arithmetic; the model is then no longer
    #: integer-only, and ``ptqc inspect`` says so
    keep_float: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for what, bits in (("weight", self.weight_bits), ("activation", self.act_bits),
                           ("residual", self.residual_bits)):
            if bits not in SUPPORTED_BITS:
                raise PtqcError(
                    f"unsupported {what} bit width {bits}; ptqc supports "
                    f"{SUPPORTED_BITS.start} to {SUPPORTED_BITS.stop - 1}"
                )
        if self.act_method not in ("auto", "mse", "max"):
            raise PtqcError(f"unknown activation calibration method {self.act_method!r}; use auto, mse or max")
        if self.gptq_target not in ("float", "asym", "qdrop"):
            raise PtqcError(f"unknown GPTQ target {self.gptq_target!r}; use float, asym or qdrop")
        for name, bits in self.layer_bits.items():
            try:
                layer_widths(bits)
            except PtqcError as exc:
                raise PtqcError(f"layer {name}: {exc}") from None
        if self.rounding not in ("half-even", "half-up"):
            raise PtqcError(f"unknown rounding rule {self.rounding!r}; use half-even or half-up")
        if self.adaround_iters < 1 or self.adaround_samples < 1:
            raise PtqcError(f"--adaround-iters and adaround_samples must be at least 1, got {self.adaround_iters} "
                            f"and {self.adaround_samples}")
        if (self.block_iters is not None and self.block_iters < 1) or (
                self.block_samples is not None and self.block_samples < 1):
            raise PtqcError(f"--block-iters and block_samples must be at least 1, got {self.block_iters} "
                            f"and {self.block_samples}")
        if self.block_freeze is not None and not 0.0 <= self.block_freeze <= 1.0:
            raise PtqcError(f"--block-freeze must be between 0 and 1, got {self.block_freeze}")
        if not 0.0 <= self.arcq <= 1.0:
            raise PtqcError(f"--arcq takes the share of low-bit convs to compensate, between 0 and 1, got {self.arcq}")
        if self.arcq_samples < 1:
            raise PtqcError(f"arcq_samples must be at least 1, got {self.arcq_samples}")
        if self.calib_size < 1:
            raise PtqcError(f"--calib-size must be at least 1, got {self.calib_size}")
        if self.act_borders and self.act_search and self.use_block_recon:
            raise PtqcError("--act-borders learns its borders in block reconstruction, on exponents that --act-search "
                            "moves afterwards; use one of them, or add --no-block-recon")

    @property
    def tag(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"

    @property
    def use_search(self) -> bool:
        return self.act_search

    @property
    def use_gptq(self) -> bool:
        return self.gptq if self.gptq is not None else True

    @property
    def min_weight_bits(self) -> int:
        """The narrowest weight width asked for, globally or per layer (the first layer's pair-safe 7-bit grid
        does not count)."""
        return min([self.weight_bits] + [layer_widths(b)[0] for b in self.layer_bits.values()])

    @property
    def low_bit_weights(self) -> bool:
        """Some layer's weights are below 8 bits."""
        return self.min_weight_bits < 8

    @property
    def use_adaround(self) -> bool:
        return self.adaround if self.adaround is not None else self.low_bit_weights

    @property
    def adaround_outside_blocks(self) -> bool:
        """AdaRound left to its default while block reconstruction runs: only layers outside the blocks."""
        return self.adaround is None and self.use_adaround and self.use_block_recon

    @property
    def use_equalize_residual(self) -> bool:
        if self.equalize_residual is not None:
            return self.equalize_residual
        return self.act_bits < 8

    @property
    def low_bit_acts(self) -> bool:
        """Some layer's input activation is below 8 bits."""
        return self.act_bits < 8 or any(layer_widths(b)[1] < 8 for b in self.layer_bits.values())

    @property
    def use_equalize_channels(self) -> bool:
        if self.equalize_channels is not None:
            return self.equalize_channels
        return self.low_bit_acts and (self.low_bit_weights or self.use_block_recon)

    @property
    def use_learn_clip(self) -> bool:
        return self.learn_clip if self.learn_clip is not None else self.low_bit_acts and self.weight_bits >= 4

    @property
    def use_refit_head(self) -> bool:
        return self.refit_head if self.refit_head is not None else self.low_bit_acts

    @property
    def use_block_recon(self) -> bool:
        return self.block_recon if self.block_recon is not None else self.low_bit_weights or self.low_bit_acts

    @property
    def block_recon_8bit(self) -> bool:
        """Block reconstruction learns 8-bit layers too: no weight is below 8 bits, so without them it would
        have nothing to learn, while the low-bit activations are what the weights must adapt to."""
        return self.use_block_recon and not self.low_bit_weights

    def for_trials(self) -> QuantConfig:
        """The settings a search's trial compiles use: AdaRound, block reconstruction, learned clipping and the
        head refit left off unless asked for explicitly, since a search compiles many models (the first three
        turn each from seconds into minutes; the refit adds a pass over the calibration data)."""
        return dataclasses.replace(self, adaround=False if self.adaround is None else self.adaround,
                                   block_recon=False if self.block_recon is None else self.block_recon,
                                   learn_clip=False if self.learn_clip is None else self.learn_clip,
                                   refit_head=False if self.refit_head is None else self.refit_head,
                                   equalize_residual=(False if self.equalize_residual is None
                                                      else self.equalize_residual))

    @property
    def moment_samples(self) -> int:
        if self.gptq_samples is not None:
            return self.gptq_samples
        return self.calib_size if self.weight_bits < 8 else 32

    @property
    def recon_iters(self) -> int:
        if self.block_iters is not None:
            return self.block_iters
        return 600 if self.min_weight_bits < 4 else 300

    @property
    def recon_samples(self) -> int:
        return self.calib_size if self.block_samples is None else self.block_samples

    @property
    def use_weight_offsets(self) -> bool:
        """Some layer gets grid offsets."""
        return 0 < self.weight_offset_bits and self.min_weight_bits <= self.weight_offset_bits

    @property
    def weight_offset_bits(self) -> int:
        """Inner layers of at most this many weight bits get grid offsets: 6 when asked for (the int8 container
        holds a half-integer row's 2(k + z) up to 6 bits), 3 by default, 0 when off."""
        if self.weight_offsets is None:
            return 3
        return 6 if self.weight_offsets else 0

    @property
    def recon_freeze(self) -> float:
        if self.block_freeze is not None:
            return self.block_freeze
        return 0.8 if self.min_weight_bits < 4 else 0.0

    def as_metadata(self) -> dict[str, str]:
        """Every setting as ``ptqc.config.<field>``; a setting left to its automatic default says what it
        resolved to, e.g. ``auto: True``."""
        out = {f"ptqc.config.{k}": str(v) for k, v in dataclasses.asdict(self).items()}
        for key, resolved in (("gptq", self.use_gptq), ("adaround", self.use_adaround),
                              ("block_recon", self.use_block_recon), ("learn_clip", self.use_learn_clip),
                              ("refit_head", self.use_refit_head),
                              ("equalize_channels", self.use_equalize_channels),
                              ("equalize_residual", self.use_equalize_residual),
                              ("gptq_samples", self.moment_samples), ("block_samples", self.recon_samples),
                              ("block_freeze", self.recon_freeze), ("block_iters", self.recon_iters),
                              ("weight_offsets", self.use_weight_offsets)):
            if getattr(self, key) is None:
                out[f"ptqc.config.{key}"] = f"auto: {resolved}"
        if self.adaround_outside_blocks:
            out["ptqc.config.adaround"] = "auto: outside blocks"
        return out


def load_toml(path: str) -> dict:
    """Settings from a TOML file: top-level keys are :class:`QuantConfig` fields (``bits = "w4a4"`` is a
    shorthand for both widths), and a ``[layers]`` table maps layer names to bit widths."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise PtqcError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PtqcError(f"{path} is not valid TOML: {exc}") from None
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    settings = {}
    for key, value in data.items():
        if key == "layers":
            if not isinstance(value, dict):
                raise PtqcError(f"{path}: [layers] must be a table of name = bits")
            settings["layer_bits"] = dict(value)
        elif key == "keep_float" or key == "keep-float":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PtqcError(f"{path}: keep_float must be a list of layer names")
            settings["keep_float"] = list(value)
        elif key == "bits":
            settings["weight_bits"], settings["act_bits"] = parse_shorthand(str(value))
        elif key.replace("-", "_") in fields:
            settings[key.replace("-", "_")] = value
        else:
            raise PtqcError(f"{path}: unknown setting {key!r}")
    return settings


def layer_widths(value: int | str) -> tuple[int, int]:
    """(weight bits, input activation bits) of a per-layer setting: ``8`` or ``"w2a4"``."""
    if isinstance(value, bool):
        raise PtqcError(f"a layer bit width must be a number or wXaY, got {value!r}")
    if isinstance(value, int):
        widths = value, value
    else:
        text = str(value).strip()
        widths = (int(text), int(text)) if text.isdigit() else parse_shorthand(text)
    if any(b not in SUPPORTED_BITS for b in widths):
        raise PtqcError(f"unsupported layer bit width {value!r}; ptqc supports 2 to 8")
    return widths


def parse_layer_bits(items) -> dict[str, int | str]:
    """``["conv1=8", "fc=w4a8"]`` -> ``{"conv1": 8, "fc": "w4a8"}``."""
    out: dict[str, int | str] = {}
    for item in items:
        name, sep, bits = item.rpartition("=")
        if not sep or not name or not bits.strip():
            raise PtqcError(f"--bits takes NAME=N or NAME=wXaY, got {item!r}")
        bits = bits.strip()
        out[name] = int(bits) if bits.isdigit() else bits
        layer_widths(out[name])
    return out


def parse_shorthand(text: str) -> tuple[int, int]:
    """``"w2a4"`` -> ``(2, 4)``; anything else is a :class:`PtqcError`."""
    match = _SHORTHAND.match(text.strip().lower())
    if not match:
        raise PtqcError(f"bit-width shorthand must look like w4a8, got {text!r}")
    return int(match.group(1)), int(match.group(2))
