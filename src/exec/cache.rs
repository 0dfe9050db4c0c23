//! The KV cache of a block: each layer's cache per GPU batch, split by sequence over the tiers
//! (GPU rows persist on the device, RAM rows in host memory, disk rows in the block's cache
//! file), loaded into a working cache for a step and its new rows stored back; and attention on
//! the CPU for the RAM- and disk-cached sequences when `cpu_cache_compute` is set.

use super::executor::{lock, BlockState};
use crate::cpu::ops::causal_attention;
use crate::error::{Error, Result};
use crate::gpu::kernels::attention::Attention;
use crate::gpu::model::{GpuRunner, LayerCache, RowBatch};
use crate::gpu::tensor::download_ranges;
use crate::gpu::GpuTensor;
use crate::schedule::{Cell, UnitKind};
use crate::storage::{Reservation, RowSplit, Tier};

/// One layer's cache for one batch: sequences on the GPU keep their rows in `gpu`; the
/// others' rows live in RAM or the cache file and are brought into `working` for a step.
pub(super) struct CacheCell {
    /// Sequences per tier (within the batch, in order).
    pub(super) split: RowSplit,
    pub(super) gpu: Option<LayerCache>,
    /// RAM rows per segment (as words, so they view as f32 without copying).
    pub(super) cpu: Vec<Vec<u32>>,
    /// With attention on the CPU: the disk sequences' rows, read for one decode step.
    pub(super) disk_host: Option<(Vec<Vec<u32>>, Reservation)>,
    pub(super) working: Option<(LayerCache, Option<Reservation>)>,
    pub(super) _held: Vec<Reservation>,
    /// Byte offset of this cell's disk rows in the cache file, per segment.
    pub(super) disk: Vec<u64>,
}

