//! [`Placer`]: a model's weights placed across the tiers. Each linear weight is split by
//! rows ([`WeightPlacer`]): the GPU rows are uploaded once, the CPU rows kept in RAM and the
//! disk rows written to one offload file, all in the layout the kernels read
//! (`crate::layout`), so streaming a weight is a plain copy. A row range that would not fit
//! one device buffer is cut into pieces. A kept offload file is named by its manifest and
//! checked against its record before reuse.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::weights::{
    disk_extent, disk_segment_starts, LookupTable, Piece, PieceHome, PlacedLinear, PlacedModel,
    PlacedUnit,
};
use crate::arch::ModelFiles;
use crate::arch::{Linear, PartSpec, PartWeights, UnitWeights};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::{convert_rows, output_format, RowFormat, WeightFormat};
use crate::model::{DType, TensorSpec, WeightSource};
use crate::schedule::UnitKind;
use crate::storage::offload::{align_up, private_file_name, AlignedBuf, OffloadFile};
use crate::storage::{MemoryLedger, Reservation, Tier, WeightPlacer};
use crate::tier::TierSplit;

/// Rows converted at a time while placing weights (bounds the transient memory).
const CONVERT_BYTES: usize = 8 << 20;

/// The offload file's layout version: 2 since f16 weights are stored as f16 (16-bit codes), 4
/// since the model is named by its fingerprint and the file carries checksums.
const MANIFEST_VERSION: u32 = 4;

/// What the offload file must hold; equal manifests mean the file can be reused. The file is
/// named by the manifest's hash, so runs of other models or placements never share one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// The model's fingerprint ([`crate::model::fingerprint`]).
    model: String,
    format: String,
    /// `(tensor, first row, rows, offset, bytes)`.
    pieces: Vec<(String, usize, usize, u64, u64)>,
}

/// A kept offload file's record beside it: its manifest and, for every region written, the
/// xxh3 hash of its bytes, checked before the file is reused.
#[derive(Debug, Serialize, Deserialize)]
struct OffloadRecord {
    manifest: Manifest,
    /// `(offset, bytes, xxh3)` of each segment and of the table's rows.
    checksums: Vec<(u64, u64, u64)>,
}

/// A piece to be created: which tensor rows, on which tier, where on disk.
struct PiecePlan {
    tensor: usize,
    first_row: usize,
    rows: usize,
    tier: Tier,
    offset: u64,
}

/// A tensor to place: a linear weight (index into the plan) or the lookup table.
struct TensorPlan {
    spec: TensorSpec,
    format: WeightFormat,
    row: RowFormat,
}

/// Places and loads a model's weights.
pub(crate) struct Placer<'a, D: Device> {
    pub dev: &'a D,
    pub files: &'a ModelFiles,
    pub format: WeightFormat,
    pub split: TierSplit,
    pub sep_layer: bool,
    /// Panels the output projection is split into, one unit each.
    pub logit_panels: usize,
    pub ledger: &'a Arc<MemoryLedger>,
    pub offload_dir: Option<&'a std::path::Path>,
    /// Keep the offload file for later runs (named by its manifest, with a record of it).
    pub keep_offload: bool,
}

/// The linear weights of a unit before placement: each weight (with its optional bias), its
/// format and the rows of it the unit holds (all, or a panel of the output projection).
struct UnitSpec {
    linears: Vec<(TensorSpec, Option<TensorSpec>, WeightFormat, Range<usize>)>,
}

/// The output columns of each of `panels` panels of a `vocab`-entry output projection:
/// panel `p` holds `p * vocab / panels .. (p + 1) * vocab / panels` (none empty, since
/// `panels` is clamped to `1..=vocab`).
pub(crate) fn logit_panels(vocab: usize, panels: usize) -> Vec<Range<usize>> {
    let n = panels.clamp(1, vocab.max(1));
    (0..n).map(|p| p * vocab / n..(p + 1) * vocab / n).collect()
}

