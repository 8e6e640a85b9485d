//! The model job queue: a bounded queue and dedicated worker threads.
//!
//! Generation takes seconds of CPU; running it on the async runtime would
//! stall every other request. Jobs wait in a bounded queue instead, and a
//! full queue is answered at once (429) rather than letting latency grow
//! without bound. Shutdown closes the queue; workers finish what is queued.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The queue is full.
    Full,
    /// The daemon is shutting down.
    ShuttingDown,
}

/// Worker threads fed by a bounded queue.
pub struct ModelPool {
    sender: Mutex<Option<SyncSender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl ModelPool {
    /// Starts `workers` threads with room for `capacity` waiting jobs.
    pub fn start(workers: usize, capacity: usize, metrics: Arc<Metrics>) -> ModelPool {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..workers)
            .map(|i| {
                let rx = rx.clone();
                let metrics = metrics.clone();
                std::thread::Builder::new()
                    .name(format!("lethe-model-{i}"))
                    .spawn(move || loop {
                        let job = {
                            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                            guard.recv()
                        };
                        match job {
                            Ok(job) => {
                                metrics.queue_depth.dec();
                                metrics.in_flight_jobs.inc();
                                // A panicking job must not take the worker down.
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                                metrics.in_flight_jobs.dec();
                            }
                            Err(_) => break,
                        }
                    })
                    .unwrap_or_else(|e| panic!("cannot start model worker thread: {e}"))
            })
            .collect();
        ModelPool {
            sender: Mutex::new(Some(tx)),
            workers: Mutex::new(handles),
            closed: AtomicBool::new(false),
            metrics,
        }
    }

    /// Queues a job, or says why not.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Rejected> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Rejected::ShuttingDown);
        }
        let guard = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(Rejected::ShuttingDown);
        };
        self.metrics.queue_depth.inc();
        match tx.try_send(Box::new(job)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.metrics.queue_depth.dec();
                Err(Rejected::Full)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.queue_depth.dec();
                Err(Rejected::ShuttingDown)
            }
        }
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> i64 {
        self.metrics.queue_depth.get()
    }

    /// Stops taking jobs and waits (up to `grace`) for the workers to finish
    /// the queued ones.
    pub fn shutdown(&self, grace: Duration) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.sender.lock().unwrap_or_else(|p| p.into_inner()).take());
        let deadline = Instant::now() + grace;
        let handles: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn full_queue_rejects_and_shutdown_drains() {
        let metrics = Arc::new(Metrics::new());
        let pool = ModelPool::start(1, 2, metrics);
        let gate = Arc::new(Mutex::new(()));
        let hold = gate.lock().unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let mut accepted = 0;
        let mut rejected = 0;
        for _ in 0..6 {
            let gate = gate.clone();
            let done = done.clone();
            match pool.submit(move || {
                let _g = gate.lock().unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }) {
                Ok(()) => accepted += 1,
                Err(Rejected::Full) => rejected += 1,
                Err(Rejected::ShuttingDown) => panic!("not shutting down"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // One running (blocked on the gate) plus two queued.
        assert_eq!(accepted, 3);
        assert_eq!(rejected, 3);
        drop(hold);
        pool.shutdown(Duration::from_secs(5));
        assert_eq!(
            done.load(Ordering::SeqCst),
            3,
            "queued jobs finish on shutdown"
        );
        assert_eq!(pool.submit(|| {}), Err(Rejected::ShuttingDown));
    }

    #[test]
    fn a_panicking_job_does_not_kill_the_worker() {
        let pool = ModelPool::start(1, 4, Arc::new(Metrics::new()));
        pool.submit(|| panic!("boom")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        pool.submit(move || tx.send(42).unwrap()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
        pool.shutdown(Duration::from_secs(1));
    }
}
