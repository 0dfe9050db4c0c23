//! The model's sizes in the run-time layout, read from its files before anything is placed:
//! what the cost model counts and how many panels the output projection streams in.

use crate::error::{Error, Result};
use crate::layout::{convert_rows, output_format, WeightFormat};
use crate::model::llama::LlamaSpec;
use crate::model::opt::OptSpec;
use crate::model::{ModelConfig, ModelFiles, TensorSpec};

/// The output projection's size in the run-time layout for weights in `format` (its own
/// format: `output_format`).
pub(crate) fn output_weight_bytes(files: &ModelFiles, format: WeightFormat) -> Result<u64> {
    let spec = match &files.config {
        ModelConfig::Llama(c) => {
            let s = LlamaSpec::new(c);
            s.lm_head.unwrap_or(s.embed_tokens)
        }
        ModelConfig::Opt(c) => OptSpec::new(c, files.opt_prefix()).embed_tokens,
    };
    let (row, _) = convert_rows(files.weights.as_ref(), &spec, output_format(format), 0..1)?;
    Ok((row.row_bytes() * spec.shape[0]) as u64)
}

/// The size of OPT's `project_in` and `project_out` (between the embedding width and the
/// hidden size) in the run-time layout for weights in `format`; 0 for models without them.
/// They stream with the input and head units, across the tiers like a layer's weights.
pub(crate) fn projection_weight_bytes(files: &ModelFiles, format: WeightFormat) -> Result<u64> {
    let ModelConfig::Opt(c) = &files.config else {
        return Ok(0);
    };
    let spec = OptSpec::new(c, files.opt_prefix());
    [spec.project_in, spec.project_out]
        .iter()
        .flatten()
        .map(|w| {
            let (row, _) = convert_rows(files.weights.as_ref(), w, format, 0..1)?;
            Ok((row.row_bytes() * w.shape[0]) as u64)
        })
        .sum()
}

/// Bytes per value of the first layer's linear weights as the executor holds them in `format`
/// (GGUF blocks as stored, f16 as stored, f32 for f32 and bf16 files, 4-bit groups): what the
/// cost model should count.
pub fn runtime_bytes_per_value(files: &ModelFiles, format: WeightFormat) -> Result<f64> {
    let weights = first_layer_weights(files, format)?;
    let (bytes, values) = weights.iter().fold((0, 0), |(b, v), w| (b + w.0, v + w.1));
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
    let weights = first_layer_weights(files, format)?;
    let (attn, mlp): (u64, u64) = (
        weights[..4].iter().map(|w| w.0).sum(),
        weights[4..].iter().map(|w| w.0).sum(),
    );
    let unit = if sep_layer { attn.max(mlp) } else { attn + mlp };
    Ok(output.div_ceil(unit.max(1)).max(1) as usize)
}

/// `(bytes, values)` of each of the first layer's linear weights in `format`: the
/// attention's four projections, then the MLP's.
fn first_layer_weights(files: &ModelFiles, format: WeightFormat) -> Result<Vec<(u64, usize)>> {
    let specs: Vec<TensorSpec> = match &files.config {
        ModelConfig::Llama(c) => {
            let l = &LlamaSpec::new(c).layers[0];
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
            .map(Clone::clone)
            .to_vec()
        }
        ModelConfig::Opt(c) => {
            let l = &OptSpec::new(c, files.opt_prefix()).layers[0];
            [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2]
                .map(|x| x.weight.clone())
                .to_vec()
        }
    };
    specs
        .iter()
        .map(|spec| {
            let (row, _) = convert_rows(files.weights.as_ref(), spec, format, 0..1)?;
            Ok((
                (row.row_bytes() * spec.shape[0]) as u64,
                spec.shape[0] * spec.shape[1],
            ))
        })
        .collect()
}

/// The embedding table's size as stored (what the CPU keeps for lookups at most).
pub(crate) fn lookup_table_bytes(files: &ModelFiles) -> Result<u64> {
    let name = match &files.config {
        ModelConfig::Llama(c) => LlamaSpec::new(c).embed_tokens.name,
        ModelConfig::Opt(c) => OptSpec::new(c, files.opt_prefix()).embed_tokens.name,
    };
    let source = files.weights.as_ref();
    let info = source.info(&name).ok_or_else(|| Error::MissingTensor {
        path: source.path().to_path_buf(),
        name: name.clone(),
    })?;
    Ok(info.dtype.bytes_for(info.numel()).unwrap_or(0) as u64)
}
