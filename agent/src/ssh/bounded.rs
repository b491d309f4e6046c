//! Reading a command off the async workers, with a deadline, and with a
//! bound on reads that never came back. A blocking thread cannot be
//! stopped: a command that sends the parser into an endless loop (fuzzing
//! found such inputs in brush-parser; the known ones are refused before it)
//! keeps one core busy for good. One such read is an incident; letting a
//! workload start them over and over would take the host. Once `limit` are
//! stuck, every later command is refused until they finish: fail closed.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

pub struct Bounded {
    stuck: Arc<AtomicUsize>,
    limit: usize,
    deadline: Duration,
}

/// Why a bounded read gave no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// It took longer than the deadline (and is now counted as stuck).
    TooLong,
    /// Earlier reads are still stuck; nothing new is started.
    Saturated { stuck: usize },
}

impl Refused {
    pub fn message(&self) -> String {
        match self {
            Refused::TooLong => "the command took too long to read; it is refused".into(),
            Refused::Saturated { stuck } => format!(
                "cordon is still reading {stuck} earlier command(s) that never finished parsing; every command is \
                 refused until they do (see the agent log; restart the agent to clear them)"
            ),
        }
    }
}

impl Bounded {
    pub fn new(limit: usize, deadline: Duration) -> Self {
        Self { stuck: Arc::new(AtomicUsize::new(0)), limit, deadline }
    }

    pub fn stuck(&self) -> usize {
        self.stuck.load(Ordering::SeqCst)
    }

    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Refused> {
        let stuck = self.stuck();
        if stuck >= self.limit {
            return Err(Refused::Saturated { stuck });
        }
        // Whoever sets `done` first decides: the work finishing in time, or
        // the deadline passing (which counts it stuck until it finishes).
        let done = Arc::new(AtomicBool::new(false));
        let (flag, counter) = (done.clone(), self.stuck.clone());
        let task = tokio::task::spawn_blocking(move || {
            let out = work();
            if flag.swap(true, Ordering::SeqCst) {
                counter.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("a command read that overran its deadline has finished");
            }
            out
        });
        match tokio::time::timeout(self.deadline, task).await {
            Ok(Ok(out)) => Ok(out),
            // The work panicked: nothing is stuck, and nothing was read.
            Ok(Err(_)) => Err(Refused::TooLong),
            Err(_) => {
                if !done.swap(true, Ordering::SeqCst) {
                    let now = self.stuck.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::error!(stuck = now, "a command read overran {:?} and is still running", self.deadline);
                }
                Err(Refused::TooLong)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overruns_are_counted_until_they_finish_and_saturation_refuses() {
        let b = Bounded::new(2, Duration::from_millis(50));
        assert_eq!(b.run(|| 7).await, Ok(7));
        let slow = || std::thread::sleep(Duration::from_millis(400));
        assert_eq!(b.run(slow).await, Err(Refused::TooLong));
        assert_eq!(b.run(slow).await, Err(Refused::TooLong));
        assert_eq!(b.stuck(), 2);
        // Saturated: even a fast read is refused, without being started.
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        assert_eq!(b.run(move || s.store(true, Ordering::SeqCst)).await, Err(Refused::Saturated { stuck: 2 }));
        assert!(!started.load(Ordering::SeqCst));
        // When the stuck reads finish, reading resumes.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(b.stuck(), 0);
        assert_eq!(b.run(|| 8).await, Ok(8));
    }
}