impl BlockState<'_> {
    /// Whether cell `c`'s attention runs on the CPU for the sequences whose cache is not on the
    /// GPU (`cpu_cache_compute`, decode tokens only: the prefill runs on the GPU).
    pub(super) fn delegated(&self, c: Cell, cell: &CacheCell) -> bool {
        self.exec.policy.cpu_cache_compute && c.token > 0 && cell.split.gpu < cell.split.rows()
    }

    /// Decode attention with the GPU sequences' rows on the device cache and the others on all
    /// CPU cores against their RAM (or just-read disk) rows, new keys and values appended where
    /// each sequence's cache lives. Returns `[rows, heads * head_dim]` on the device.
    pub(super) fn cpu_attention(
        &self,
        cell: &mut CacheCell,
        rb: &RowBatch,
        [q, k, v]: [&GpuTensor; 3],
    ) -> Result<GpuTensor> {
        let r = &self.exec.runner;
        let ctx = &r.ctx;
        let layout = r.head_layout();
        let scale = 1.0 / (layout.head_dim as f32).sqrt();
        let (g, cs) = (cell.split.gpu, cell.split.cpu);
        let appends = rb.appends();
        let infos = rb.infos();
        let a = GpuTensor::zeros(ctx, &q.shape)?;
        let qw = q.shape[1];
        if g > 0 {
            // the GPU sequences' rows come first: attend them against the device cache
            let rows = appends[g - 1].0 + appends[g - 1].2;
            let cache = cell
                .gpu
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no GPU cache"))?;
            let head = |t: &GpuTensor| -> Result<GpuTensor> {
                let out = GpuTensor::zeros(ctx, &[rows, t.shape[1]])?;
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                let bytes = (rows * t.shape[1] * 4) as u64;
                enc.copy_buffer_to_buffer(&t.buffer, 0, &out.buffer, 0, bytes);
                ctx.queue.submit([enc.finish()]);
                Ok(out)
            };
            let info = Attention::upload_info(ctx, &infos[..rows]);
            let (qg, kg, vg) = (head(q)?, head(k)?, head(v)?);
            let ag = r.attend_cache(cache, &info, &appends[..g], [&qg, &kg, &vg])?;
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&ag.buffer, 0, &a.buffer, 0, (rows * qw * 4) as u64);
            ctx.queue.submit([enc.finish()]);
        }
        if g == appends.len() {
            return Ok(a);
        }
        let (qh, kh, vh) = (q.download(ctx)?, k.download(ctx)?, v.download(ctx)?);
        let kvw = k.shape[1];
        // each sequence's first cache row, and where the RAM and disk sequences' rows start
        let firsts: Vec<usize> = appends
            .iter()
            .map(|&(row, _, _)| infos[row].first as usize)
            .collect();
        let base_c = firsts.get(g).copied().unwrap_or(0);
        let base_d = firsts.get(g + cs).copied().unwrap_or(0);
        let mut disk = cell.disk_host.take();
        let missing = || Error::invalid("executor", "disk cache rows not loaded");
        // append the new keys and values where each sequence's cache lives
        for (i, &(row, at, n)) in appends.iter().enumerate().skip(g) {
            let (segs, base) = if i < g + cs {
                (&mut cell.cpu, base_c)
            } else {
                (&mut disk.as_mut().ok_or_else(missing)?.0, base_d)
            };
            let dst = (at - base) * kvw;
            let src = row * kvw..(row + n) * kvw;
            segs[0][dst..dst + n * kvw].copy_from_slice(bytemuck::cast_slice(&kh[src.clone()]));
            segs[1][dst..dst + n * kvw].copy_from_slice(bytemuck::cast_slice(&vh[src]));
        }
        let outputs: Vec<Result<Vec<f32>>> = {
            let (cpu, disk) = (&cell.cpu, disk.as_ref());
            let one = |i: usize| -> Result<Vec<f32>> {
                let (row, at, n) = appends[i];
                let (segs, base) = if i < g + cs {
                    (cpu, base_c)
                } else {
                    (&disk.ok_or_else(missing)?.0, base_d)
                };
                let (first, len) = (firsts[i] - base, at + n - firsts[i]);
                let shape_err = |e: ndarray::ShapeError| Error::invalid("executor", e.to_string());
                let span = first * kvw..(first + len) * kvw;
                let kr: &[f32] = bytemuck::cast_slice(&segs[0][span.clone()]);
                let vr: &[f32] = bytemuck::cast_slice(&segs[1][span]);
                let kk = ndarray::ArrayView2::from_shape((len, kvw), kr).map_err(shape_err)?;
                let vv = ndarray::ArrayView2::from_shape((len, kvw), vr).map_err(shape_err)?;
                let qq = ndarray::ArrayView2::from_shape((n, qw), &qh[row * qw..(row + n) * qw])
                    .map_err(shape_err)?;
                let out = causal_attention(qq, kk, vv, len - n, layout, scale);
                Ok(out.iter().copied().collect())
            };
            // the sequences, split over all cores
            let todo: Vec<usize> = (g..appends.len()).collect();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per = todo.len().div_ceil(threads).max(1);
            std::thread::scope(|s| {
                let handles: Vec<_> = todo
                    .chunks(per)
                    .map(|chunk| s.spawn(move || chunk.iter().map(|&i| one(i)).collect::<Vec<_>>()))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| {
                        h.join().unwrap_or_else(|_| {
                            vec![Err(Error::invalid(
                                "executor",
                                "a CPU attention thread panicked",
                            ))]
                        })
                    })
                    .collect()
            })
        };
        cell.disk_host = disk;
        for (i, out) in (g..appends.len()).zip(outputs) {
            let row = appends[i].0;
            ctx.queue.write_buffer(
                &a.buffer,
                (row * qw * 4) as u64,
                bytemuck::cast_slice(&out?),
            );
        }
        Ok(a)
    }

    /// The block's KV-cache file (there is one whenever some cache rows are on disk).
    fn disk_cache(&self) -> Result<&crate::storage::OffloadFile> {
        self.cache_file
            .as_ref()
            .ok_or_else(|| Error::invalid("executor", "no cache file"))
    }

    /// Bytes per cached token in each cache segment.
    fn segment_bytes(&self) -> Vec<usize> {
        let bytes = self.exec.runner.cache_segment_bytes();
        bytes.into_iter().map(|s| s as usize).collect()
    }

    pub(super) fn cache_layer(&self, unit: usize) -> Option<usize> {
        match self.plan.units[unit] {
            UnitKind::Attention(l) | UnitKind::Layer(l) => Some(l),
            _ => None,
        }
    }

    pub(super) fn load_cache(&self, c: Cell) -> Result<()> {
        let Some(layer) = self.cache_layer(c.unit) else {
            return Ok(());
        };
        let exec = self.exec;
        let r = &exec.runner;
        let (seq_rows, total) = {
            let b = lock(&self.batches[c.batch]);
            (b.cache_rows(c.token), b.capacity.iter().sum::<usize>())
        };
        let mut cell = lock(&self.caches[layer][c.batch]);
        if cell.split.gpu == cell.split.rows() {
            return Ok(()); // the persistent cache is the working cache
        }
        if self.delegated(c, &cell) {
            return self.load_disk_rows_to_host(&mut cell, &seq_rows, total);
        }
        let held = exec.ledger.reserve(
            Tier::Gpu,
            total as u64 * r.cache_bytes_per_row(),
            "KV cache being computed",
        )?;
        let working = r.layer_cache(total)?;
        let (gs, cs) = (cell.split.gpu, cell.split.cpu);
        // GPU sequences 0..gs sit at the same rows in both caches
        if let Some(g) = &cell.gpu {
            let rows: Vec<(usize, usize)> =
                seq_rows[..gs].iter().map(|&(f, b, _)| (f, b)).collect();
            copy_cache_rows(r, g, &working, &rows);
        }
        let segs = working.segments();
        // RAM rows: sequences gs..gs+cs, stored from the first of them
        let base_c = seq_rows.get(gs).map_or(0, |s| s.0);
        for (i, (dst, s)) in segs.iter().enumerate() {
            for &(first, before, _) in &seq_rows[gs..gs + cs] {
                let at = (first - base_c) * *s as usize;
                let bytes: &[u8] = bytemuck::cast_slice(&cell.cpu[i]);
                let bytes = &bytes[at..at + before * *s as usize];
                if !bytes.is_empty() {
                    r.ctx.queue.write_buffer(dst, first as u64 * s, bytes);
                }
            }
        }
        // disk rows: the rest, from the cache file
        let base_d = seq_rows.get(gs + cs).map_or(0, |s| s.0);
        if cell.split.disk > 0 {
            let file = self.disk_cache()?;
            exec.staging.with(|staging| {
                for (i, (dst, s)) in segs.iter().enumerate() {
                    for &(first, before, _) in &seq_rows[gs + cs..] {
                        let mut bytes = vec![0u8; before * *s as usize];
                        file.read_into(
                            cell.disk[i] + ((first - base_d) as u64 * s),
                            &mut bytes,
                            staging,
                        )?;
                        if !bytes.is_empty() {
                            r.ctx.queue.write_buffer(dst, first as u64 * s, &bytes);
                        }
                    }
                }
                Ok(())
            })?;
        }
        cell.working = Some((working, Some(held)));
        Ok(())
    }

    /// With attention on the CPU: the disk sequences' cached rows into RAM for this step.
    pub(super) fn load_disk_rows_to_host(
        &self,
        cell: &mut CacheCell,
        seq_rows: &[(usize, usize, usize)],
        total: usize,
    ) -> Result<()> {
        let exec = self.exec;
        let first_disk = cell.split.gpu + cell.split.cpu;
        if cell.split.disk == 0 {
            return Ok(());
        }
        let seg_bytes: Vec<usize> = self.segment_bytes();
        // rows from the first disk sequence's first row to the end of the batch's cache
        let base = seq_rows[first_disk].0;
        let rows = total - base;
        let held = exec.ledger.reserve(
            Tier::Cpu,
            (rows * seg_bytes.iter().sum::<usize>()) as u64,
            "KV cache read for CPU attention",
        )?;
        let file = self.disk_cache()?;
        let mut segs: Vec<Vec<u32>> = seg_bytes
            .iter()
            .map(|&s| vec![0u32; rows * s / 4])
            .collect();
        exec.staging.with(|staging| {
            for (i, &s) in seg_bytes.iter().enumerate() {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut segs[i]);
                for &(first, before, _) in &seq_rows[first_disk..] {
                    let at = (first - base) * s;
                    file.read_into(
                        cell.disk[i] + at as u64,
                        &mut bytes[at..at + before * s],
                        staging,
                    )?;
                }
            }
            Ok(())
        })?;
        cell.disk_host = Some((segs, held));
        Ok(())
    }

    pub(super) fn store_cache(&self, c: Cell) -> Result<()> {
        let Some(layer) = self.cache_layer(c.unit) else {
            return Ok(());
        };
        let exec = self.exec;
        let r = &exec.runner;
        let rows = lock(&self.batches[c.batch]).cache_rows(c.token);
        let mut cell = lock(&self.caches[layer][c.batch]);
        if self.delegated(c, &cell) {
            // RAM rows were appended in place; the disk sequences' new rows go to the file
            let Some((segs, _held)) = cell.disk_host.take() else {
                return Ok(());
            };
            let first_disk = cell.split.gpu + cell.split.cpu;
            let base = rows[first_disk].0;
            let file = self.disk_cache()?;
            let seg_bytes: Vec<usize> = self.segment_bytes();
            return exec.staging.with(|staging| {
                for (i, seg) in segs.iter().enumerate() {
                    let s = seg_bytes[i];
                    let bytes: &[u8] = bytemuck::cast_slice(seg);
                    for &(first, from, n) in &rows[first_disk..] {
                        let at = (first - base + from) * s;
                        file.write_at(cell.disk[i] + at as u64, &bytes[at..at + n * s], staging)?;
                    }
                }
                Ok(())
            });
        }

        let [gs, cs, _] = [cell.split.gpu, cell.split.cpu, cell.split.disk];
        if gs == cell.split.rows() {
            return Ok(());
        }
        let Some((working, held)) = cell.working.take() else {
            return Err(Error::invalid("executor", "no cache rows to store"));
        };
        if let Some(g) = &cell.gpu {
            let new: Vec<(usize, usize)> = rows[..gs]
                .iter()
                .map(|&(f, from, n)| (f + from, n))
                .collect();
            copy_cache_rows(r, &working, g, &new);
        }
        let segs = working.segments();
        let base_c = rows.get(gs).map_or(0, |s| s.0);
        let base_d = rows.get(gs + cs).map_or(0, |s| s.0);
        // the new rows of the RAM and disk sequences: (segment, sequence, offset, bytes)
        let ranges: Vec<(usize, usize, u64, u64)> = segs
            .iter()
            .enumerate()
            .flat_map(|(i, &(_, s))| {
                rows[gs..]
                    .iter()
                    .enumerate()
                    .map(move |(j, &(first, from, n))| {
                        (i, gs + j, (first + from) as u64 * s, n as u64 * s)
                    })
            })
            .filter(|r| r.3 > 0)
            .collect();
        let wanted: Vec<(&wgpu::Buffer, u64, u64)> = ranges
            .iter()
            .map(|&(i, _, at, len)| (segs[i].0, at, len))
            .collect();
        let host = download_ranges(&r.ctx, &wanted)?;
        for ((i, seq, _, _), bytes) in ranges.iter().zip(host) {
            let (first, from, _) = rows[*seq];
            let s = segs[*i].1 as usize;
            if *seq < gs + cs {
                let at = (first - base_c + from) * s;
                let words: &mut [u8] = bytemuck::cast_slice_mut(&mut cell.cpu[*i]);
                words[at..at + bytes.len()].copy_from_slice(&bytes);
            } else {
                let file = self.disk_cache()?;
                let at = cell.disk[*i] + ((first - base_d + from) * s) as u64;
                exec.staging.with(|st| file.write_at(at, &bytes, st))?;
            }
        }
        drop(held);
        drop(working);
        Ok(())
    }
}

/// Copies rows `(first, count)` of every segment of `src` to the same rows of `dst` (two
/// caches of one layout).
fn copy_cache_rows(r: &GpuRunner, src: &LayerCache, dst: &LayerCache, rows: &[(usize, usize)]) {
    let mut enc = r.ctx.device.create_command_encoder(&Default::default());
    for ((from, s), (to, _)) in src.segments().into_iter().zip(dst.segments()) {
        for &(first, count) in rows {
            let at = first as u64 * s;
            enc.copy_buffer_to_buffer(from, at, to, at, count as u64 * s);
        }
    }
    r.ctx.queue.submit([enc.finish()]);
}