impl<D: Device> Placer<'_, D> {
    fn source(&self) -> &dyn WeightSource {
        self.files.weights.as_ref()
    }

    /// A norm weight, bias or position table, resident on the device as `[1, n]` (vectors)
    /// or `[rows, width]`.
    fn small(&self, spec: &TensorSpec, held: &mut Vec<Reservation>) -> Result<D::Tensor> {
        let n: usize = spec.shape.iter().product();
        held.push(self.ledger.reserve(Tier::Gpu, 4 * n as u64, &spec.name)?);
        let (rows, width) = match spec.shape[..] {
            [r, w] => (r, w),
            _ => (1, n),
        };
        self.dev.upload(&spec.load_f32(self.source())?, rows, width)
    }

    /// A linear layer with no rows yet (they are added per piece), its bias resident.
    fn empty_linear(
        &self,
        weight: &TensorSpec,
        bias: Option<&TensorSpec>,
        held: &mut Vec<Reservation>,
    ) -> Result<Linear<D>> {
        Ok(Linear {
            parts: Vec::new(),
            bias: bias.map(|b| self.small(b, held)).transpose()?,
            out: weight.shape[0],
        })
    }

    /// A part's small tensors uploaded and its linears empty (their rows come per piece);
    /// each linear weight present joins `unit`, every row in the run-time format.
    fn part(
        &self,
        spec: &PartSpec,
        unit: &mut UnitSpec,
        held: &mut Vec<Reservation>,
    ) -> Result<PartWeights<D>> {
        let vectors = spec
            .vectors
            .iter()
            .map(|v| v.as_ref().map(|t| self.small(t, held)).transpose())
            .collect::<Result<_>>()?;
        let linears = spec
            .linears
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(w, b)| {
                        let rows = 0..w.shape[0];
                        unit.linears.push((w.clone(), b.clone(), self.format, rows));
                        self.empty_linear(w, b.as_ref(), held)
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(PartWeights {
            sliding: spec.sliding,
            vectors,
            linears,
        })
    }

    /// The units in schedule order: their linear weights and resident templates, and the
    /// embedding table, as the model's architecture lists them ([`crate::arch::ModelFiles::parts`]).
    fn units(
        &self,
        held: &mut Vec<Reservation>,
    ) -> Result<(Vec<UnitSpec>, Vec<UnitWeights<D>>, TensorSpec)> {
        let parts = self.files.parts();
        let config = &self.files.config;
        let kinds = UnitKind::sequence(config.num_layers(), self.sep_layer, self.logit_panels);
        let panels = logit_panels(config.vocab_size(), self.logit_panels);
        let (mut specs, mut templates) = (Vec::new(), Vec::new());
        for kind in kinds {
            let mut unit = UnitSpec {
                linears: Vec::new(),
            };
            let template = match kind {
                UnitKind::Embed => UnitWeights::Embed(self.part(&parts.input, &mut unit, held)?),
                UnitKind::Attention(l) => {
                    UnitWeights::Attention(self.part(&parts.layers[l][0], &mut unit, held)?)
                }
                UnitKind::Mlp(l) => {
                    UnitWeights::Mlp(self.part(&parts.layers[l][1], &mut unit, held)?)
                }
                UnitKind::Layer(l) => UnitWeights::Layer(
                    self.part(&parts.layers[l][0], &mut unit, held)?,
                    self.part(&parts.layers[l][1], &mut unit, held)?,
                ),
                UnitKind::Head => UnitWeights::Head(self.part(&parts.head, &mut unit, held)?),
                UnitKind::Logits(p) => {
                    // the output projection's panel `p`: its rows, in the output format
                    let (output, cols) = (&parts.output, panels[p].clone());
                    let format = output_format(self.format);
                    unit.linears
                        .push((output.clone(), None, format, cols.clone()));
                    UnitWeights::Logits(self.empty_linear(output, None, held)?, cols)
                }
            };
            specs.push(unit);
            templates.push(template);
        }
        Ok((specs, templates, parts.embedding))
    }

    /// Places every weight: uploads GPU rows, keeps CPU rows, writes (or reuses) the offload
    /// file, charging each tier in `ledger`.
    pub(crate) fn place(&self) -> Result<PlacedModel<D>> {
        let mut held = Vec::new();
        let (specs, mut templates, table_spec) = self.units(&mut held)?;
        // the plan pass: formats, row splits, pieces and where each lies in the offload file
        let plan = self.plan_pieces(&specs, &table_spec)?;
        let (mut file, reused, damaged, check_seconds) = if plan.disk_bytes == 0 {
            (None, false, false, 0.0)
        } else {
            let dir = self.offload_dir.ok_or_else(|| {
                Error::invalid(
                    "EngineOptions::offload_dir",
                    "the policy puts weights on disk: give an offload directory",
                )
            })?;
            held.push(
                self.ledger
                    .reserve(Tier::Disk, plan.disk_bytes, "offloaded weights")?,
            );
            let manifest = self.manifest(&plan)?;
            let (file, reused, damaged, checked) = open_offload(dir, &manifest, plan.disk_bytes)?;
            (Some((file, manifest)), reused, damaged, checked)
        };
        // the write pass: each tensor converted a few rows at a time into its pieces
        let mut writer = Writer {
            file: file.as_ref().map(|(f, _)| f),
            reused,
            staging: AlignedBuf::new(1 << 20),
            checksums: Vec::new(),
        };
        let mut placed: Vec<PlacedLinear<D>> = plan
            .tensors
            .iter()
            .map(|t| PlacedLinear {
                format: t.row,
                pieces: Vec::new(),
            })
            .collect();
        for p in &plan.pieces {
            let piece = self.write_piece(p, &plan.tensors[p.tensor], &mut writer, &mut held)?;
            placed[p.tensor].pieces.push(piece);
        }
        let table = self.write_table(&plan.table, &table_spec, &mut writer, &mut held)?;
        let checksums = std::mem::take(&mut writer.checksums);
        drop(writer);
        if let Some((f, manifest)) = &mut file {
            finish_offload(f, manifest.clone(), checksums, reused, self.keep_offload)?;
        }
        Ok(PlacedModel {
            units: assemble_units(&mut templates, placed)?,
            logit_panels: logit_panels(self.files.config.vocab_size(), self.logit_panels).len(),
            table,
            file: file.map(|(f, _)| Arc::new(f)),
            placed_bytes: plan.placed_bytes,
            reused,
            damaged,
            check_seconds,
            _held: held,
        })
    }

    /// The plan pass: each unit's linear weights split by rows over the tiers (pieces no larger
    /// than a device buffer; disk pieces at aligned offsets of the offload file, one after
    /// another), then the lookup table's rows (its GPU share kept in RAM: a lookup reads a few
    /// rows, which the CPU gathers), its disk rows after the weights'.
    fn plan_pieces(&self, specs: &[UnitSpec], table_spec: &TensorSpec) -> Result<PlacementPlan> {
        let source = self.source();
        let max_binding = self.dev.max_buffer_bytes() as usize;
        let mut tensors: Vec<TensorPlan> = Vec::new();
        let mut pieces: Vec<PiecePlan> = Vec::new();
        let mut placer = WeightPlacer::new(self.split);
        let mut disk_cursor = 0u64;
        for (w, _, fmt, rows) in specs.iter().flat_map(|u| &u.linears) {
            let (row, _) = convert_rows(source, w, *fmt, 0..1)?;
            let split = placer.place(rows.len(), row.row_bytes());
            let t = tensors.len();
            let per_piece = (max_binding / row.segment_row_bytes()[0].max(1)).max(1);
            for (tier, range) in split.ranges() {
                let (mut first, end) = (rows.start + range.start, rows.start + range.end);
                while first < end {
                    let rows = per_piece.min(end - first);
                    let offset = if tier == Tier::Disk {
                        let at = disk_cursor;
                        disk_cursor += disk_extent(rows, &row.segment_row_bytes());
                        at
                    } else {
                        0
                    };
                    pieces.push(PiecePlan {
                        tensor: t,
                        first_row: first,
                        rows,
                        tier,
                        offset,
                    });
                    first += rows;
                }
            }
            tensors.push(TensorPlan {
                spec: w.clone(),
                format: *fmt,
                row,
            });
        }
        let info = source
            .info(&table_spec.name)
            .ok_or_else(|| Error::MissingTensor {
                path: source.path().to_path_buf(),
                name: table_spec.name.clone(),
            })?;
        let width = table_spec.shape[1];
        let row_bytes = info
            .dtype
            .bytes_for(width)
            .ok_or_else(|| Error::format(source.path(), "embedding rows are not whole blocks"))?;
        let split = crate::storage::split_sequences(
            table_spec.shape[0],
            TierSplit {
                gpu: 0.0,
                cpu: self.split.gpu + self.split.cpu,
                disk: self.split.disk,
            },
        );
        let table = TablePlan {
            name: table_spec.name.clone(),
            dtype: info.dtype,
            width,
            row_bytes,
            cpu_rows: split.cpu,
            disk_rows: split.disk,
            offset: disk_cursor,
        };
        disk_cursor += align_up((split.disk * row_bytes) as u64);
        let mut placed_bytes = placer.placed();
        placed_bytes[Tier::Cpu.index()] += (split.cpu * row_bytes) as u64;
        placed_bytes[Tier::Disk.index()] += (split.disk * row_bytes) as u64;
        Ok(PlacementPlan {
            tensors,
            pieces,
            table,
            placed_bytes,
            disk_bytes: disk_cursor,
        })
    }

    /// What the offload file of `plan` must hold: an equal manifest means a kept file can be
    /// reused.
    fn manifest(&self, plan: &PlacementPlan) -> Result<Manifest> {
        let table = &plan.table;
        Ok(Manifest {
            version: MANIFEST_VERSION,
            model: crate::model::fingerprint(&self.files.path)?,
            format: format!("{:?}", self.format),
            pieces: plan
                .pieces
                .iter()
                .filter(|p| p.tier == Tier::Disk)
                .map(|p| {
                    let t = &plan.tensors[p.tensor];
                    (
                        t.spec.name.clone(),
                        p.first_row,
                        p.rows,
                        p.offset,
                        disk_extent(p.rows, &t.row.segment_row_bytes()),
                    )
                })
                .chain(std::iter::once((
                    table.name.clone(),
                    table.cpu_rows,
                    table.disk_rows,
                    table.offset,
                    (table.disk_rows * table.row_bytes) as u64,
                )))
                .collect(),
        })
    }

    /// Converts piece `p` of tensor `t` a few rows at a time into its home: device buffers,
    /// RAM, or the offload file (skipped when a kept file is reused; each disk segment's bytes
    /// hashed for the file's record as they go).
    fn write_piece(
        &self,
        p: &PiecePlan,
        t: &TensorPlan,
        writer: &mut Writer,
        held: &mut Vec<Reservation>,
    ) -> Result<Piece<D>> {
        let source = self.source();
        let seg = t.row.segment_row_bytes();
        let bytes = (p.rows * t.row.row_bytes()) as u64;
        let mut sink = match p.tier {
            Tier::Gpu => {
                held.push(self.ledger.reserve(Tier::Gpu, bytes, &t.spec.name)?);
                Sink::<D>::Gpu(
                    seg.iter()
                        .map(|s| self.dev.buffer((s * p.rows) as u64))
                        .collect::<Result<_>>()?,
                )
            }
            Tier::Cpu => {
                held.push(self.ledger.reserve(Tier::Cpu, bytes, &t.spec.name)?);
                Sink::Cpu(vec![0u8; bytes as usize])
            }
            Tier::Disk => Sink::Disk,
        };
        let disk_starts = disk_segment_starts(p.rows, &seg);
        let skip = p.tier == Tier::Disk && writer.reused;
        let mut hashers: Vec<Xxh3> = seg.iter().map(|_| Xxh3::new()).collect();
        let chunk_rows = (CONVERT_BYTES / t.row.row_bytes().max(1)).max(1);
        let mut r = 0;
        while r < p.rows && !skip {
            let n = chunk_rows.min(p.rows - r);
            let a = p.first_row + r;
            let (_, segs) = convert_rows(source, &t.spec, t.format, a..a + n)?;
            let mut seg_base = 0;
            for (i, data) in segs.iter().enumerate() {
                let pos = seg_base + r * seg[i];
                let disk_pos = disk_starts[i] + (r * seg[i]) as u64;
                match &mut sink {
                    Sink::Gpu(buffers) => {
                        self.dev
                            .write_buffer(&buffers[i], (r * seg[i]) as u64, data)?
                    }
                    Sink::Cpu(v) => v[pos..pos + data.len()].copy_from_slice(data),
                    Sink::Disk => {
                        hashers[i].update(data);
                        writer.write_at(p.offset + disk_pos, data)?
                    }
                }
                seg_base += p.rows * seg[i];
            }
            r += n;
        }
        source.release(&t.spec.name);
        if p.tier == Tier::Disk && !skip {
            for (i, h) in hashers.iter().enumerate() {
                let at = p.offset + disk_starts[i];
                writer
                    .checksums
                    .push((at, (p.rows * seg[i]) as u64, h.digest()));
            }
        }
        let home = match sink {
            Sink::Gpu(buffers) => PieceHome::Gpu(self.dev.part(t.row, p.rows, buffers)?),
            Sink::Cpu(v) => PieceHome::Cpu(v),
            Sink::Disk => PieceHome::Disk(p.offset),
        };
        Ok(Piece {
            first_row: p.first_row,
            rows: p.rows,
            home,
        })
    }

    /// The lookup table as `plan` places it: its RAM rows read now, its disk rows written to
    /// the offload file (unless a kept file is reused) and hashed.
    fn write_table(
        &self,
        plan: &TablePlan,
        spec: &TensorSpec,
        writer: &mut Writer,
        held: &mut Vec<Reservation>,
    ) -> Result<LookupTable> {
        let source = self.source();
        let cpu_bytes = (plan.cpu_rows * plan.row_bytes) as u64;
        held.push(
            self.ledger
                .reserve(Tier::Cpu, cpu_bytes, "embedding table")?,
        );
        let cpu = source.row_bytes(&spec.name, 0..plan.cpu_rows)?.into_owned();
        if plan.disk_rows > 0 && !writer.reused && writer.file.is_some() {
            let rows_per_chunk = (CONVERT_BYTES / plan.row_bytes).max(1);
            let mut r = plan.cpu_rows;
            let mut hasher = Xxh3::new();
            while r < spec.shape[0] {
                let n = rows_per_chunk.min(spec.shape[0] - r);
                let bytes = source.row_bytes(&spec.name, r..r + n)?;
                hasher.update(&bytes);
                let at = plan.offset + ((r - plan.cpu_rows) * plan.row_bytes) as u64;
                writer.write_at(at, &bytes)?;
                r += n;
            }
            let bytes = (plan.disk_rows * plan.row_bytes) as u64;
            writer.checksums.push((plan.offset, bytes, hasher.digest()));
        }
        source.release(&spec.name);
        Ok(LookupTable {
            dtype: plan.dtype,
            width: plan.width,
            row_bytes: plan.row_bytes,
            cpu,
            cpu_rows: plan.cpu_rows,
            disk: (plan.disk_rows > 0).then_some(plan.offset),
        })
    }
}

