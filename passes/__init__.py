"""The compile pipeline, one pass per module, in the order ``ptqc.pipeline`` runs them.

1. ``fold_batchnorm``     BatchNormalization into the preceding Conv/Gemm/ConvTranspose
2. ``gap_to_sum``         GlobalAveragePool feeding a linear layer -> ReduceSum, 1/(H*W) folded into weights
3. ``plan_quantization``  which tensors get quantizers, their bit widths and signedness, fused activations
4. ``calibrate``          streamed histograms (and layer-input means) of every planned tensor, via onnxruntime
5. ``absorb_clip_range``  ReLU6 bounds moved onto the power-of-two grid's top by rescaling weights
6. ``pot_scales``         power-of-two exponents: per weight channel and per activation tensor
7. ``bias_correction``    compensation bias: the mean output error of weight rounding, subtracted
8. ``legalize_scales``    shared exponents where an op needs them, int32 bias range
9. ``emit_qdq``           the QDQ graph: integer weights, int32 biases, Q/DQ with scale 2**e, docs for Netron
"""
