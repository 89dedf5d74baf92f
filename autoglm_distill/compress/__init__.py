"""Compression that reaches the exported files: structured pruning (teacher -> student init and a training callback),
unstructured / N:M sparsity and quantization-aware training, each a Lightning callback on the distill stage."""
