//! The threads that run a block's loads and stores beside compute: one long-lived thread per
//! transfer track (weights, cache and activations, each way), started once per block and fed
//! through a queue, and [`Readers`], the threads that share one weight load's reads. A thread per operation cost a spawn and a join each, about 30 us on a small
//! VM, some 500 times per decode step of a small model: on two cores that stole a tenth of the
//! step from compute. On its own thread a track's operations run in the order they are
//! submitted; operations of different tracks run side by side.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use super::trace::Track;
use crate::error::{Error, Result};
use crate::schedule::Op;

/// An operation and where its result goes.
type Job = (Op, Sender<Result<()>>);

/// The tracks an operation can run on, in the order of [`IoWorkers`]' threads.
const IO_TRACKS: [Track; 5] = [
    Track::LoadWeight,
    Track::LoadCache,
    Track::LoadActivation,
    Track::StoreCache,
    Track::StoreActivation,
];

/// The track of a load or store (`None` for compute and releases, which run on the caller).
pub(super) fn io_track(op: &Op) -> Option<Track> {
    match op {
        Op::LoadWeight { .. } => Some(Track::LoadWeight),
        Op::LoadCache(_) => Some(Track::LoadCache),
        Op::LoadActivation(_) => Some(Track::LoadActivation),
        Op::StoreCache(_) => Some(Track::StoreCache),
        Op::StoreActivation(_) => Some(Track::StoreActivation),
        Op::Compute(_) | Op::ReleaseWeight { .. } => None,
    }
}

/// A submitted operation's result, to wait for.
pub(super) struct Pending(Receiver<Result<()>>);

impl Pending {
    /// Waits until the operation has run; a worker that panicked is an error.
    pub(super) fn wait(self) -> Result<()> {
        self.0.recv().unwrap_or_else(|_| Err(panicked()))
    }
}

fn panicked() -> Error {
    Error::invalid("executor", "an I/O thread panicked")
}

/// One thread per transfer track, each running its queue's operations in order.
pub(super) struct IoWorkers<'scope> {
    queues: Vec<Sender<Job>>,
    threads: Vec<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope> IoWorkers<'scope> {
    /// Starts the threads in `scope`; each runs `run(op)` for the operations of its track.
    pub(super) fn start<'env, F>(scope: &'scope Scope<'scope, 'env>, run: &'scope F) -> Self
    where
        F: Fn(Op) -> Result<()> + Sync,
    {
        let (mut queues, mut threads) = (Vec::new(), Vec::new());
        for _ in IO_TRACKS {
            let (tx, rx) = channel::<Job>();
            queues.push(tx);
            threads.push(scope.spawn(move || {
                for (op, done) in rx {
                    // the submitter may have stopped waiting (an earlier error): nothing to do
                    let _ = done.send(run(op));
                }
            }));
        }
        Self { queues, threads }
    }

    /// Queues `op` (a load or a store) on its track's thread.
    pub(super) fn submit(&self, op: Op) -> Pending {
        let (tx, rx) = channel();
        let queue = io_track(&op)
            .and_then(|t| IO_TRACKS.iter().position(|&u| u == t))
            .and_then(|i| self.queues.get(i));
        match queue {
            Some(q) => {
                // a send fails only when the track's thread has panicked: `wait` reports it
                let _ = q.send((op, tx));
            }
            None => {
                let _ = tx.send(Err(Error::invalid(
                    "executor",
                    format!("{op} is not a load or a store"),
                )));
            }
        }
        Pending(rx)
    }

    /// Lets the threads finish their queues and joins them; a thread that panicked is an error.
    pub(super) fn finish(mut self) -> Result<()> {
        self.queues.clear();
        let mut result = Ok(());
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                result = Err(panicked());
            }
        }
        result
    }
}

