//! The fallback backend: worker threads that take jobs from a channel and fill them with
//! `pread`, for where io_uring is refused.
//!
//! There is one worker per place in the queue, so `queue_depth` reads can block in the kernel at
//! once, as they would in flight on a ring. Shutting down closes the channel; each worker
//! finishes the jobs already queued before it exits, so no buffer is freed under a running read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use crate::job::{Job, Step};

pub(crate) struct PreadWorkers {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl PreadWorkers {
    pub(crate) fn start(file: Arc<File>, workers: usize) -> io::Result<PreadWorkers> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = PreadWorkers { jobs: Some(tx), threads: Vec::with_capacity(workers) };
        for i in 0..workers {
            let (file, rx) = (Arc::clone(&file), Arc::clone(&rx));
            let handle =
                thread::Builder::new().name(format!("strata-nvme-pread-{i}")).spawn(move || work(&file, &rx))?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// Queues a job. A closed channel (every worker gone) drops the job, which fails its ticket.
    pub(crate) fn submit(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // On a send error the job comes back inside the error and is dropped here.
            let _ = jobs.send(job);
        }
    }
}

impl Drop for PreadWorkers {
    fn drop(&mut self) {
        self.jobs = None;
        for handle in self.threads.drain(..) {
            // A worker that panicked already dropped (and so failed) the job it held.
            let _ = handle.join();
        }
    }
}

fn work(file: &File, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match next {
            Ok(job) => run(file, job),
            Err(_) => return,
        }
    }
}

/// Reads a job to completion, resubmitting after short reads.
fn run(file: &File, mut job: Job) {
    loop {
        let (offset, dst, len) = job.next_chunk();
        // SAFETY: `dst..dst + len` lies inside the job's pool buffer (see `Job::next_chunk`),
        // which the job owns exclusively until it finishes: no other reference to those bytes
        // exists while this slice lives, and the buffer outlives the job.
        let chunk = unsafe { std::slice::from_raw_parts_mut(dst, len) };
        let n = match file.read_at(chunk, offset) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return job.fail_os(e),
        };
        match job.advance(n) {
            Step::Done => return job.succeed(),
            Step::More => {}
            Step::Eof => return job.fail_eof(),
        }
    }
}
