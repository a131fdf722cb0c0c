"""The compile pipeline, one pass per module, in the order ``ptqc.pipeline`` runs them.

1. ``fold_batchnorm``        BatchNormalization into the preceding Conv/Gemm/ConvTranspose
2. ``gap_to_sum``            GlobalAveragePool feeding a linear layer -> ReduceSum, 1/(H*W) folded into weights
3. ``plan_quantization``     which tensors get quantizers, their bit widths and signedness, fused activations
4. ``calibrate``             streamed histograms, layer-input means (and GPTQ statistics) via onnxruntime
   then ``equalize_channels`` per-channel clipping thresholds for what depthwise convs read, in the weights (option)
5. ``absorb_clip_range``     ReLU6 bounds moved onto the power-of-two grid's top by rescaling weights
6. ``pot_scales``            power-of-two exponents: per weight channel, per activation scale-sharing group
7. ``gptq_rounding``         GPTQ weight codes on the power-of-two grids, per-channel exponent choice
   or ``reconstruct_layers`` the same, sequentially, fitted from each layer's quantized input (option)
8. ``bias_correction``       compensation bias: the mean output error of weight rounding, subtracted
9. ``search_act_exponents``  activation exponents adjusted by +-1 against the end-to-end logit error
10. ``legalize_scales``      int32 biases at the accumulator scale, never overflowing; shared exponents checked
11. ``emit_qdq``             the QDQ graph: integer weights, int32 biases, Q/DQ with scale 2**e, docs for Netron
"""
