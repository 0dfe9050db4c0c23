//! Run-time layouts that every device and tier shares: linear weights' row formats
//! ([`RowFormat`], [`PackedWeight`]), the 4-bit KV cache row ([`Q4Layout`]), attention heads
//! ([`HeadLayout`]), and the row passes of chunked loops.

pub mod kv;
pub mod packed;
pub mod rows;

pub use kv::Q4Layout;
pub use packed::PackedWeight;
pub(crate) use rows::output_format;
pub use rows::{convert_rows, RowFormat, RunOptions, WeightFormat};

/// Attention heads of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; each serves `heads / kv_heads` query heads (GQA).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Bytes of a KV cache segment's rows between two sequences' rows on disk up to which one
/// request reads or writes both, and the rows between (a sequence's unused capacity, moved as
/// it is): about what the disk moves in the time one more request costs (0.1-0.3 ms at
/// 1-2 GB/s). The executor's cache I/O and the cost model's disk terms both follow it.
pub(crate) const CACHE_MERGE_GAP_BYTES: usize = 256 << 10;

/// Rows of logits computed at once when scoring, unless told otherwise.
pub(crate) const LOGIT_ROWS: usize = 128;

/// Rows of a batch that one unit computes at once, unless told otherwise (a prompt longer
/// than this runs in row chunks).
pub(crate) const CHUNK_ROWS: usize = 512;

/// `0..len` cut into consecutive ranges of at most `most` (at least 1) items, for kernels
/// that split a long loop into passes (a WebGPU device's loop budget) and for chunked
/// recipes; one empty range when
/// `len` is 0.
pub(crate) fn passes(len: usize, most: usize) -> Vec<std::ops::Range<usize>> {
    let most = most.max(1);
    if len == 0 {
        return std::iter::once(0..0).collect();
    }
    (0..len.div_ceil(most))
        .map(|p| p * most..((p + 1) * most).min(len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_cover_the_range_in_order() {
        for (len, most) in [(0usize, 5usize), (1, 5), (5, 5), (6, 5), (17, 4), (3, 0)] {
            let p = passes(len, most);
            assert_eq!(p.first().map(|r| r.start), Some(0));
            assert_eq!(p.last().map(|r| r.end), Some(len));
            assert!(p.windows(2).all(|w| w[0].end == w[1].start));
            assert!(p.iter().all(|r| r.len() <= most.max(1)));
        }
    }
}
