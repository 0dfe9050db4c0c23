//! [`WgpuDevice`]: the [`Device`] trait on WebGPU, one kernel per operation.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::kernels::attention::{Attention, RowInfos};
use super::kernels::elementwise::{Elementwise, Op};
use super::kernels::embedding::Embedding;
use super::kernels::kv_f16::{GpuF16Cache, KvF16};
use super::kernels::kv_quant::{GpuQ4Cache, KvQuant};
use super::kernels::logprob::Logprob;
use super::kernels::matmul::MatmulF32;
use super::kernels::matmul_blocks::{GpuBlockWeight, MatmulBlocks};
use super::kernels::matmul_q::{GpuPackedWeight, MatmulQ};
use super::kernels::norm::Norm;
use super::kernels::rope::Rope;
use super::tensor::download_ranges;
use super::{GpuContext, GpuIndices, GpuTensor};
use crate::device::{expect, CacheFormat, Device, HostRows, LogitState};
use crate::error::{Error, Result};
use crate::layout::{HeadLayout, PackedWeight, RowFormat};

/// One row range of a linear weight on the device.
#[derive(Clone)]
pub enum WeightPart {
    /// f32 rows.
    F32(GpuTensor),
    /// Packed codes and scales.
    Packed(GpuPackedWeight),
    /// GGUF blocks as stored.
    Blocks(GpuBlockWeight),
}

impl WeightPart {
    /// The device part for `rows` rows of `format` held in `buffers` (one per segment): the
    /// wgpu side of the run-time layout ([`RowFormat`]).
    fn from_buffers(
        format: RowFormat,
        rows: usize,
        mut buffers: Vec<wgpu::Buffer>,
    ) -> Result<Self> {
        Ok(match format {
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
            RowFormat::Blocks { k, format } => WeightPart::Blocks(GpuBlockWeight {
                words: buffers.remove(0),
                rows,
                k,
                format,
            }),
        })
    }
}

/// Keys and values of one layer for a set of sequences: f32 rows, f16 rows or 4-bit groups.
pub enum LayerCache {
    /// `[rows, kv width]` keys, then values.
    F32(GpuTensor, GpuTensor),
    /// f16 keys, then values.
    F16(GpuF16Cache, GpuF16Cache),
    /// 4-bit keys, then values.
    Q4(GpuQ4Cache, GpuQ4Cache),
}

impl LayerCache {
    /// The buffers holding the rows, with bytes per row, in [`CacheFormat::segment_bytes`]'s
    /// order.
    fn segments(&self) -> Vec<(&wgpu::Buffer, u64)> {
        match self {
            LayerCache::F32(k, v) => {
                let w = (k.shape[1] * 4) as u64;
                vec![(&k.buffer, w), (&v.buffer, w)]
            }
            LayerCache::F16(k, v) => {
                let w = (GpuF16Cache::row_words(k.width) * 4) as u64;
                vec![(k.words(), w), (v.words(), w)]
            }
            LayerCache::Q4(k, v) => {
                let (c, s) = (
                    (k.layout.words_per_row() * 4) as u64,
                    (k.layout.groups_per_row() * 4) as u64,
                );
                vec![
                    (k.codes(), c),
                    (k.scales(), s),
                    (v.codes(), c),
                    (v.scales(), s),
                ]
            }
        }
    }
}

/// Per-row data on the device: attention infos and RoPE tables.
pub struct GpuRows {
    info: RowInfos,
    rope: Option<(GpuTensor, GpuTensor)>,
}

/// Attention kernels compiled for one head width, one per cache format.
#[derive(Clone)]
struct AttentionKernels {
    head_dim: usize,
    f32: Arc<Attention>,
    q4: Arc<KvQuant>,
    f16: Arc<KvF16>,
}

/// The compiled kernels; attention per head width, compiled on first use.
struct Kernels {
    matmul: MatmulF32,
    matmul_q: MatmulQ,
    matmul_blocks: MatmulBlocks,
    elementwise: Elementwise,
    norm: Norm,
    embedding: Embedding,
    rope: Rope,
    logprob: Logprob,
    attention: Mutex<Vec<AttentionKernels>>,
}

