//! The KV cache of a block: each layer's cache per GPU batch, split by sequence over the tiers
//! (GPU rows persist on the device, RAM rows in host memory, disk rows in the block's cache
//! file), loaded into a working cache for a step and its new rows stored back; and attention on
//! the CPU for the RAM- and disk-cached sequences when `cpu_cache_compute` is set.

use std::ops::Range;

use super::state::{lock, BlockState, CacheCell};
use crate::arch::RowBatch;
use crate::device::cpu::attention::{attend as cpu_attend, KvView};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::CACHE_MERGE_GAP_BYTES as MERGE_GAP_BYTES;
use crate::schedule::{Cell, UnitKind};
use crate::storage::offload::ALIGN;
use crate::storage::Tier;

/// Bytes of new cache rows taken from the working cache per write to disk (a multiple of
/// [`ALIGN`]: the pieces of a span meet at block boundaries, so only a span's ends are
/// read back and patched).
const STORE_PIECE_BYTES: u64 = 1 << 20;
const _: () = assert!(STORE_PIECE_BYTES.is_multiple_of(ALIGN as u64));

/// Row spans `(first row, rows)`, in row order, merged into ranges of rows: a span joins the
/// one before it when at most `MERGE_GAP_BYTES / row_bytes` rows lie between them; empty
/// spans are dropped. Each range is one disk request instead of one per sequence (a decode
/// step stores one row per sequence: one read-modify-write of a disk block each, unmerged).
fn merged_spans(
    spans: impl IntoIterator<Item = (usize, usize)>,
    row_bytes: usize,
) -> Vec<Range<usize>> {
    let gap = MERGE_GAP_BYTES / row_bytes.max(1);
    let mut out: Vec<Range<usize>> = Vec::new();
    for (first, rows) in spans.into_iter().filter(|s| s.1 > 0) {
        match out.last_mut() {
            Some(last) if first >= last.end && first - last.end <= gap => last.end = first + rows,
            _ => out.push(first..first + rows),
        }
    }
    out
}