/// The units as the executor runs them: each template's GPU pieces go into it now, its
/// streamed pieces stay with the unit.
fn assemble_units<D: Device>(
    templates: &mut [UnitWeights<D>],
    placed: Vec<PlacedLinear<D>>,
) -> Result<Vec<PlacedUnit<D>>> {
    let mut placed = placed.into_iter();
    let mut units = Vec::new();
    for template in templates.iter_mut() {
        let mut linears = Vec::new();
        for lin in template.linears_mut() {
            let mut p = placed.next().ok_or_else(|| {
                Error::invalid("placement", "unit layout and tensor list disagree")
            })?;
            let mut streamed = Vec::new();
            for piece in p.pieces.drain(..) {
                match piece.home {
                    PieceHome::Gpu(part) => lin.parts.push((part, piece.first_row)),
                    _ => streamed.push(piece),
                }
            }
            p.pieces = streamed;
            linears.push(p);
        }
        units.push(PlacedUnit {
            template: template.clone(),
            linears,
        });
    }
    Ok(units)
}

/// What the plan pass decides: every tensor's pieces and the table's rows.
struct PlacementPlan {
    tensors: Vec<TensorPlan>,
    pieces: Vec<PiecePlan>,
    table: TablePlan,
    /// Bytes per tier of linear weights and table.
    placed_bytes: [u64; 3],
    /// The offload file's length.
    disk_bytes: u64,
}

