//! Weights as placed across the tiers ([`PlacedModel`], built by `placer`) and streamed onto
//! the device: a unit's RAM and disk rows are copied into one of the executor's weight slots
//! ([`WeightSlot`]) before its compute, in the layout the kernels read.

use std::sync::Arc;

use super::io_workers::{ReadJob, Readers};
use crate::arch::UnitWeights;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::RowFormat;
use crate::model::weights::decode_to_f32;
use crate::model::DType;
use crate::storage::offload::{align_up, AlignedBuf, OffloadFile, StagingPool};
use crate::storage::{MemoryLedger, Reservation, Tier};

/// Where a piece of rows lives.
pub(crate) enum PieceHome<D: Device> {
    /// On the device, uploaded once.
    Gpu(D::Part),
    /// In RAM, segments back to back.
    Cpu(Vec<u8>),
    /// In the offload file at this offset, segments back to back.
    Disk(u64),
}

/// A row range of one linear weight on one tier.
pub(crate) struct Piece<D: Device> {
    pub first_row: usize,
    pub rows: usize,
    pub home: PieceHome<D>,
}

/// A linear weight placed across the tiers.
pub(crate) struct PlacedLinear<D: Device> {
    pub format: RowFormat,
    pub pieces: Vec<Piece<D>>,
}

impl<D: Device> PlacedLinear<D> {
    /// Pieces that must be streamed onto the device before use.
    pub(crate) fn streamed(&self) -> impl Iterator<Item = &Piece<D>> {
        self.pieces
            .iter()
            .filter(|p| !matches!(p.home, PieceHome::Gpu(_)))
    }

    /// Bytes streamed per load.
    pub(crate) fn streamed_bytes(&self) -> u64 {
        self.streamed()
            .map(|p| (p.rows * self.format.row_bytes()) as u64)
            .sum()
    }
}

/// One unit's weights: small tensors and GPU rows resident in `template`, streamed rows in
/// `linears` (in the order of the template's `linears_mut`).
pub(crate) struct PlacedUnit<D: Device> {
    pub template: UnitWeights<D>,
    pub linears: Vec<PlacedLinear<D>>,
}

/// The embedding table for lookups, in the file's own format, over CPU and disk.
pub(crate) struct LookupTable {
    pub(super) dtype: DType,
    pub(super) width: usize,
    pub(super) row_bytes: usize,
    /// Rows `0..cpu.len() / row_bytes` in RAM.
    pub(super) cpu: Vec<u8>,
    pub(super) cpu_rows: usize,
    /// The rest, from this offset of the offload file.
    pub(super) disk: Option<u64>,
}

impl LookupTable {
    /// Rows of the table (f32) for `ids`, reading disk rows through `staging`.
    pub(crate) fn gather(
        &self,
        ids: &[u32],
        file: Option<&OffloadFile>,
        staging: &mut AlignedBuf,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.width);
        let mut row = vec![0u8; self.row_bytes];
        for &id in ids {
            let id = id as usize;
            let bytes: &[u8] = if id < self.cpu_rows {
                &self.cpu[id * self.row_bytes..(id + 1) * self.row_bytes]
            } else {
                let (Some(file), Some(base)) = (file, self.disk) else {
                    return Err(Error::invalid("embedding", "row placed on a missing disk"));
                };
                let at = base + ((id - self.cpu_rows) * self.row_bytes) as u64;
                file.read_into(at, &mut row, staging)?;
                &row
            };
            let v = decode_to_f32(self.dtype, bytes, self.width)
                .ok_or_else(|| Error::invalid("embedding", "row of the wrong size"))?;
            out.extend(v);
        }
        Ok(out)
    }
}

/// Every weight of a model, placed.
pub(crate) struct PlacedModel<D: Device> {
    pub units: Vec<PlacedUnit<D>>,
    /// Panels (units) the output projection streams in.
    pub logit_panels: usize,
    pub table: LookupTable,
    pub file: Option<Arc<OffloadFile>>,
    /// Bytes per tier of weights (linear weights and table, not the small tensors).
    pub placed_bytes: [u64; 3],
    /// Whether an existing offload file was reused.
    pub reused: bool,
    /// Whether a kept offload file failed its checksums (and was written anew).
    pub damaged: bool,
    /// Seconds spent checking a reused file's checksums.
    pub check_seconds: f64,
    pub(super) _held: Vec<Reservation>,
}

