//! Architectures: one file per model family ([`llama`], [`opt`]) holding how its tensors form
//! the schedule's units, its attention heads, its sizes for the cost model, and its forward
//! pass over the [`Device`] seam; [`common`] holds what they share. This file is the
//! switchboard: each method below hands its work to the model's architecture.
//!
//! A unit's weights reach the forward pass as data ([`PartSpec`] listed by the architecture,
//! filled by the placer into [`PartWeights`]), so the same recipe runs resident models
//! ([`crate::exec::ResidentModel`]) and streamed ones (`crate::exec`) on every device.

pub mod common;
pub mod llama;
pub mod opt;

pub use common::{
    CacheSlot, Linear, ModelParts, PartSpec, PartWeights, RowBatch, Runner, UnitWeights,
};

use crate::device::Device;
use crate::error::Result;
use crate::layout::{HeadLayout, RunOptions, CHUNK_ROWS, LOGIT_ROWS};
use crate::model::{ModelConfig, ModelFiles};
use crate::policy::cost::ModelShape;

/// The model's tensors grouped as the schedule's units use them.
pub fn parts(files: &ModelFiles) -> ModelParts {
    match &files.config {
        ModelConfig::Llama(c) => llama::parts(c),
        ModelConfig::Opt(c) => opt::parts(c, files.opt_prefix()),
    }
}

impl ModelConfig {
    /// The attention heads of the model's layers.
    pub fn head_layout(&self) -> HeadLayout {
        match self {
            ModelConfig::Llama(c) => llama::head_layout(c),
            ModelConfig::Opt(c) => opt::head_layout(c),
        }
    }

    /// The model's sizes as the cost model counts them.
    pub fn shape(&self) -> ModelShape {
        match self {
            ModelConfig::Llama(c) => llama::shape(c),
            ModelConfig::Opt(c) => opt::shape(c),
        }
    }
}

impl<D: Device> Runner<D> {
    /// The recipe of `config` on `dev`.
    pub fn new(dev: D, config: &ModelConfig, options: RunOptions) -> Self {
        let rope_base = match config {
            ModelConfig::Llama(c) => Some(c.rope_theta),
            ModelConfig::Opt(_) => None,
        };
        Self {
            dev,
            options,
            config: config.clone(),
            logit_rows: LOGIT_ROWS,
            chunk_rows: CHUNK_ROWS,
            heads: config.head_layout(),
            rope_base,
        }
    }

    /// Embedded tokens `e` -> the first layer's input.
    pub fn input(&self, w: &PartWeights<D>, e: D::Tensor, rb: &RowBatch<D>) -> Result<D::Tensor> {
        match &self.config {
            ModelConfig::Llama(_) => Ok(e),
            ModelConfig::Opt(_) => opt::input(self, w, e, rb),
        }
    }

    /// A layer's attention half, appending the rows' keys and values to `cache`, in row chunks
    /// (query tiles) taken in order.
    pub fn attention(
        &self,
        w: &PartWeights<D>,
        x: D::Tensor,
        cache: &D::Cache,
        rb: &RowBatch<D>,
    ) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, range| {
            let sub;
            let rows = if range.len() == rb.rows {
                rb
            } else {
                sub = self.chunk(rb, range)?;
                &sub
            };
            self.attention_with(w, xc, rows, |q, k, v| {
                self.dev
                    .attend(cache, &rows.dev, &rows.appends, q, k, v, self.heads)
            })
        })
    }

    /// [`Runner::attention`] on all rows at once, with the attention itself done by
    /// `attend(q, k, v)`, which returns `[rows, heads * head_dim]` (before the output
    /// projection). The executor's split attention uses it for decode steps.
    pub fn attention_with(
        &self,
        w: &PartWeights<D>,
        x: D::Tensor,
        rb: &RowBatch<D>,
        attend: impl FnOnce(&D::Tensor, &D::Tensor, &D::Tensor) -> Result<D::Tensor>,
    ) -> Result<D::Tensor> {
        match &self.config {
            ModelConfig::Llama(c) => llama::attention(self, c, w, x, rb, attend),
            ModelConfig::Opt(c) => opt::attention(self, c, w, x, attend),
        }
    }

    /// A layer's MLP half, in row chunks.
    pub fn mlp(&self, w: &PartWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, _| match &self.config {
            ModelConfig::Llama(c) => llama::mlp(self, c, w, xc),
            ModelConfig::Opt(c) => opt::mlp(self, c, w, xc),
        })
    }

    /// The last layer's output -> the rows the output projection reads, in row chunks.
    pub fn head(&self, w: &PartWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, _| match &self.config {
            ModelConfig::Llama(c) => llama::head(self, c, w, xc),
            ModelConfig::Opt(_) => opt::head(self, w, xc),
        })
    }
}
