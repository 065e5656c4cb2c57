"""GPU kernels (FP8 head, fused FP8 head + loss, fused ReLU^2 MLP) and the converters that swap
them into a model (``muongpt.kernels.converters``)."""
