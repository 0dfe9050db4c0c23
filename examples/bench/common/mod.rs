//! What the benchmark programs share: the command line's flag parsers and helpers
//! (`ferrogen::cli::common`), and the weight formats they time.

#![allow(dead_code, unused_imports)]

pub use ferrogen::cli::common::*;

/// The weight formats the kernel benchmarks time: name, bits per code (32 = plain f32), codes
/// per scale group (Q4_0 and Q4_1 share one kernel).
pub const WEIGHT_FORMATS: [(&str, u32, usize); 5] = [
    ("f32", 32, 0),
    ("f16", 16, 64),
    ("Q8_0", 8, 32),
    ("Q4_0/Q4_1", 4, 32),
    ("FlexGen 4-bit", 4, 64),
];