/// A streamed piece of a linear weight with the slot buffers (one per segment) it goes into.
type PieceCopy<'a, D> = (
    &'a PlacedLinear<D>,
    &'a Piece<D>,
    Vec<(<D as Device>::Buffer, u64)>,
);

/// Device buffers one unit's streamed pieces are copied into, reused by the next unit of the
/// same shapes (the executor's four slots: two alternating for MLPs, two for the other units).
pub(crate) struct WeightSlot<D: Device> {
    buffers: Vec<(D::Buffer, u64)>,
    held: Vec<Reservation>,
    /// The unit loaded, ready to compute.
    pub loaded: Option<(usize, usize, UnitWeights<D>)>,
}

impl<D: Device> Default for WeightSlot<D> {
    fn default() -> Self {
        Self {
            buffers: Vec::new(),
            held: Vec::new(),
            loaded: None,
        }
    }
}

impl<D: Device> WeightSlot<D> {
    /// Copies unit `unit`'s streamed pieces into this slot's buffers (RAM pieces directly,
    /// disk pieces through staging buffers, the pieces shared with `readers`) and assembles
    /// its weights.
    pub(crate) fn load<'e>(
        &mut self,
        dev: &'e D,
        ledger: &Arc<MemoryLedger>,
        unit: &'e PlacedUnit<D>,
        file: Option<&'e OffloadFile>,
        staging: &'e StagingPool,
        readers: &Readers<'_, 'e>,
    ) -> Result<UnitWeights<D>> {
        let sizes: Vec<u64> = unit
            .linears
            .iter()
            .flat_map(|l| {
                l.streamed().flat_map(|p| {
                    l.format
                        .segment_row_bytes()
                        .into_iter()
                        .map(move |s| (s * p.rows) as u64)
                })
            })
            .collect();
        let reuse = self.buffers.len() == sizes.len()
            && self.buffers.iter().zip(&sizes).all(|(b, &s)| b.1 == s);
        if !reuse {
            self.buffers.clear();
            self.held.clear();
            let total: u64 = sizes.iter().sum();
            if total > 0 {
                self.held
                    .push(ledger.reserve(Tier::Gpu, total, "streamed weights")?);
            }
            self.buffers = sizes
                .iter()
                .map(|&s| Ok((dev.buffer(s)?, s)))
                .collect::<Result<_>>()?;
        }
        // each streamed piece with its buffers, in order
        let mut jobs: Vec<PieceCopy<'e, D>> = Vec::new();
        let mut next = 0;
        for placed in &unit.linears {
            let n = placed.format.segment_row_bytes().len();
            for piece in placed.streamed() {
                jobs.push((placed, piece, self.buffers[next..next + n].to_vec()));
                next += n;
            }
        }
        // pieces from RAM one job each; from disk, on a device whose buffers are host memory,
        // each run of pieces that lie back to back in the offload file one job (one read);
        // elsewhere each piece one job (its staged reads spread over the reader threads)
        let merge_runs = dev.is_host();
        let mut copies: Vec<ReadJob<'e>> = Vec::new();
        let mut run: Vec<Segment<'_, D>> = Vec::new();
        let mut run_at = (0u64, 0u64); // (file offset of the run, of its end)
        let flush = |run: &mut Vec<Segment<'_, D>>, at: u64, copies: &mut Vec<ReadJob<'e>>| {
            if !run.is_empty() {
                let segments: Vec<(D::Buffer, usize)> =
                    run.drain(..).map(|(b, len)| (b.clone(), len)).collect();
                copies.push(Box::new(move || {
                    read_segments(dev, file, staging, at, &segments)
                }));
            }
        };
        for (placed, piece, bufs) in &jobs {
            let seg = placed.format.segment_row_bytes();
            match &piece.home {
                PieceHome::Disk(offset) => {
                    if *offset != run_at.1 || !merge_runs {
                        flush(&mut run, run_at.0, &mut copies);
                        run_at.0 = *offset;
                    }
                    run_at.1 = offset + disk_extent(piece.rows, &seg);
                    run.extend(bufs.iter().zip(&seg).map(|(b, s)| (&b.0, piece.rows * s)));
                }
                PieceHome::Cpu(bytes) => {
                    let segments: Vec<(D::Buffer, u64)> = bufs.clone();
                    copies.push(Box::new(move || write_segments(dev, &segments, 0, bytes)));
                }
                PieceHome::Gpu(_) => {}
            }
        }
        flush(&mut run, run_at.0, &mut copies);
        readers.run_all(copies)?;
        let mut weights = unit.template.clone();
        let mut jobs = jobs.into_iter();
        for (lin, placed) in weights.linears_mut().into_iter().zip(&unit.linears) {
            for _ in placed.streamed() {
                let (_, piece, bufs) = jobs
                    .next()
                    .ok_or_else(|| Error::invalid("offload", "pieces and buffers disagree"))?;
                let part = dev.part(
                    placed.format,
                    piece.rows,
                    bufs.into_iter().map(|b| b.0).collect(),
                )?;
                lin.parts.push((part, piece.first_row));
            }
        }
        Ok(weights)
    }
}

