//! The coordinator's side of the worker processes: spawn them (the bench
//! re-executes itself with the hidden `worker` subcommand), send each a
//! command, gather one reply per worker while showing progress.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressBar;

use crate::wire::{Cmd, Msg, WorkerInit};

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
}

pub struct Fleet {
    workers: Vec<Worker>,
    rx: Receiver<(usize, Option<Msg>)>,
}

/// Split `total` as evenly as possible over `parts`.
pub fn share(total: usize, parts: usize, i: usize) -> usize {
    let parts = parts.max(1);
    total / parts + usize::from(i < total % parts)
}

/// Split `ips` into `parts` disjoint slices (shared round-robin if too few).
pub fn ip_slice(ips: &[IpAddr], parts: usize, i: usize) -> Vec<IpAddr> {
    if ips.is_empty() {
        return Vec::new();
    }
    if ips.len() < parts {
        return vec![ips[i % ips.len()]];
    }
    let start: usize = (0..i).map(|j| share(ips.len(), parts, j)).sum();
    ips[start..start + share(ips.len(), parts, i)].to_vec()
}

impl Fleet {
    /// Start one worker per init and wait until each is ready.
    pub fn spawn(inits: Vec<WorkerInit>) -> Result<Fleet> {
        let exe = std::env::current_exe().context("locating the presence-bench executable")?;
        let (tx, rx) = mpsc::channel();
        let mut workers = Vec::new();
        for (i, init) in inits.into_iter().enumerate() {
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {i}"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("worker {i} has no stdout"))?;
            let mut stdin = child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("worker {i} has no stdin"))?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Msg>(&line) {
                        Ok(m) => {
                            if tx.send((i, Some(m))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send((
                                i,
                                Some(Msg::Fatal {
                                    error: format!("bad reply {line:?}: {e}"),
                                }),
                            ));
                        }
                    }
                }
                let _ = tx.send((i, None));
            });
            let line = serde_json::to_string(&init)?;
            writeln!(stdin, "{line}").with_context(|| format!("sending init to worker {i}"))?;
            workers.push(Worker {
                child,
                stdin: Some(stdin),
            });
        }
        let mut fleet = Fleet { workers, rx };
        let hidden = ProgressBar::hidden();
        fleet.gather(&hidden, Duration::from_secs(20), |_| None)?;
        Ok(fleet)
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Send `cmd(i)` to every worker and gather one final reply from each.
    pub fn run(
        &mut self,
        pb: &ProgressBar,
        limit: Duration,
        cmd: impl Fn(usize) -> Cmd,
    ) -> Result<Vec<Msg>> {
        self.gather(pb, limit, |i| Some(cmd(i)))
    }

    fn gather(
        &mut self,
        pb: &ProgressBar,
        limit: Duration,
        cmd: impl Fn(usize) -> Option<Cmd>,
    ) -> Result<Vec<Msg>> {
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(c) = cmd(i) {
                let line = serde_json::to_string(&c)?;
                let stdin = w
                    .stdin
                    .as_mut()
                    .ok_or_else(|| anyhow!("worker {i} is closed"))?;
                writeln!(stdin, "{line}").with_context(|| format!("sending to worker {i}"))?;
                stdin.flush()?;
            }
        }
        let n = self.workers.len();
        let mut replies: Vec<Option<Msg>> = vec![None; n];
        let mut progress = vec![0u64; n];
        let deadline = Instant::now() + limit;
        while replies.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, msg) = match self.rx.recv_timeout(left) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    bail!("workers did not answer within {limit:?}")
                }
                Err(RecvTimeoutError::Disconnected) => bail!("all workers exited"),
            };
            match msg {
                None => {
                    if replies[i].is_none() {
                        bail!("worker {i} exited unexpectedly");
                    }
                }
                Some(Msg::Progress { done, .. }) => {
                    progress[i] = done;
                    pb.set_position(progress.iter().sum());
                }
                Some(Msg::Fatal { error }) => bail!("worker {i}: {error}"),
                Some(m) => replies[i] = Some(m),
            }
        }
        Ok(replies.into_iter().flatten().collect())
    }

    /// Close every agent politely and wait for the workers to exit.
    pub fn close(mut self) -> Result<()> {
        let r = self.gather(&ProgressBar::hidden(), Duration::from_secs(15), |_| {
            Some(Cmd::Close)
        });
        for w in &mut self.workers {
            w.stdin.take();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for w in &mut self.workers {
            loop {
                match w.child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        r.map(|_| ())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.stdin.take();
            if let Ok(None) = w.child.try_wait() {
                let _ = w.child.kill();
            }
            let _ = w.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_splits_evenly() {
        assert_eq!(
            (0..3).map(|i| share(10, 3, i)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!((0..2).map(|i| share(1, 2, i)).collect::<Vec<_>>(), [1, 0]);
    }

    #[test]
    fn ip_slices_are_disjoint() {
        let ips: Vec<IpAddr> = (2..=60u8).map(|d| IpAddr::from([127, 0, 0, d])).collect();
        let a = ip_slice(&ips, 2, 0);
        let b = ip_slice(&ips, 2, 1);
        assert_eq!(a.len() + b.len(), 59);
        assert!(a.iter().all(|ip| !b.contains(ip)));
        let one = vec![IpAddr::from([127, 0, 0, 1])];
        assert_eq!(ip_slice(&one, 3, 2), one);
        assert!(ip_slice(&[], 3, 2).is_empty());
    }
}
