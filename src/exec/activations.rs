//! Activations between units: the hidden rows of each GPU batch, split by sequence over the
//! tiers (GPU rows stay on the device, RAM rows are downloaded, disk rows go to the block's
//! activation file) and brought back to the GPU before the next unit; the first unit's
//! "activations" are the embedding rows, gathered on the CPU.

use super::state::{lock, Activation, BlockState};
use crate::arch::CacheSlot;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::schedule::Cell;
use crate::storage::Tier;

impl<D: Device> BlockState<'_, D> {
    pub(super) fn load_activation(&self, c: Cell) -> Result<()> {
        let exec = self.exec;
        let r = &exec.runner;
        let mut batch = lock(&self.batches[c.batch]);
        if c.unit == 0 {
            // the embedding lookup, on the CPU from the table's tiers
            let slots: Vec<CacheSlot> = batch
                .cache_rows(c.token)
                .into_iter()
                .zip(&batch.capacity)
                .zip(&batch.groups)
                .map(|(((first, filled, _), &capacity), group)| CacheSlot {
                    first,
                    capacity,
                    filled,
                    group: Some(group),
                })
                .collect();
            let new = batch.new_tokens(c.token);
            let rb = r.row_batch(&new, &slots)?;
            let values = exec.staging.with(|staging| {
                exec.model
                    .table
                    .gather(&rb.host.ids, exec.model.file.as_deref(), staging)
            })?;
            // (a batch whose sequences all stopped has no rows, and no compute)
            let width = match rb.rows {
                0 => r.config.hidden_size(),
                rows => values.len() / rows,
            };
            let held = exec
                .ledger
                .reserve(Tier::Gpu, (values.len() * 4) as u64, "activations")?;
            let x = r.dev.upload_owned(values, rb.rows, width)?;
            batch.rows = Some(rb);
            batch.x = Some(Activation::Gpu(x, held));
            return Ok(());
        }
        if !matches!(batch.x, Some(Activation::Parked { .. })) {
            return Ok(()); // already on the GPU
        }
        let Some(Activation::Parked {
            width,
            rows,
            gpu,
            cpu,
            _held,
        }) = batch.x.take()
        else {
            return Ok(());
        };
        let total: usize = rows.iter().sum();
        let held = exec
            .ledger
            .reserve(Tier::Gpu, (total * width * 4) as u64, "activations")?;
        let x = r.dev.zeros(total, width)?;
        if let Some(g) = &gpu {
            r.dev.copy_rows(g, 0..rows[0], &x, 0)?;
        }
        if rows[1] > 0 {
            r.dev.write_rows(&x, rows[0], &cpu)?;
        }
        if rows[2] > 0 {
            let file = self
                .act_file
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no activation file"))?;
            let mut bytes = vec![0u8; rows[2] * width * 4];
            exec.staging
                .with(|s| file.read_into(self.act_extent[c.batch], &mut bytes, s))?;
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
            r.dev.write_rows(&x, rows[0] + rows[1], &values)?;
        }
        drop(_held);
        batch.x = Some(Activation::Gpu(x, held));
        Ok(())
    }

    pub(super) fn store_activation(&self, c: Cell) -> Result<()> {
        if c.unit + 1 == self.plan.units.len() {
            return Ok(()); // results are on the host already
        }
        let exec = self.exec;
        let r = &exec.runner;
        let mut batch = lock(&self.batches[c.batch]);
        let split = self.act_split.within(batch.seqs.clone());
        if split.gpu == batch.seqs.len() {
            return Ok(()); // all on the GPU: nothing moves
        }
        let Some(Activation::Gpu(x, held)) = batch.x.take() else {
            return Err(Error::invalid(
                "executor",
                "activations to store are not on the GPU",
            ));
        };
        // rows each tier keeps: the new rows of its sequences
        let new_rows: Vec<usize> = batch.cache_rows(c.token).iter().map(|r| r.2).collect();
        let rows = split
            .ranges()
            .map(|(_, seqs)| new_rows[seqs].iter().sum::<usize>());
        let width = r.dev.dims(&x)[1];
        let row_bytes = (width * 4) as u64;
        let mut kept = Vec::new();
        let gpu = if rows[0] > 0 {
            kept.push(
                exec.ledger
                    .reserve(Tier::Gpu, rows[0] as u64 * row_bytes, "activations")?,
            );
            let g = r.dev.zeros(rows[0], width)?;
            r.dev.copy_rows(&x, 0..rows[0], &g, 0)?;
            Some(g)
        } else {
            None
        };
        let host = r.dev.download(&x, rows[0]..rows[0] + rows[1] + rows[2])?;
        let split_at = rows[1] * width;
        kept.push(
            exec.ledger
                .reserve(Tier::Cpu, (split_at * 4) as u64, "activations")?,
        );
        let cpu: Vec<f32> = host[..split_at].to_vec();
        if rows[2] > 0 {
            let file = self
                .act_file
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no activation file"))?;
            let bytes: &[u8] = bytemuck::cast_slice(&host[split_at..]);
            exec.staging
                .with(|s| file.write_at(self.act_extent[c.batch], bytes, s))?;
        }
        drop(held);
        batch.x = Some(Activation::Parked {
            width,
            rows,
            gpu,
            cpu,
            _held: kept,
        });
        Ok(())
    }
}
