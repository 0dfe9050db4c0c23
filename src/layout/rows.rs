//! The run-time layout of linear weights, shared by every device and tier: what a weight's
//! rows become in device memory, in RAM and in the offload file, and the conversion from the
//! model file.
//!
//! A row range is f32 rows ([`RowFormat::F32`]) or packed codes then packed scales
//! ([`RowFormat::Packed`], [`PackedWeight`]'s layout), so moving rows between tiers is a plain
//! copy and every device's kernels read them as they arrive.

use std::ops::Range;

use serde::Serialize;

use super::PackedWeight;
use crate::error::{Error, Result};
use crate::model::weights::decode_to_f32;
use crate::model::{DType, TensorSpec, WeightSource};
use crate::quant::ggml::{quantize_q8_0, BlockFormat, BLOCK_LEN};
use crate::quant::group4::Group4;

/// How linear-layer weights are held at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Decoded to f32.
    F32,
    /// As the file stores them: GGUF blocks run natively, never requantized (Q4_0/Q4_1/Q8_0
    /// repacked losslessly into the packed layout, the others kept as their blocks), f16
    /// tensors stay f16 (decoded in the kernel); f32 and bf16 tensors become f32 (bf16 does
    /// not always fit f16's range).
    #[default]
    Native,
    /// FlexGen's 4-bit groups of 64 along the input dimension (`--compress-weight`).
    Group4,
    /// GGUF blocks as stored; other weights quantized to Q8_0 (8 bits per value, blocks of
    /// 32; f32 where rows are not whole blocks). The output projection under
    /// `--compress-weight`.
    Q8,
}

impl WeightFormat {
    /// The executor's format: FlexGen's 4-bit groups under `compress_weight`, else native.
    pub fn of(compress_weight: bool) -> Self {
        if compress_weight {
            WeightFormat::Group4
        } else {
            WeightFormat::Native
        }
    }
}

/// How a model is held on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunOptions {
    /// Linear-layer weights.
    pub weights: WeightFormat,
    /// Keep the KV cache in FlexGen's 4-bit groups along head_dim (`--compress-cache`).
    pub compress_cache: bool,
    /// Keep the KV cache in f16 (`--f16-cache`; `compress_cache` wins when both are set, and
    /// the engine refuses the pair).
    pub f16_cache: bool,
}

/// The output projection goes to 8 bits, not 4, under --compress-weight: 4-bit logits over a
/// large vocabulary cost far more accuracy than any layer (SmolLM2's GGUF keeps it in Q8_0 for
/// the same reason), and an f32 head would be the largest thing streamed.
pub(crate) fn output_format(format: WeightFormat) -> WeightFormat {
    if format == WeightFormat::Group4 {
        WeightFormat::Q8
    } else {
        format
    }
}

/// How rows of a linear weight are laid out at run time, on every tier alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RowFormat {
    /// f32 rows of `k` values.
    F32 {
        /// Values per row.
        k: usize,
    },
    /// Packed codes and (step, min) words ([`PackedWeight`]'s layout).
    Packed {
        /// Values per row.
        k: usize,
        /// `k` rounded up to whole groups.
        padded_k: usize,
        /// Codes per (step, min) group.
        group: usize,
        /// Bits per code (4, 8 or 16).
        bits: u32,
    },
    /// GGUF blocks as the file stores them (the K-quants, Q5_0/Q5_1, IQ4): each row is its
    /// `k / block_len` blocks, padded with zero bytes to whole 4-byte words.
    Blocks {
        /// Values per row (whole blocks).
        k: usize,
        /// The block format.
        format: BlockFormat,
    },
}

impl RowFormat {
    /// Bytes per row in each segment: one for f32, codes and scales for packed rows. A range
    /// of `n` rows is stored as segment 0 of all rows, then segment 1 of all rows.
    pub fn segment_row_bytes(&self) -> Vec<usize> {
        match *self {
            RowFormat::F32 { k } => vec![4 * k],
            RowFormat::Packed {
                padded_k,
                group,
                bits,
                ..
            } => vec![padded_k * bits as usize / 8, 4 * (padded_k / group)],
            RowFormat::Blocks { k, format } => vec![format.bytes_for(k).next_multiple_of(4)],
        }
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        match *self {
            RowFormat::F32 { k } | RowFormat::Packed { k, .. } | RowFormat::Blocks { k, .. } => k,
        }
    }

    /// Bytes per row, all segments.
    pub fn row_bytes(&self) -> usize {
        self.segment_row_bytes().iter().sum()
    }
}