impl Drop for IoWorkers<'_> {
    /// Joins the threads on an early return too (their panics become errors, not the scope's).
    fn drop(&mut self) {
        self.queues.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A piece of a weight load for the reader threads.
pub(crate) type ReadJob<'env> = Box<dyn FnOnce() -> Result<()> + Send + 'env>;

/// Threads that share the reads of each weight load with the thread that runs it (the
/// profile's `io_threads` in all), started once per block instead of once per load.
pub(crate) struct Readers<'scope, 'env> {
    queue: Option<Sender<(ReadJob<'env>, Sender<Result<()>>)>>,
    threads: Vec<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope, 'env> Readers<'scope, 'env> {
    /// Starts `count` reader threads in `scope` (none: every read runs on the caller).
    pub(crate) fn start(scope: &'scope Scope<'scope, 'env>, count: usize) -> Self {
        if count == 0 {
            return Self {
                queue: None,
                threads: Vec::new(),
            };
        }
        let (tx, rx) = channel::<(ReadJob<'env>, Sender<Result<()>>)>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..count)
            .map(|_| {
                let rx = Arc::clone(&rx);
                scope.spawn(move || loop {
                    // the lock is held only while taking the next job
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((job, done)) = next else { break };
                    let _ = done.send(job());
                })
            })
            .collect();
        Self {
            queue: Some(tx),
            threads,
        }
    }

    /// Runs `jobs`, every `(readers + 1)`-th on the caller and the rest on the reader threads,
    /// and waits for all of them; the first error is returned.
    pub(crate) fn run_all(&self, jobs: Vec<ReadJob<'env>>) -> Result<()> {
        let Some(queue) = &self.queue else {
            return jobs.into_iter().try_for_each(|job| job());
        };
        let share = self.threads.len() + 1;
        let (mut mine, mut queued) = (Vec::new(), Vec::new());
        for (i, job) in jobs.into_iter().enumerate() {
            if i % share == 0 {
                mine.push(job);
            } else {
                let (tx, rx) = channel();
                // a send fails only when every reader has panicked: `wait` reports it
                let _ = queue.send((job, tx));
                queued.push(Pending(rx));
            }
        }
        let mut result = mine.into_iter().try_for_each(|job| job());
        for done in queued {
            let r = done.wait();
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

impl Drop for Readers<'_, '_> {
    fn drop(&mut self) {
        self.queue = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Cell;
    use std::sync::Mutex;

    fn cell(token: usize) -> Cell {
        Cell {
            token,
            unit: 0,
            batch: 0,
        }
    }

    #[test]
    fn a_tracks_operations_run_in_order_and_tracks_side_by_side() {
        let seen = Mutex::new(Vec::new());
        let run = |op: Op| -> Result<()> {
            if let Op::LoadCache(c) = op {
                if c.token == 3 {
                    return Err(Error::invalid("test", "load 3 failed"));
                }
            }
            seen.lock().unwrap().push(op);
            Ok(())
        };
        std::thread::scope(|s| {
            let workers = IoWorkers::start(s, &run);
            let loads: Vec<Pending> = (0..6)
                .map(|t| workers.submit(Op::LoadCache(cell(t))))
                .collect();
            let store = workers.submit(Op::StoreCache(cell(9)));
            let not_io = workers.submit(Op::Compute(cell(0)));
            let results: Vec<Result<()>> = loads.into_iter().map(Pending::wait).collect();
            assert!(store.wait().is_ok());
            assert!(not_io.wait().is_err());
            for (t, r) in results.iter().enumerate() {
                assert_eq!(r.is_err(), t == 3, "load {t}: {r:?}");
            }
            workers.finish().unwrap();
        });
        let seen = seen.into_inner().unwrap();
        let loads: Vec<usize> = seen
            .iter()
            .filter_map(|op| match op {
                Op::LoadCache(c) => Some(c.token),
                _ => None,
            })
            .collect();
        assert_eq!(loads, vec![0, 1, 2, 4, 5]);
        assert!(seen.contains(&Op::StoreCache(cell(9))));
    }

    #[test]
    fn a_panicking_operation_is_an_error_not_a_panic() {
        let run = |op: Op| -> Result<()> {
            if matches!(op, Op::StoreActivation(_)) {
                panic!("a store went wrong");
            }
            Ok(())
        };
        std::thread::scope(|s| {
            let workers = IoWorkers::start(s, &run);
            let bad = workers.submit(Op::StoreActivation(cell(0)));
            let after = workers.submit(Op::StoreActivation(cell(1)));
            let other = workers.submit(Op::LoadActivation(cell(0)));
            assert!(bad.wait().is_err());
            assert!(after.wait().is_err());
            assert!(other.wait().is_ok());
            assert!(workers.finish().is_err());
        });
    }
    #[test]
    fn readers_run_each_job_once_and_report_an_error() {
        for count in [0, 1, 3] {
            let ran = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                let readers = Readers::start(s, count);
                for round in 0..3 {
                    let jobs: Vec<ReadJob<'_>> = (0..7)
                        .map(|i| {
                            let ran = &ran;
                            Box::new(move || {
                                ran.lock().unwrap().push(round * 10 + i);
                                if round == 1 && i == 5 {
                                    Err(Error::invalid("test", "read 5 failed"))
                                } else {
                                    Ok(())
                                }
                            }) as ReadJob<'_>
                        })
                        .collect();
                    assert_eq!(
                        readers.run_all(jobs).is_err(),
                        round == 1,
                        "{count} readers"
                    );
                }
            });
            let mut ran = ran.into_inner().unwrap();
            ran.sort();
            // after an error the rest of a load may be skipped, but nothing runs twice
            let (failed, fine): (Vec<usize>, Vec<usize>) =
                ran.into_iter().partition(|&r| r / 10 == 1);
            let all: Vec<usize> = [0, 2]
                .into_iter()
                .flat_map(|r| (0..7).map(move |i| r * 10 + i))
                .collect();
            assert_eq!(fine, all, "{count} readers");
            assert!(failed.contains(&15), "{count} readers: {failed:?}");
            assert!(failed.windows(2).all(|w| w[0] < w[1]), "{failed:?}");
        }
    }
}
