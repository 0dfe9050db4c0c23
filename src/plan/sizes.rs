//! The model's sizes in the run-time layout, read from its files before anything is placed:
//! what the cost model counts and how many panels the output projection streams in.

use crate::arch::{ModelConfig, ModelFiles, PartSpec};
use crate::error::{Error, Result};
use crate::layout::{convert_rows, output_format, WeightFormat};
use crate::model::TensorSpec;

/// The size of `spec` in the run-time layout for weights in `format`.
fn runtime_bytes(files: &ModelFiles, spec: &TensorSpec, format: WeightFormat) -> Result<u64> {
    let (row, _) = convert_rows(files.weights.as_ref(), spec, format, 0..1)?;
    Ok((row.row_bytes() * spec.shape[0]) as u64)
}

/// The output projection's size in the run-time layout for weights in `format` (its own
/// format: `output_format`).
pub(crate) fn output_weight_bytes(files: &ModelFiles, format: WeightFormat) -> Result<u64> {
    runtime_bytes(files, &files.parts().output, output_format(format))
}

/// The size of the input's and the head's linear weights (OPT's `project_in` and
/// `project_out`, between the embedding width and the hidden size) in the run-time layout for
/// weights in `format`; 0 for models without them. They stream with the input and head
/// units, across the tiers like a layer's weights.
pub(crate) fn projection_weight_bytes(files: &ModelFiles, format: WeightFormat) -> Result<u64> {
    let parts = files.parts();
    parts
        .input
        .weights()
        .chain(parts.head.weights())
        .map(|w| runtime_bytes(files, w, format))
        .sum()
}

/// Bytes per value of the first layer's linear weights as the executor holds them in `format`
/// (GGUF blocks as stored, f16 as stored, f32 for f32 and bf16 files, 4-bit groups): what the
/// cost model should count.
pub fn runtime_bytes_per_value(files: &ModelFiles, format: WeightFormat) -> Result<f64> {
    let [attn, mlp] = first_layer_weights(files, format)?;
    let (bytes, values) = attn
        .iter()
        .chain(&mlp)
        .fold((0, 0), |(b, v), w| (b + w.0, v + w.1));
    Ok(bytes as f64 / values.max(1) as f64)
}

/// Panels the output projection streams in under `format`: as many as keep each panel no
/// larger than the largest other unit's linear weights (a layer, or with `sep_layer` its
/// attention or MLP half), so that no unit's streamed weights (and so no weight slot)
/// outgrow the layers'.
pub(crate) fn logit_panel_count(
    files: &ModelFiles,
    format: WeightFormat,
    sep_layer: bool,
) -> Result<usize> {
    let output = output_weight_bytes(files, format)?;
    let [attn, mlp]: [u64; 2] =
        first_layer_weights(files, format)?.map(|w| w.iter().map(|w| w.0).sum());
    let unit = if sep_layer { attn.max(mlp) } else { attn + mlp };
    Ok(output.div_ceil(unit.max(1)).max(1) as usize)
}

/// `(bytes, values)` of each of the first layer's linear weights in `format`: the
/// attention half's, then the MLP half's.
fn first_layer_weights(files: &ModelFiles, format: WeightFormat) -> Result<[Vec<(u64, usize)>; 2]> {
    let parts = files.parts();
    let layer = parts
        .layers
        .first()
        .ok_or_else(|| Error::invalid("model", "no decoder layers"))?;
    let sizes = |part: &PartSpec| {
        part.weights()
            .map(|w| Ok((runtime_bytes(files, w, format)?, w.shape.iter().product())))
            .collect::<Result<Vec<_>>>()
    };
    Ok([sizes(&layer[0])?, sizes(&layer[1])?])
}

/// The embedding table's size as stored (what the CPU keeps for lookups at most).
pub(crate) fn lookup_table_bytes(files: &ModelFiles) -> Result<u64> {
    let name = files.parts().embedding.name;
    let source = files.weights.as_ref();
    let info = source.info(&name).ok_or_else(|| Error::MissingTensor {
        path: source.path().to_path_buf(),
        name: name.clone(),
    })?;
    Ok(info.dtype.bytes_for(info.numel()).unwrap_or(0) as u64)
}

/// Bytes of the intermediate tensors of `rows` rows computed at once, at the widest unit,
/// plus one chunk of `logit_rows` rows of `logit_width` logits (the whole vocabulary, or the
/// panel a device reduces at once): per row, the chunk's copy of its input and its output,
/// the normalized input, q, k, v, the attention output and projection (hidden and kv widths),
/// and the MLP's two intermediate tensors,
/// `4 * rows * (8 h + 2 kv + 2 ffn) + 4 * logit_rows * logit_width`.
pub(crate) fn workspace_bytes(
    config: &ModelConfig,
    rows: usize,
    logit_rows: usize,
    logit_width: usize,
) -> u64 {
    let per_row = 8 * config.hidden_size() + 2 * config.kv_width() + 2 * config.intermediate_size();
    ((rows * per_row + logit_rows * logit_width) * 4) as u64
}
