//! Linear-weight rows in device buffers: the wgpu side of the run-time layout
//! ([`crate::layout::RowFormat`]).

use crate::gpu::kernels::matmul_q::GpuPackedWeight;
use crate::gpu::model::WeightPart;
use crate::gpu::GpuTensor;
use crate::layout::{PackedWeight, RowFormat};

/// The device part for `rows` rows of `format` held in `buffers` (one per segment).
pub(crate) fn part(format: RowFormat, rows: usize, mut buffers: Vec<wgpu::Buffer>) -> WeightPart {
    match format {
        RowFormat::F32 { k } => WeightPart::F32(GpuTensor {
            buffer: buffers.remove(0),
            shape: vec![rows, k],
        }),
        RowFormat::Packed {
            k,
            padded_k,
            group,
            bits,
        } => {
            let scales = buffers.remove(1);
            let codes = buffers.remove(0);
            WeightPart::Packed(GpuPackedWeight::from_buffers(
                codes,
                scales,
                PackedWeight {
                    rows,
                    k,
                    padded_k,
                    group,
                    bits,
                    codes: Vec::new(),
                    scales: Vec::new(),
                },
            ))
        }
    }
}
