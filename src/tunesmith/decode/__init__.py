"""Generation: a Generator (generator.py) decodes through continuous batching over one static KV cache (slots.py),
whose step runs the decoder's layers through decode/static.py (fused projections, GPU kernels, CUDA graphs);
sampling.py picks tokens, text.py turns them into streamed text."""