/// Where the lookup table's rows go: the first `cpu_rows` in RAM, the rest on disk at `offset`.
struct TablePlan {
    name: String,
    dtype: DType,
    width: usize,
    row_bytes: usize,
    cpu_rows: usize,
    disk_rows: usize,
    offset: u64,
}

/// The write pass's offload file (none when nothing is on disk), whether it is a kept file
/// being reused (then nothing is written), and the checksums of what was written.
struct Writer<'f> {
    file: Option<&'f OffloadFile>,
    reused: bool,
    staging: AlignedBuf,
    checksums: Vec<(u64, u64, u64)>,
}

impl Writer<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match self.file {
            Some(f) => f.write_at(offset, data, &mut self.staging),
            None => Ok(()),
        }
    }
}

enum Sink<D: Device> {
    Gpu(Vec<D::Buffer>),
    Cpu(Vec<u8>),
    Disk,
}

/// The kept offload file for `manifest` in `dir` and its record: `ferrogen-weights-{hash}`
/// with `.bin` and `.json`, the hash that of the manifest.
fn kept_paths(dir: &Path, manifest: &Manifest) -> Result<(PathBuf, PathBuf)> {
    let text = serde_json::to_string(manifest)
        .map_err(|e| Error::invalid("offload manifest", e.to_string()))?;
    let stem = format!("ferrogen-weights-{:016x}", xxh3_64(text.as_bytes()));
    Ok((
        dir.join(format!("{stem}.bin")),
        dir.join(format!("{stem}.json")),
    ))
}