/// Converts rows `rows` of the 2-d `spec` to the run-time layout in `target`: one byte vector
/// per segment. Under `Native`, GGUF blocks stay as they are (repacked losslessly) and f16
/// tensors stay f16 (16-bit codes); f32 and bf16 tensors become f32 rows.
pub fn convert_rows(
    source: &dyn WeightSource,
    spec: &TensorSpec,
    target: WeightFormat,
    rows: Range<usize>,
) -> Result<(RowFormat, Vec<Vec<u8>>)> {
    let info = source
        .info(&spec.name)
        .ok_or_else(|| Error::MissingTensor {
            path: source.path().to_path_buf(),
            name: spec.name.clone(),
        })?;
    if info.shape != spec.shape || spec.shape.len() != 2 {
        return Err(Error::TensorShape {
            path: source.path().to_path_buf(),
            name: spec.name.clone(),
            expected: spec.shape.clone(),
            found: info.shape,
        });
    }
    let (n, k) = (rows.len(), spec.shape[1]);
    let bytes = source.row_bytes(&spec.name, rows)?;
    let packed = |w: PackedWeight| -> (RowFormat, Vec<Vec<u8>>) {
        (
            RowFormat::Packed {
                k: w.k,
                padded_k: w.padded_k,
                group: w.group,
                bits: w.bits,
            },
            vec![
                bytemuck::cast_slice(&w.codes).to_vec(),
                bytemuck::cast_slice(&w.scales).to_vec(),
            ],
        )
    };
    // a block whose scale cannot be represented (a tensor labelled with the wrong type)
    let in_tensor = |e: Error| match e {
        Error::InvalidArgument { reason, .. } => Error::format(
            source.path(),
            format!(
                "tensor `{}` ({}): {reason}; is its type right? (the file may be damaged)",
                spec.name, info.dtype
            ),
        ),
        other => other,
    };
    match (target, info.dtype) {
        (WeightFormat::Native | WeightFormat::Q8, DType::Block(b)) if PackedWeight::repacks(b) => {
            return Ok(packed(
                PackedWeight::from_ggml(b, &bytes, n, k).map_err(in_tensor)?,
            ));
        }
        (WeightFormat::Native | WeightFormat::Q8, DType::Block(format)) => {
            return Ok(as_blocks(format, &bytes, n, k));
        }
        (WeightFormat::Native, DType::F16) => {
            let halves: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            return Ok(packed(PackedWeight::from_f16(&halves, n, k)?));
        }
        _ => {}
    }
    let values = decode_to_f32(info.dtype, &bytes, n * k).ok_or_else(|| {
        Error::format(
            source.path(),
            format!("tensor `{}` rows hold the wrong number of bytes", spec.name),
        )
    })?;
    Ok(match target {
        WeightFormat::Q8 if k % BLOCK_LEN == 0 => packed(PackedWeight::from_ggml(
            BlockFormat::Q8_0,
            &quantize_q8_0(&values),
            n,
            k,
        )?),
        WeightFormat::Group4 => packed(PackedWeight::from_group4(&Group4::quantize(
            &values,
            &[n, k],
            1,
            64,
        )?)?),
        _ => (
            RowFormat::F32 { k },
            vec![bytemuck::cast_slice(&values).to_vec()],
        ),
    })
}

/// `n` rows of `k` values of GGUF blocks `bytes`, each row padded to whole words.
pub(crate) fn as_blocks(
    format: BlockFormat,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> (RowFormat, Vec<Vec<u8>>) {
    let row = RowFormat::Blocks { k, format };
    let (stored, padded) = (format.bytes_for(k), row.row_bytes());
    let mut out = vec![0u8; n * padded];
    for (src, dst) in bytes.chunks_exact(stored).zip(out.chunks_exact_mut(padded)) {
        dst[..stored].copy_from_slice(src);
    }
    (row, vec![out])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::builtin::builtin_config;
    use crate::arch::random::RandomWeights;

    /// Rows of an f16 tensor in every target format: f16 kept as 16-bit codes (exactly the
    /// file's values, in half of f32's bytes plus scales), f32 rows, and the quantized formats.
    #[test]
    fn f16_rows_in_each_format() {
        let config = builtin_config("opt-1.3b").unwrap();
        let source = RandomWeights::new(&config, 3);
        let name = "model.decoder.layers.0.fc1.weight";
        let spec = TensorSpec {
            name: name.into(),
            shape: source.info(name).unwrap().shape,
        };
        let (n, k) = (3, spec.shape[1]);
        let want = decode_to_f32(
            DType::F16,
            &source.row_bytes(name, 5..5 + n).unwrap(),
            n * k,
        )
        .unwrap();
        let (row, segs) = convert_rows(&source, &spec, WeightFormat::Native, 5..5 + n).unwrap();
        let RowFormat::Packed {
            bits: 16,
            padded_k,
            group: 64,
            ..
        } = row
        else {
            panic!("f16 rows under Native became {row:?}");
        };
        assert_eq!(
            row.segment_row_bytes(),
            vec![2 * padded_k, 4 * padded_k / 64]
        );
        let packed = PackedWeight {
            rows: n,
            k,
            padded_k,
            group: 64,
            bits: 16,
            codes: bytemuck::pod_collect_to_vec(&segs[0]),
            scales: bytemuck::pod_collect_to_vec(&segs[1]),
        };
        assert_eq!(packed.dequantize(), want);
        let (row, segs) = convert_rows(&source, &spec, WeightFormat::F32, 5..5 + n).unwrap();
        assert_eq!(row, RowFormat::F32 { k });
        assert_eq!(bytemuck::pod_collect_to_vec::<u8, f32>(&segs[0]), want);
        for format in [WeightFormat::Group4, WeightFormat::Q8] {
            let (row, _) = convert_rows(&source, &spec, format, 0..1).unwrap();
            assert!(
                matches!(row, RowFormat::Packed { bits: 4 | 8, .. }),
                "{format:?}"
            );
        }
    }
}
