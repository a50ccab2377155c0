"""Quantization: FP8 weights (checkpoints and on-the-fly) and the FP8 KV cache's scales.

fp8_scheme.py reads what a checkpoint's `quantization_config` and EngineConfig ask for (pure); fp8_linear.py
is the layer that replaces the decoder's projections; fp8_weights.py turns checkpoint tensors into that
layer's weights and scales; kv_scales.py gives every attention layer its K/V scales; accuracy.py measures
what any of it costs against the unquantized model.
"""
