//! The whole model resident on a WebGPU device: [`GpuModel`], the device-generic
//! [`ResidentModel`] on a [`WgpuDevice`].

pub use super::device::{LayerCache, WeightPart, WgpuDevice};
pub use crate::device::resident::{ResidentCache, ResidentModel};
pub use crate::layout::{RunOptions as GpuOptions, WeightFormat};

use super::GpuContext;
use crate::error::Result;
use crate::model::ModelFiles;

/// A model resident on the WebGPU device.
pub type GpuModel = ResidentModel<WgpuDevice>;

/// Per-layer KV caches of one batch on the WebGPU device.
pub type GpuKvCache = ResidentCache<WgpuDevice>;

impl ResidentModel<WgpuDevice> {
    /// Uploads every weight of an opened model, linear weights in `options.weights` (norms
    /// and biases are f32; embedding lookups read the table from RAM).
    pub fn load(ctx: GpuContext, files: &ModelFiles, options: GpuOptions) -> Result<Self> {
        Self::new(WgpuDevice::new(ctx)?, files, options)
    }

    /// The WebGPU context.
    pub fn context(&self) -> &GpuContext {
        self.device().context()
    }
}
