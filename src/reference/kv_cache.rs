//! The reference's per-sequence KV cache: for every layer, the keys and values of every position
//! seen so far, as row-major `[len, kv_width]` matrices that grow by appending rows.

use ndarray::{ArrayView2, Axis};

use crate::error::{Error, Result};

/// Keys and values of one layer.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The KV cache of one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    width: usize,
    /// Positions cached in every layer (layers catch up during a forward pass).
    len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers whose key rows are `width` wide.
    pub fn new(layers: usize, width: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); layers],
            width,
            len: 0,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (f32 keys and values of every layer).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 4)
            .sum()
    }

    /// Appends rows to `layer`'s keys and values and returns views of all its rows.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: ArrayView2<f32>,
        v: ArrayView2<f32>,
    ) -> (ArrayView2<'_, f32>, ArrayView2<'_, f32>) {
        let width = self.width;
        let kv = &mut self.layers[layer];
        for (dst, src) in [(&mut kv.k, k), (&mut kv.v, v)] {
            for row in src.axis_iter(Axis(0)) {
                dst.extend(row.iter());
            }
        }
        let rows = kv.k.len() / width;
        (rows_view(&kv.k, rows, width), rows_view(&kv.v, rows, width))
    }

    /// Marks `added` positions as cached in every layer (called after a forward pass).
    pub(crate) fn advance(&mut self, added: usize) {
        self.len += added;
    }
}

fn rows_view(data: &[f32], rows: usize, width: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, width), data).expect("cache rows are whole")
}

/// A ragged batch: each sequence's new tokens, stacked as rows of one matrix.
pub(crate) struct RaggedBatch {
    /// Row offsets of each sequence's new tokens; `starts[i]..starts[i + 1]`.
    starts: Vec<usize>,
    /// Positions already cached for each sequence.
    pub past: Vec<usize>,
}

impl RaggedBatch {
    /// Checks the tokens against the vocabulary and the context, and lays them out.
    pub fn new(
        batch: &[&[u32]],
        caches: &[KvCache],
        vocab_size: usize,
        max_context: usize,
    ) -> Result<Self> {
        if batch.len() != caches.len() {
            return Err(Error::invalid(
                "caches",
                format!("{} caches for {} sequences", caches.len(), batch.len()),
            ));
        }
        let mut starts = vec![0];
        for (tokens, cache) in batch.iter().zip(caches) {
            if tokens.is_empty() {
                return Err(Error::SequenceTooShort {
                    len: 0,
                    needed: 1,
                    what: "run the model",
                });
            }
            if let Some((position, &token)) = tokens
                .iter()
                .enumerate()
                .find(|(_, &t)| t as usize >= vocab_size)
            {
                return Err(Error::TokenOutOfRange {
                    token,
                    position: cache.len() + position,
                    vocab_size,
                });
            }
            let len = cache.len() + tokens.len();
            if len > max_context {
                return Err(Error::SequenceTooLong {
                    len,
                    max: max_context,
                });
            }
            starts.push(starts.last().copied().unwrap_or(0) + tokens.len());
        }
        Ok(Self {
            starts,
            past: caches.iter().map(KvCache::len).collect(),
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.past.len()
    }

    /// Rows of sequence `i`.
    pub fn rows(&self, i: usize) -> std::ops::Range<usize> {
        self.starts[i]..self.starts[i + 1]
    }

    /// Total rows.
    pub fn total_rows(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The absolute position of every row.
    pub fn positions(&self) -> Vec<usize> {
        (0..self.len())
            .flat_map(|i| {
                let rows = self.rows(i);
                (self.past[i]..self.past[i] + rows.len()).collect::<Vec<_>>()
            })
            .collect()
    }
}
