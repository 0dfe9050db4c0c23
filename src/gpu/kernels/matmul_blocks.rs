//! Linear layers with weights kept as GGUF blocks (the K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS),
//! decoded inside the kernel (`shaders/matmul_blocks.wgsl`): each row of `W [n, k]` is its
//! `k / block_len` blocks as the file stores them, padded to whole u32 words
//! ([`RowFormat::Blocks`](crate::layout::RowFormat::Blocks)); one compilation per format
//! (the ggml type id is a pipeline constant), made when a model first needs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Pipeline};
use crate::layout::{passes, RowFormat};
use crate::quant::ggml::BlockFormat;

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/matmul_blocks.wgsl");

/// Rows of `x` per invocation for many rows (one for decode's few).
const ROWS_PER_TILE: usize = 8;

/// A weight of GGUF blocks on the device (cloning shares the buffer).
#[derive(Clone)]
pub struct GpuBlockWeight {
    /// The rows' words.
    pub(crate) words: wgpu::Buffer,
    /// Rows held.
    pub rows: usize,
    /// Values per row (whole blocks).
    pub k: usize,
    /// The block format.
    pub format: BlockFormat,
}

impl GpuBlockWeight {
    /// Words per row (the blocks' bytes rounded up to whole words).
    pub fn row_words(&self) -> usize {
        RowFormat::Blocks {
            k: self.k,
            format: self.format,
        }
        .row_bytes()
            / 4
    }
}

/// The block-weight matrix product, compiled per (format, rows per tile, accumulate).
#[derive(Default)]
pub struct MatmulBlocks {
    pipelines: Mutex<HashMap<(u32, usize, bool), Arc<Pipeline>>>,
}

impl MatmulBlocks {
    /// The compilation for `format` with `rows` rows of x per invocation.
    fn pipeline(
        &self,
        ctx: &GpuContext,
        format: BlockFormat,
        rows: usize,
        accumulate: bool,
    ) -> Arc<Pipeline> {
        let key = (format.ggml_type(), rows, accumulate);
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Pipeline::with_constants(
                    ctx,
                    SOURCE,
                    "main",
                    &[
                        ("FORMAT", f64::from(key.0)),
                        ("RW", rows as f64),
                        ("ACCUMULATE", f64::from(u8::from(accumulate))),
                    ],
                ))
            })
            .clone()
    }

    /// `x [m, k] . W^T` into columns `y_offset .. y_offset + n` of `y [m, total]`.
    pub fn run(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        w: &GpuBlockWeight,
        y: &GpuTensor,
        y_offset: usize,
    ) -> Result<()> {
        let (&[m, k], &[m2, total]) = (x.shape.as_slice(), y.shape.as_slice()) else {
            return Err(Error::invalid("matmul", "x and y must be 2-d"));
        };
        if k != w.k || m != m2 || y_offset + w.rows > total {
            return Err(Error::invalid(
                "matmul",
                format!(
                    "x {:?} and y {:?} do not fit a {} x {} {} weight",
                    x.shape,
                    y.shape,
                    w.rows,
                    w.k,
                    w.format.name()
                ),
            ));
        }
        if m == 0 || w.rows == 0 {
            return Ok(());
        }
        let rows = if m < 4 { 1 } else { ROWS_PER_TILE };
        let bl = w.format.block_len();
        // passes of whole blocks, at least one block each
        let per_pass = (super::matmul::k_per_pass(ctx) / bl).max(1) * bl;
        for (p, ks) in passes(k, per_pass).into_iter().enumerate() {
            let dims = [
                m,
                k,
                w.rows,
                total,
                y_offset,
                w.row_words(),
                ks.start / bl,
                ks.end / bl,
            ]
            .map(|v| v as u32);
            self.pipeline(ctx, w.format, rows, p > 0).dispatch(
                ctx,
                &[&x.buffer, &w.words, &y.buffer],
                &dims,
                [w.rows.div_ceil(64) as u32, m.div_ceil(rows) as u32, 1],
            );
        }
        Ok(())
    }
}