/// Opens the offload file for `manifest` in `dir`: the kept one when its record matches and
/// every checksum holds, else a new file of `len` bytes private to this process. Returns
/// whether it was reused, and whether a kept one was found damaged (then its names are
/// removed, so that no run uses it again).
fn open_offload(
    dir: &Path,
    manifest: &Manifest,
    len: u64,
) -> Result<(OffloadFile, bool, bool, f64)> {
    let (bin, json) = kept_paths(dir, manifest)?;
    let record = std::fs::read_to_string(&json)
        .ok()
        .and_then(|text| serde_json::from_str::<OffloadRecord>(&text).ok())
        .filter(|r| &r.manifest == manifest);
    let mut damaged = false;
    if let Some(record) = record {
        if let Ok(file) = OffloadFile::open(&bin) {
            let started = std::time::Instant::now();
            let intact = file.len() == align_up(len) && checksums_hold(&file, &record.checksums)?;
            let checked = started.elapsed().as_secs_f64();
            if intact {
                return Ok((file, true, false, checked));
            }
            damaged = true;
            let _ = std::fs::remove_file(&json);
            let _ = std::fs::remove_file(&bin);
        }
    }
    let stem = bin.file_stem().map(|s| s.to_string_lossy().into_owned());
    let path = dir.join(private_file_name(&stem.unwrap_or_default()));
    Ok((OffloadFile::create(&path, len)?, false, damaged, 0.0))
}

