//! Embedding gather with optional learned positions (`shaders/embedding.wgsl`).

use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuIndices, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/embedding.wgsl");

/// `y[r] = table[ids[r]] (+ positions[pos[r] + offset])`.
pub struct Embedding {
    pipeline: Pipeline,
}

impl Embedding {
    /// Compiles the kernel.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            pipeline: Pipeline::new(ctx, SOURCE, "main"),
        }
    }

    /// Gathers rows of `table [vocab, width]` for `ids` into `y [rows, width]`, adding rows of
    /// `positions` (at `pos[r] + offset`) when given. Ids and positions must be in range
    /// (callers check them: the kernel does not).
    pub fn run(
        &self,
        ctx: &GpuContext,
        table: &GpuTensor,
        positions: Option<(&GpuTensor, u32)>,
        ids: &GpuIndices,
        pos: &GpuIndices,
        y: &GpuTensor,
    ) -> Result<()> {
        let (&[_, width], &[rows, w2]) = (table.shape.as_slice(), y.shape.as_slice()) else {
            return Err(Error::invalid("embedding", "table and y must be 2-d"));
        };
        if w2 != width || ids.len != rows || (positions.is_some() && pos.len != rows) {
            return Err(Error::invalid(
                "embedding",
                "ids, positions and output disagree",
            ));
        }
        let (pos_table, has, offset) = match positions {
            Some((t, offset)) => (t, 1, offset),
            None => (table, 0, 0),
        };
        let params = [rows as u32, width as u32, has, offset];
        self.pipeline.dispatch(
            ctx,
            &[
                &table.buffer,
                &pos_table.buffer,
                &ids.buffer,
                &pos.buffer,
                &y.buffer,
            ],
            &params,
            grid((rows * width).div_ceil(256)),
        );
        Ok(())
    }
}
