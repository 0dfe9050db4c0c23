//! The row reduction over logits (`shaders/logprob.wgsl`): the partial state of one vocabulary
//! panel (max, sum of exponentials, target logit, argmax) that the host merges.

use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuIndices, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/logprob.wgsl");

/// The row reduction over a panel of logits.
pub struct Logprob {
    partials: Pipeline,
}

fn rows_vocab(
    ctx: &GpuContext,
    logits: &GpuTensor,
    out: &GpuTensor,
    per_row: usize,
) -> Result<(usize, usize)> {
    let &[rows, vocab] = logits.shape.as_slice() else {
        return Err(Error::invalid("logprob", "logits must be 2-d"));
    };
    if out.numel() != rows * per_row {
        return Err(Error::invalid(
            "logprob",
            format!("{per_row} outputs per row of logits"),
        ));
    }
    super::check_row_loops(ctx, vocab, 3, "log-softmax")?;
    Ok((rows, vocab))
}

impl Logprob {
    /// Compiles the kernel.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            partials: Pipeline::new(ctx, SOURCE, "partials"),
        }
    }

    /// Per row `r` of a panel of logits `[rows, cols]`, four values for the host to merge:
    /// `out[4r..4r + 4] = [max, sum_j e^(l_j - max), l[targets[r]] (NaN when targets[r] >= cols),
    /// bits of the argmax]`.
    pub fn partials(
        &self,
        ctx: &GpuContext,
        logits: &GpuTensor,
        targets: &GpuIndices,
        out: &GpuTensor,
    ) -> Result<()> {
        let (rows, cols) = rows_vocab(ctx, logits, out, 4)?;
        if targets.len != rows {
            return Err(Error::invalid("logprob", "one target per row of logits"));
        }
        self.partials.dispatch(
            ctx,
            &[&logits.buffer, &targets.buffer, &out.buffer],
            &[rows as u32, cols as u32],
            grid(rows),
        );
        Ok(())
    }
}
