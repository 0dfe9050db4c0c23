//! Kernels, one family per file, each with its WGSL source in `shaders/`.

pub mod matmul;