/// Offsets from a disk piece's start of its segments (`rows` rows of `segment_row_bytes`
/// each): every segment starts at an aligned offset, so that it can be read straight into an
/// aligned buffer.
pub(super) fn disk_segment_starts(rows: usize, segment_row_bytes: &[usize]) -> Vec<u64> {
    aligned_starts(segment_row_bytes.iter().map(|&s| rows * s))
}

/// Offsets of segments of `lens` bytes laid one after another, each padded to the alignment.
fn aligned_starts(lens: impl IntoIterator<Item = usize>) -> Vec<u64> {
    lens.into_iter()
        .scan(0u64, |at, len| {
            let start = *at;
            *at += align_up(len as u64);
            Some(start)
        })
        .collect()
}

/// Bytes a disk piece of `rows` rows takes in the offload file (its segments, each rounded up
/// to the alignment).
pub(super) fn disk_extent(rows: usize, segment_row_bytes: &[usize]) -> u64 {
    segment_row_bytes
        .iter()
        .map(|&s| align_up((rows * s) as u64))
        .sum()
}

/// A segment buffer of a streamed piece and the bytes it takes.
type Segment<'a, D> = (&'a <D as Device>::Buffer, usize);

/// Reads segments that lie one after another in the offload file from `offset` (each padded
/// to the alignment, as [`disk_segment_starts`] lays them out) into their buffers: straight
/// into them in one request where the device's buffers are host memory (the CPU device: no
/// staging copy of every streamed byte), else through staging buffers, the padding skipped.
fn read_segments<D: Device>(
    dev: &D,
    file: Option<&OffloadFile>,
    staging: &StagingPool,
    offset: u64,
    segments: &[(D::Buffer, usize)],
) -> Result<()> {
    let file =
        file.ok_or_else(|| Error::invalid("offload", "disk piece without an offload file"))?;
    let buffers: Vec<&D::Buffer> = segments.iter().map(|s| &s.0).collect();
    let lens: Vec<usize> = segments.iter().map(|s| s.1).collect();
    let mut direct = false;
    dev.fill_host_buffers(&buffers, &mut |dsts| {
        direct = file.read_segments(offset, &lens, dsts)?;
        Ok(())
    })?;
    if direct {
        return Ok(());
    }
    // through staging: the run's bytes in aligned chunks, each part to its segment
    let starts = aligned_starts(lens.iter().copied());
    let extent = starts
        .last()
        .zip(lens.last())
        .map_or(0, |(s, &l)| s + l as u64);
    staging.with(|buf| {
        file.read_chunks(offset, extent as usize, buf, |pos, bytes| {
            let (lo, hi) = (pos as u64, (pos + bytes.len()) as u64);
            for ((buffer, len), &start) in segments.iter().zip(&starts) {
                // the part of [lo, hi) inside this segment's [start, start + len)
                let (a, b) = (lo.max(start), hi.min(start + *len as u64));
                if a < b {
                    let part = &bytes[(a - lo) as usize..(b - lo) as usize];
                    dev.write_buffer(buffer, a - start, part)?;
                }
            }
            Ok(())
        })
    })
}

/// Writes `bytes` at `pos` of the concatenation of `buffers` (each `(buffer, size)`).
fn write_segments<D: Device>(
    dev: &D,
    buffers: &[(D::Buffer, u64)],
    pos: u64,
    bytes: &[u8],
) -> Result<()> {
    let mut pos = pos;
    let mut bytes = bytes;
    let mut base = 0u64;
    for (buffer, size) in buffers {
        if bytes.is_empty() {
            break;
        }
        if pos < base + size {
            let n = ((base + size - pos) as usize).min(bytes.len());
            dev.write_buffer(buffer, pos - base, &bytes[..n])?;
            bytes = &bytes[n..];
            pos += n as u64;
        }
        base += size;
    }
    Ok(())
}