impl<D: Device> BlockState<'_, D> {
    /// Whether cell `c`'s attention runs on the CPU for the sequences whose cache is not on the
    /// GPU (`cpu_cache_compute`, decode tokens only: the prefill runs on the GPU).
    pub(super) fn delegated(&self, c: Cell, cell: &CacheCell<D>) -> bool {
        self.exec.policy.cpu_cache_compute && c.token > 0 && cell.split.gpu < cell.split.rows()
    }

    /// Decode attention with the GPU sequences' rows on the device cache and the others on all
    /// CPU cores against their RAM (or just-read disk) rows (the CPU device's attention), new
    /// keys and values appended where each sequence's cache lives. Returns
    /// `[rows, heads * head_dim]` on the device.
    pub(super) fn cpu_attention(
        &self,
        cell: &mut CacheCell<D>,
        rb: &RowBatch<D>,
        [q, k, v]: [&D::Tensor; 3],
    ) -> Result<D::Tensor> {
        let r = &self.exec.runner;
        let dev = &r.dev;
        let layout = r.head_layout();
        let (g, cs) = (cell.split.gpu, cell.split.cpu);
        let appends = &rb.appends;
        let infos = &rb.host.infos;
        let [rows_all, qw] = dev.dims(q);
        let a = dev.zeros(rows_all, qw)?;
        if g > 0 {
            // the GPU sequences' rows come first: attend them against the device cache
            let rows = appends[g - 1].0 + appends[g - 1].2;
            let cache = cell
                .gpu
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no GPU cache"))?;
            let head = |t: &D::Tensor| -> Result<D::Tensor> {
                let out = dev.zeros(rows, dev.dims(t)[1])?;
                dev.copy_rows(t, 0..rows, &out, 0)?;
                Ok(out)
            };
            let sub = r.chunk(rb, 0..rows)?;
            let (qg, kg, vg) = (head(q)?, head(k)?, head(v)?);
            let ag = dev.attend(cache, &sub.dev, &appends[..g], &qg, &kg, &vg, layout)?;
            dev.copy_rows(&ag, 0..rows, &a, 0)?;
        }
        if g == appends.len() {
            return Ok(a);
        }
        let first_row = appends[g].0;
        let (qh, kh, vh) = (
            dev.download(q, first_row..rows_all)?,
            dev.download(k, first_row..rows_all)?,
            dev.download(v, first_row..rows_all)?,
        );
        let kvw = dev.dims(k)[1];
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
            let src = (row - first_row) * kvw..(row - first_row + n) * kvw;
            segs[0][dst..dst + n * kvw].copy_from_slice(bytemuck::cast_slice(&kh[src.clone()]));
            segs[1][dst..dst + n * kvw].copy_from_slice(bytemuck::cast_slice(&vh[src]));
        }
        // the RAM sequences, then the disk ones: rows renumbered from each tier's first
        let mut out = vec![0.0f32; qh.len()];
        for (range, segs, base) in [
            (g..g + cs, Some(&cell.cpu), base_c),
            (g + cs..appends.len(), disk.as_ref().map(|d| &d.0), base_d),
        ] {
            if range.is_empty() {
                continue;
            }
            let segs = segs.ok_or_else(missing)?;
            let (lo, hi) = (
                appends[range.start].0,
                appends[range.end - 1].0 + appends[range.end - 1].2,
            );
            let local: Vec<crate::device::RowInfo> = infos[lo..hi]
                .iter()
                .map(|i| crate::device::RowInfo {
                    first: i.first - base as u32,
                    ..*i
                })
                .collect();
            let view = KvView::F32 {
                k: bytemuck::cast_slice(&segs[0]),
                v: bytemuck::cast_slice(&segs[1]),
                width: kvw,
            };
            let span = (lo - first_row) * qw..(hi - first_row) * qw;
            cpu_attend(
                &qh[span.clone()],
                &local,
                view,
                layout,
                rb.host.softcap,
                &mut out[span],
            );
        }
        cell.disk_host = disk;
        dev.write_rows(&a, first_row, &out)?;
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
            r.dev.copy_cache_rows(g, &working, &rows)?;
        }
        let segs = r.cache_segment_bytes();
        // RAM rows: sequences gs..gs+cs, stored from the first of them
        let base_c = seq_rows.get(gs).map_or(0, |s| s.0);
        for (i, s) in segs.iter().enumerate() {
            for &(first, before, _) in &seq_rows[gs..gs + cs] {
                let at = (first - base_c) * *s as usize;
                let bytes: &[u8] = bytemuck::cast_slice(&cell.cpu[i]);
                let bytes = &bytes[at..at + before * *s as usize];
                r.dev.write_cache(&working, i, first as u64 * s, bytes)?;
            }
        }
        // disk rows: the rest, from the cache file, a merged span of sequences per read,
        // straight from the staging buffer into the working cache
        let base_d = seq_rows.get(gs + cs).map_or(0, |s| s.0);
        if cell.split.disk > 0 {
            let file = self.disk_cache()?;
            exec.staging.with(|staging| {
                for (i, &s) in segs.iter().enumerate() {
                    let spans = seq_rows[gs + cs..]
                        .iter()
                        .map(|&(f, before, _)| (f, before));
                    for rows in merged_spans(spans, s as usize) {
                        let at = rows.start as u64 * s;
                        file.read_chunks(
                            cell.disk[i] + (rows.start - base_d) as u64 * s,
                            rows.len() * s as usize,
                            staging,
                            |pos, bytes| r.dev.write_cache(&working, i, at + pos as u64, bytes),
                        )?;
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
        cell: &mut CacheCell<D>,
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
                let spans = seq_rows[first_disk..]
                    .iter()
                    .map(|&(f, before, _)| (f, before));
                for rows in merged_spans(spans, s) {
                    let (at, end) = ((rows.start - base) * s, (rows.end - base) * s);
                    file.read_into(cell.disk[i] + at as u64, &mut bytes[at..end], staging)?;
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
                    let spans = rows[first_disk..].iter().map(|&(f, from, n)| (f + from, n));
                    for new in merged_spans(spans, s) {
                        let (at, end) = ((new.start - base) * s, (new.end - base) * s);
                        file.write_at(cell.disk[i] + at as u64, &bytes[at..end], staging)?;
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
            r.dev.copy_cache_rows(&working, g, &new)?;
        }
        let segs = r.cache_segment_bytes();
        let base_c = rows.get(gs).map_or(0, |s| s.0);
        let base_d = rows.get(gs + cs).map_or(0, |s| s.0);
        // the new rows of the RAM sequences: (segment, sequence, offset, bytes)
        let ranges: Vec<(usize, usize, u64, u64)> = segs
            .iter()
            .enumerate()
            .flat_map(|(i, &s)| {
                rows[gs..gs + cs]
                    .iter()
                    .enumerate()
                    .map(move |(j, &(first, from, n))| {
                        (i, gs + j, (first + from) as u64 * s, n as u64 * s)
                    })
            })
            .filter(|r| r.3 > 0)
            .collect();
        let wanted: Vec<(usize, u64, u64)> =
            ranges.iter().map(|&(i, _, at, len)| (i, at, len)).collect();
        let host = r.dev.read_cache(&working, &wanted)?;
        for ((i, seq, _, _), bytes) in ranges.iter().zip(host) {
            let (first, from, _) = rows[*seq];
            let at = (first - base_c + from) * segs[*i] as usize;
            let words: &mut [u8] = bytemuck::cast_slice_mut(&mut cell.cpu[*i]);
            words[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        // the disk sequences' new rows, a merged span per write (the rows between, as the
        // working cache holds them: rows loaded for this step, or unused capacity), in pieces
        // that meet at the file's block boundaries. (Writing each new row's blocks alone, on
        // 4 threads, was slower on this project's VM: a decode step then makes one small
        // write per sequence, and small requests cost more than the bytes saved.)
        if cell.split.disk > 0 {
            let file = self.disk_cache()?;
            for (i, &s) in segs.iter().enumerate() {
                // byte `b` of the disk rows: byte base_d s + b of the working cache, byte
                // disk[i] + b of the file
                let (working_at, file_at) = (base_d as u64 * s, cell.disk[i]);
                let spans = rows[gs + cs..].iter().map(|&(f, from, n)| (f + from, n));
                for new in merged_spans(spans, s as usize) {
                    let mut b = (new.start - base_d) as u64 * s;
                    let end = (new.end - base_d) as u64 * s;
                    while b < end {
                        let next = ((file_at + b) / STORE_PIECE_BYTES + 1) * STORE_PIECE_BYTES;
                        let len = (next - file_at).min(end) - b;
                        let bytes = r.dev.read_cache(&working, &[(i, working_at + b, len)])?;
                        let bytes = bytes.first().map_or(&[][..], Vec::as_slice);
                        exec.staging
                            .with(|st| file.write_at(file_at + b, bytes, st))?;
                        b += len;
                    }
                }
            }
        }
        drop(held);
        drop(working);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{merged_spans, MERGE_GAP_BYTES};

    #[test]
    fn spans_merge_across_small_gaps_only() {
        let row = 1024; // bytes per row: the merge gap is 256 rows
        let gap = MERGE_GAP_BYTES / row;
        // decode: one new row per sequence of 128 rows of capacity, one span
        let decode: Vec<(usize, usize)> = (0..5).map(|s| (s * 128 + 70, 1)).collect();
        assert_eq!(merged_spans(decode, row), vec![70..(4 * 128 + 71)]);
        // a gap of exactly `gap` rows merges, one more does not; empty spans are dropped
        let spans = [(0, 10), (10 + gap, 5), (40 + gap, 0), (15 + 2 * gap + 1, 3)];
        assert_eq!(
            merged_spans(spans, row),
            vec![0..15 + gap, 15 + 2 * gap + 1..18 + 2 * gap + 1]
        );
        // rows wider than the gap: nothing merges unless adjacent
        assert_eq!(
            merged_spans([(0, 2), (2, 2), (5, 1)], MERGE_GAP_BYTES * 2),
            vec![0..4, 5..6]
        );
        assert!(merged_spans([(3, 0)], row).is_empty());
    }
}
