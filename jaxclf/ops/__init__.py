"""Custom ops for CPU speed: `jaxclf.ops.onednn.conv2d` (oneDNN convolutions through jax.ffi)."""
