//! The JSONL job framework that scoring and generation share: a shard of the input read
//! line by line ([`Shard`], `JobLines`), ids as written ([`RecordId`]), resume and merge
//! ([`resume_point`], [`merge_shards`]); and what keeps a job's files safe: an output never
//! overwrites an input, one job at a time writes an output, answers go to `OUT.partial` until
//! the job is done, a resumed job checks that it resumes the same work, and a signal stops the
//! job between batches with its answers kept.
//!
//! The files beside an output `OUT` while a job runs:
//! - `OUT.lock`: the writer's lock (`flock`), holding its process id; removed at exit;
//! - `OUT.partial`: the answers so far, renamed to `OUT` when the job ends; `--resume`
//!   continues it (or a finished `OUT`, renamed back to `OUT.partial` first);
//! - `OUT.meta.json`: what the answers depend on ([`JobMeta`]), kept with the output so that a
//!   later `--resume` can refuse other work.

mod id;
mod lines;
mod output;
mod signals;

pub use id::RecordId;
pub use lines::{merge_shards, read_ids, resume_point, Shard};
pub(crate) use lines::{per_second, JobLines};
pub use output::{
    fingerprint_bytes, fingerprint_file, lock_path, meta_path, partial_path,
    refuse_overwriting_inputs, same_file, JobMeta, JobOutput, OutputLock,
};
pub use signals::{received_signal, signal_exit_status, stop_on_signals};
