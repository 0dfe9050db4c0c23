//! Memory accounting: bytes in use per tier against the budgets. Everything the executor holds
//! is charged through a [`Reservation`] before it is allocated and credited when dropped, so a
//! run can never go beyond its budget silently: an allocation that would is refused with
//! [`Error::Infeasible`] naming the tier, the bytes short and what was being allocated.

use std::sync::{Arc, Mutex};

use super::Tier;
use crate::bytes::format_size;
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Counts {
    used: [u64; 3],
    peak: [u64; 3],
}

/// Per-tier budgets, usage and peaks, shared by the executor's threads.
#[derive(Debug)]
pub struct MemoryLedger {
    budgets: [u64; 3],
    counts: Mutex<Counts>,
    /// The device computes in host RAM: GPU-tier bytes are charged to the CPU tier.
    unified: bool,
}

impl MemoryLedger {
    /// A ledger with `gpu`, `cpu` and `disk` byte budgets.
    pub fn new(gpu: u64, cpu: u64, disk: u64) -> Arc<Self> {
        Arc::new(Self {
            budgets: [gpu, cpu, disk],
            counts: Mutex::new(Counts::default()),
            unified: false,
        })
    }

    /// A ledger for a device whose memory is host RAM: one `ram` budget for both the GPU and
    /// CPU tiers (the executor's "GPU" reservations are the device's, in RAM), and `disk`.
    pub fn unified(ram: u64, disk: u64) -> Arc<Self> {
        Arc::new(Self {
            budgets: [ram, ram, disk],
            counts: Mutex::new(Counts::default()),
            unified: true,
        })
    }

    /// Where `tier`'s bytes are counted.
    fn slot(&self, tier: Tier) -> usize {
        if self.unified && tier == Tier::Gpu {
            Tier::Cpu.index()
        } else {
            tier.index()
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // a panic elsewhere cannot leave the counts half-updated: recover them
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charges `bytes` to `tier` for `what`, or fails if the tier's budget would be exceeded.
    pub fn reserve(self: &Arc<Self>, tier: Tier, bytes: u64, what: &str) -> Result<Reservation> {
        let mut c = self.counts();
        let i = self.slot(tier);
        let after = c.used[i] + bytes;
        if after > self.budgets[i] {
            let short_tier = Tier::ALL[i];
            return Err(Error::Infeasible {
                tier: short_tier,
                short_bytes: after - self.budgets[i],
                detail: format!(
                    "{what} needs {} more {}, which already holds {} of its {} budget; \
                     raise the budget or move data to a slower tier",
                    format_size(bytes),
                    if self.unified && short_tier == Tier::Cpu {
                        "in RAM".to_string()
                    } else {
                        format!("on the {short_tier}")
                    },
                    format_size(c.used[i]),
                    format_size(self.budgets[i]),
                ),
            });
        }
        c.used[i] = after;
        c.peak[i] = c.peak[i].max(after);
        Ok(Reservation {
            ledger: Arc::clone(self),
            tier,
            bytes,
        })
    }

    /// The budget of `tier`.
    pub fn budget(&self, tier: Tier) -> u64 {
        self.budgets[self.slot(tier)]
    }

    /// Bytes in use on `tier` now.
    pub fn used(&self, tier: Tier) -> u64 {
        self.counts().used[self.slot(tier)]
    }

    /// The most bytes `tier` has held at once.
    pub fn peak(&self, tier: Tier) -> u64 {
        self.counts().peak[self.slot(tier)]
    }
}

/// Bytes charged to a tier until dropped.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<MemoryLedger>,
    tier: Tier,
    bytes: u64,
}

impl Reservation {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// The tier charged.
    pub fn tier(&self) -> Tier {
        self.tier
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let i = self.ledger.slot(self.tier);
        let mut c = self.ledger.counts();
        c.used[i] -= self.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unified_ledger_names_ram_as_the_short_tier() {
        let ledger = MemoryLedger::unified(100, 0);
        let _a = ledger.reserve(Tier::Cpu, 70, "weights").unwrap();
        match ledger.reserve(Tier::Gpu, 40, "cache").unwrap_err() {
            e @ Error::Infeasible { .. } => {
                let Error::Infeasible {
                    tier, short_bytes, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((*tier, *short_bytes), (Tier::Cpu, 10));
                assert!(e.to_string().contains("more in RAM"), "{e}");
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn refuses_past_the_budget_and_credits_on_drop() {
        let ledger = MemoryLedger::new(100, 1000, 0);
        let a = ledger.reserve(Tier::Gpu, 60, "weights").unwrap();
        let err = ledger.reserve(Tier::Gpu, 50, "cache").unwrap_err();
        match err {
            Error::Infeasible {
                tier, short_bytes, ..
            } => {
                assert_eq!(tier, Tier::Gpu);
                assert_eq!(short_bytes, 10);
            }
            e => panic!("{e}"),
        }
        assert!(err_text(&ledger).contains("cache needs"));
        drop(a);
        let _b = ledger.reserve(Tier::Gpu, 100, "cache").unwrap();
        assert_eq!(ledger.used(Tier::Gpu), 100);
        assert_eq!(ledger.peak(Tier::Gpu), 100);
        assert!(ledger.reserve(Tier::Disk, 1, "file").is_err());
    }

    fn err_text(ledger: &Arc<MemoryLedger>) -> String {
        ledger
            .reserve(Tier::Gpu, 1 << 40, "cache")
            .unwrap_err()
            .to_string()
    }
}