/// WebGPU as a [`Device`] (cloning shares the device).
#[derive(Clone)]
pub struct WgpuDevice {
    inner: Arc<(GpuContext, Kernels)>,
}

const WEIGHT_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

impl WgpuDevice {
    /// Compiles the kernels on `ctx`.
    pub fn new(ctx: GpuContext) -> Result<Self> {
        let kernels = Kernels {
            matmul: MatmulF32::new(&ctx),
            matmul_q: MatmulQ::new(&ctx),
            matmul_blocks: MatmulBlocks::default(),
            elementwise: Elementwise::new(&ctx)?,
            norm: Norm::new(&ctx),
            embedding: Embedding::new(&ctx),
            rope: Rope::new(&ctx),
            logprob: Logprob::new(&ctx),
            attention: Mutex::new(Vec::new()),
        };
        // a kernel the device refused to compile is an error here, before any work
        ctx.check()?;
        Ok(Self {
            inner: Arc::new((ctx, kernels)),
        })
    }

    /// The WebGPU context.
    pub fn context(&self) -> &GpuContext {
        &self.inner.0
    }

    fn k(&self) -> &Kernels {
        &self.inner.1
    }

    /// The attention kernels for heads of `head_dim` (compiled once per width).
    fn attention(&self, head_dim: usize) -> Result<AttentionKernels> {
        if head_dim > super::kernels::attention::MAX_HEAD_DIM {
            return Err(Error::Unsupported {
                what: format!("head_dim {head_dim} on the wgpu backend"),
            });
        }
        let mut compiled = self.k().attention.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kernels) = compiled.iter().find(|c| c.head_dim == head_dim) {
            return Ok(kernels.clone());
        }
        let ctx = self.context();
        let kernels = AttentionKernels {
            head_dim,
            f32: Arc::new(Attention::new(ctx, head_dim)?),
            q4: Arc::new(KvQuant::new(ctx, head_dim)?),
            f16: Arc::new(KvF16::new(ctx, head_dim)?),
        };
        compiled.push(kernels.clone());
        Ok(kernels)
    }

    fn same_shape(a: &GpuTensor, b: &GpuTensor, op: &str) -> Result<()> {
        expect(a.numel() == b.numel(), op, || {
            format!("shapes {:?} and {:?}", a.shape, b.shape)
        })
    }
}

impl Device for WgpuDevice {
    type Tensor = GpuTensor;
    type Part = WeightPart;
    type Buffer = wgpu::Buffer;
    type Cache = LayerCache;
    type Rows = GpuRows;

    fn describe(&self) -> String {
        format!("wgpu: {}", self.context().describe())
    }

    fn is_host(&self) -> bool {
        false
    }

    fn max_buffer_bytes(&self) -> u64 {
        self.context().max_binding_bytes()
    }

