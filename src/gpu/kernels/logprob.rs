//! Target log-probabilities and argmax over rows of logits (`shaders/logprob.wgsl`).

use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuIndices, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/logprob.wgsl");

/// The two row reductions over logits.
pub struct Logprob {
    target: Pipeline,
    argmax: Pipeline,
}

fn rows_vocab(ctx: &GpuContext, logits: &GpuTensor, out: &GpuTensor) -> Result<(usize, usize)> {
    let &[rows, vocab] = logits.shape.as_slice() else {
        return Err(Error::invalid("logprob", "logits must be 2-d"));
    };
    if out.numel() != rows {
        return Err(Error::invalid("logprob", "one output per row of logits"));
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
        let (rows, vocab) = rows_vocab(ctx, logits, out)?;
        if targets.len != rows {
            return Err(Error::invalid("logprob", "one target per row of logits"));
        }
        self.target.dispatch(
            ctx,
            &[&logits.buffer, &targets.buffer, &out.buffer],
            &[rows as u32, vocab as u32],
            grid(rows),
        );
        Ok(())
    }

    /// `out[r]` = the bits of the index of row `r`'s largest logit (read back with
    /// `f32::to_bits`).
    pub fn argmax(&self, ctx: &GpuContext, logits: &GpuTensor, out: &GpuTensor) -> Result<()> {
        let (rows, vocab) = rows_vocab(ctx, logits, out)?;
        let unused = GpuIndices::upload(ctx, &[0]);
        self.argmax.dispatch(
            ctx,
            &[&logits.buffer, &unused.buffer, &out.buffer],
            &[rows as u32, vocab as u32],
            grid(rows),
        );
        Ok(())
    }
}