/// Whether every region of `file` hashes to its checksum `(offset, bytes, xxh3)`.
fn checksums_hold(file: &OffloadFile, checksums: &[(u64, u64, u64)]) -> Result<bool> {
    let mut staging = AlignedBuf::new(4 << 20);
    for &(offset, bytes, want) in checksums {
        let Ok(len) = usize::try_from(bytes) else {
            return Ok(false);
        };
        if offset.checked_add(bytes).is_none_or(|end| end > file.len()) {
            return Ok(false);
        }
        let mut hasher = Xxh3::new();
        file.read_chunks(offset, len, &mut staging, |_, chunk| {
            hasher.update(chunk);
            Ok(())
        })?;
        if hasher.digest() != want {
            return Ok(false);
        }
    }
    Ok(true)
}

/// After a new offload file is written: synced and, when it is to be kept, its record written
/// beside it and the file renamed to its kept name (a file there, perhaps in use by another
/// run, is replaced; that run keeps reading its own). A reused file is kept or not as asked.
fn finish_offload(
    file: &mut OffloadFile,
    manifest: Manifest,
    checksums: Vec<(u64, u64, u64)>,
    reused: bool,
    keep: bool,
) -> Result<()> {
    let dir = file
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let (bin, json) = kept_paths(&dir, &manifest)?;
    if reused {
        file.keep(keep, vec![json]);
        return Ok(());
    }
    file.sync()?;
    if !keep {
        return Ok(());
    }
    let record = OffloadRecord {
        manifest,
        checksums,
    };
    let text = serde_json::to_string(&record)
        .map_err(|e| Error::invalid("offload manifest", e.to_string()))?;
    let tmp = dir.join(private_file_name("ferrogen-record"));
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    let renamed = std::fs::rename(&tmp, &json).map_err(|e| Error::io(&json, e));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed?;
    file.rename(&bin)?;
    file.keep(true, Vec::new());
    Ok(())
}