    fn upload(&self, data: &[f32], rows: usize, width: usize) -> Result<GpuTensor> {
        GpuTensor::upload(self.context(), data, &[rows, width])
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<GpuTensor> {
        GpuTensor::zeros(self.context(), &[rows, width])
    }

    fn dims(&self, t: &GpuTensor) -> [usize; 2] {
        match t.shape[..] {
            [r, w] => [r, w],
            _ => [1, t.numel()],
        }
    }

    fn reshape(&self, t: &GpuTensor, rows: usize, width: usize) -> Result<GpuTensor> {
        expect(rows * width == t.numel(), "reshape", || {
            format!("{:?} as [{rows}, {width}]", t.shape)
        })?;
        Ok(GpuTensor {
            buffer: t.buffer.clone(),
            shape: vec![rows, width],
        })
    }

    fn download(&self, t: &GpuTensor, rows: Range<usize>) -> Result<Vec<f32>> {
        let row = (self.dims(t)[1] * 4) as u64;
        let bytes = download_ranges(
            self.context(),
            &[(&t.buffer, rows.start as u64 * row, rows.len() as u64 * row)],
        )?;
        Ok(bytemuck::pod_collect_to_vec(&bytes[0]))
    }

    fn write_rows(&self, t: &GpuTensor, at: usize, data: &[f32]) -> Result<()> {
        let row = (self.dims(t)[1] * 4) as u64;
        if !data.is_empty() {
            self.context().queue.write_buffer(
                &t.buffer,
                at as u64 * row,
                bytemuck::cast_slice(data),
            );
        }
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &GpuTensor,
        rows: Range<usize>,
        dst: &GpuTensor,
        at: usize,
    ) -> Result<()> {
        let width = self.dims(src)[1];
        expect(self.dims(dst)[1] == width, "copy rows", || {
            format!("widths {:?} and {:?}", src.shape, dst.shape)
        })?;
        let row = (width * 4) as u64;
        if rows.is_empty() {
            return Ok(());
        }
        let ctx = self.context();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(
            &src.buffer,
            rows.start as u64 * row,
            &dst.buffer,
            at as u64 * row,
            rows.len() as u64 * row,
        );
        ctx.queue.submit([enc.finish()]);
        Ok(())
    }

    fn buffer(&self, bytes: u64) -> Result<wgpu::Buffer> {
        expect(bytes <= self.max_buffer_bytes(), "weights", || {
            format!(
                "{bytes} bytes exceed the adapter's {}-byte storage binding",
                self.max_buffer_bytes()
            )
        })?;
        let ctx = self.context();
        ctx.scoped(&format!("allocating {bytes} bytes of weights"), || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("weights"),
                size: bytes.max(4),
                usage: WEIGHT_USAGE,
                mapped_at_creation: false,
            })
        })
    }

    fn write_buffer(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) -> Result<()> {
        self.context().queue.write_buffer(buffer, offset, bytes);
        Ok(())
    }

    fn part(
        &self,
        format: RowFormat,
        rows: usize,
        segments: Vec<wgpu::Buffer>,
    ) -> Result<WeightPart> {
        // hand the staged writes to the device so they do not pile up
        self.context().queue.submit([]);
        WeightPart::from_buffers(format, rows, segments)
    }

    fn rows(&self, rows: &HostRows) -> Result<GpuRows> {
        let ctx = self.context();
        let n = rows.ids.len();
        let rope = match &rows.rope {
            Some((cos, sin)) => {
                let half = cos.len() / n.max(1);
                Some((
                    GpuTensor::upload(ctx, cos, &[n, half])?,
                    GpuTensor::upload(ctx, sin, &[n, half])?,
                ))
            }
            None => None,
        };
        Ok(GpuRows {
            info: RowInfos::upload(ctx, &rows.infos).soft_capped(rows.softcap),
            rope,
        })
    }

    fn linear(
        &self,
        x: &GpuTensor,
        parts: &[(WeightPart, usize)],
        out: usize,
    ) -> Result<GpuTensor> {
        let ctx = self.context();
        let y = GpuTensor::zeros(ctx, &[self.dims(x)[0], out])?;
        for (part, offset) in parts {
            match part {
                WeightPart::F32(w) => self.k().matmul.run(ctx, x, w, &y, *offset)?,
                WeightPart::Packed(w) => self.k().matmul_q.run(ctx, x, w, &y, *offset)?,
                WeightPart::Blocks(w) => self.k().matmul_blocks.run(ctx, x, w, &y, *offset)?,
            }
        }
        Ok(y)
    }

    fn add_bias(&self, y: &GpuTensor, bias: &GpuTensor) -> Result<()> {
        self.k()
            .elementwise
            .binary(self.context(), Op::AddBias, y, bias)
    }

    fn rms_norm(&self, x: &GpuTensor, w: &GpuTensor, eps: f32) -> Result<GpuTensor> {
        let y = GpuTensor::zeros(self.context(), &x.shape)?;
        self.k().norm.rms_norm(self.context(), x, w, &y, eps)?;
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        b: &GpuTensor,
        eps: f32,
    ) -> Result<GpuTensor> {
        let y = GpuTensor::zeros(self.context(), &x.shape)?;
        self.k().norm.layer_norm(self.context(), x, w, b, &y, eps)?;
        Ok(y)
    }

    fn add(&self, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        Self::same_shape(x, y, "add")?;
        self.k().elementwise.binary(self.context(), Op::Add, x, y)
    }

    fn silu_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> Result<()> {
        Self::same_shape(gate, up, "silu_mul")?;
        self.k()
            .elementwise
            .binary(self.context(), Op::SiluMul, gate, up)
    }

    fn gelu_tanh_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> Result<()> {
        Self::same_shape(gate, up, "gelu_tanh_mul")?;
        self.k()
            .elementwise
            .binary(self.context(), Op::GeluTanhMul, gate, up)
    }

    fn scale(&self, x: &GpuTensor, s: f32) -> Result<()> {
        self.k().elementwise.scale(self.context(), x, s)
    }

    fn relu(&self, x: &GpuTensor) -> Result<()> {
        self.k().elementwise.unary(self.context(), Op::Relu, x)
    }

    fn rope(&self, x: &GpuTensor, rows: &GpuRows, head_dim: usize) -> Result<()> {
        let (cos, sin) = rows
            .rope
            .as_ref()
            .ok_or_else(|| Error::invalid("rope", "rows without RoPE tables"))?;
        self.k().rope.run(self.context(), x, cos, sin, head_dim)
    }

    fn gather(&self, table: &GpuTensor, ids: &[u32]) -> Result<GpuTensor> {
        let [rows, width] = self.dims(table);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(Error::invalid(
                "gather",
                format!("row {bad} of a {rows}-row table"),
            ));
        }
        let ctx = self.context();
        let y = GpuTensor::zeros(ctx, &[ids.len(), width])?;
        let ids = GpuIndices::upload(ctx, ids);
        self.k().embedding.run(ctx, table, None, &ids, &ids, &y)?;
        Ok(y)
    }

    fn fold_logits(
        &self,
        x: &GpuTensor,
        parts: &[(Self::Part, usize)],
        cols: Range<usize>,
        targets: Option<&[u32]>,
        softcap: Option<f32>,
        states: &mut [LogitState],
    ) -> Result<()> {
        let rows = self.dims(x)[0];
        if states.len() != rows || targets.is_some_and(|t| t.len() != rows) {
            return Err(Error::invalid("logits", "one state and target per row"));
        }
        if parts.iter().any(|(_, c)| *c < cols.start) {
            return Err(Error::invalid(
                "logits",
                "a part before the panel's columns",
            ));
        }
        // the panel's logits, its parts' first columns made relative to it
        let rebased: Vec<(Self::Part, usize)> = parts
            .iter()
            .map(|(p, c)| (p.clone(), c - cols.start))
            .collect();
        let logits = self.linear(x, &rebased, cols.len())?;
        let ctx = self.context();
        if let Some(cap) = softcap {
            self.k().elementwise.soft_cap(ctx, &logits, cap)?;
        }
        let relative: Vec<u32> = (0..rows)
            .map(|r| {
                targets
                    .map(|t| t[r] as usize)
                    .filter(|t| cols.contains(t))
                    .map_or(u32::MAX, |t| (t - cols.start) as u32)
            })
            .collect();
        let t = GpuIndices::upload(ctx, &relative);
        let out = GpuTensor::zeros(ctx, &[rows * 4])?;
        self.k().logprob.partials(ctx, &logits, &t, &out)?;
        let p = out.download(ctx)?;
        for (st, v) in states.iter_mut().zip(p.chunks_exact(4)) {
            st.merge(&LogitState {
                max: v[0],
                sum: f64::from(v[1]),
                target: v[2],
                best: ((cols.start as u32).saturating_add(v[3].to_bits()), v[0]),
            });
        }
        Ok(())
    }

    fn cache(&self, format: CacheFormat, rows: usize) -> Result<LayerCache> {
        let ctx = self.context();
        Ok(match format {
            CacheFormat::F32 { width } => LayerCache::F32(
                GpuTensor::zeros(ctx, &[rows, width])?,
                GpuTensor::zeros(ctx, &[rows, width])?,
            ),
            CacheFormat::Q4(l) => LayerCache::Q4(
                GpuQ4Cache::new(ctx, rows, l)?,
                GpuQ4Cache::new(ctx, rows, l)?,
            ),
            CacheFormat::F16 { width } => LayerCache::F16(
                GpuF16Cache::new(ctx, rows, width)?,
                GpuF16Cache::new(ctx, rows, width)?,
            ),
        })
    }

    fn attend(
        &self,
        cache: &LayerCache,
        rows: &GpuRows,
        appends: &[(usize, usize, usize)],
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        layout: HeadLayout,
    ) -> Result<GpuTensor> {
        let ctx = self.context();
        let kernels = self.attention(layout.head_dim)?;
        let a = GpuTensor::zeros(ctx, &q.shape)?;
        let scale = 1.0 / (layout.head_dim as f32).sqrt();
        match cache {
            LayerCache::F32(kc, vc) => {
                let row_bytes = (kc.shape[1] * 4) as u64;
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                for &(src, dst, n) in appends {
                    let (src, dst, n) = (
                        src as u64 * row_bytes,
                        dst as u64 * row_bytes,
                        n as u64 * row_bytes,
                    );
                    enc.copy_buffer_to_buffer(&k.buffer, src, &kc.buffer, dst, n);
                    enc.copy_buffer_to_buffer(&v.buffer, src, &vc.buffer, dst, n);
                }
                ctx.queue.submit([enc.finish()]);
                kernels
                    .f32
                    .run(ctx, q, kc, vc, &rows.info, &a, layout, scale)?;
            }
            LayerCache::Q4(kc, vc) => {
                // the rows' info names their own cache positions: quantize them there
                kernels.q4.store(ctx, k, &rows.info, kc)?;
                kernels.q4.store(ctx, v, &rows.info, vc)?;
                kernels
                    .q4
                    .attend(ctx, q, kc, vc, &rows.info, &a, layout, scale)?;
            }
            LayerCache::F16(kc, vc) => {
                // as the 4-bit cache: the rows' info names their own cache positions
                kernels.f16.store(ctx, k, &rows.info, kc)?;
                kernels.f16.store(ctx, v, &rows.info, vc)?;
                kernels
                    .f16
                    .attend(ctx, q, kc, vc, &rows.info, &a, layout, scale)?;
            }
        }
        Ok(a)
    }

    fn copy_cache_rows(
        &self,
        src: &LayerCache,
        dst: &LayerCache,
        rows: &[(usize, usize)],
    ) -> Result<()> {
        let ctx = self.context();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for ((from, s), (to, _)) in src.segments().into_iter().zip(dst.segments()) {
            for &(first, count) in rows {
                let at = first as u64 * s;
                enc.copy_buffer_to_buffer(from, at, to, at, count as u64 * s);
            }
        }
        ctx.queue.submit([enc.finish()]);
        Ok(())
    }

    fn write_cache(
        &self,
        cache: &LayerCache,
        segment: usize,
        offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let segs = cache.segments();
        let (buffer, _) = segs
            .get(segment)
            .ok_or_else(|| Error::invalid("KV cache", format!("no segment {segment}")))?;
        if !bytes.is_empty() {
            self.context().queue.write_buffer(buffer, offset, bytes);
        }
        Ok(())
    }

    fn read_cache(&self, cache: &LayerCache, ranges: &[(usize, u64, u64)]) -> Result<Vec<Vec<u8>>> {
        let segs = cache.segments();
        let ranges = ranges
            .iter()
            .map(|&(seg, offset, len)| {
                segs.get(seg)
                    .map(|(b, _)| (*b, offset, len))
                    .ok_or_else(|| Error::invalid("KV cache", format!("no segment {seg}")))
            })
            .collect::<Result<Vec<_>>>()?;
        download_ranges(self.context(), &ranges)
    }

    fn wait(&self) -> Result<()> {
        self.context().wait()
    }
}
