//! Row reductions over logits (`shaders/logprob.wgsl`): target log-probabilities, the argmax,
//! and the partial state of one vocabulary panel that the host merges.

use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuIndices, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/logprob.wgsl");

/// The row reductions over logits.
pub struct Logprob {
    target: Pipeline,
    argmax: Pipeline,
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
    /// Compiles both.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            target: Pipeline::new(ctx, SOURCE, "target_logprob"),
            argmax: Pipeline::new(ctx, SOURCE, "argmax"),
            partials: Pipeline::new(ctx, SOURCE, "partials"),
        }
    }

    /// `out[r] = ln softmax(logits[r])[targets[r]]` (targets checked by callers).
    pub fn target_logprob(
        &self,
        ctx: &GpuContext,
        logits: &GpuTensor,
        targets: &GpuIndices,
        out: &GpuTensor,
    ) -> Result<()> {
        with_targets(&self.target, ctx, logits, targets, out, 1)
    }

    /// `out[r]` = the bits of the index of row `r`'s largest logit (read back with
    /// `f32::to_bits`).
    pub fn argmax(&self, ctx: &GpuContext, logits: &GpuTensor, out: &GpuTensor) -> Result<()> {
        let (rows, vocab) = rows_vocab(ctx, logits, out, 1)?;
        let unused = GpuIndices::upload(ctx, &[0]);
        self.argmax.dispatch(
            ctx,
            &[&logits.buffer, &unused.buffer, &out.buffer],
            &[rows as u32, vocab as u32],
            grid(rows),
        );
        Ok(())
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
        with_targets(&self.partials, ctx, logits, targets, out, 4)
    }
}

/// Dispatches a per-row reduction that reads one target per row and writes `per_row` values.
fn with_targets(
    pipeline: &Pipeline,
    ctx: &GpuContext,
    logits: &GpuTensor,
    targets: &GpuIndices,
    out: &GpuTensor,
    per_row: usize,
) -> Result<()> {
    let (rows, cols) = rows_vocab(ctx, logits, out, per_row)?;
    if targets.len != rows {
        return Err(Error::invalid("logprob", "one target per row of logits"));
    }
    pipeline.dispatch(
        ctx,
        &[&logits.buffer, &targets.buffer, &out.buffer],
        &[rows as u32, cols as u32],
        grid(rows),
    );
    Ok(())
}
