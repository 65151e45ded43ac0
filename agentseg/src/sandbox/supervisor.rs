//! The launcher's seccomp supervisor: answers every refusal of the agent (and its
//! descendants) with `EPERM`, counts them per system call, and hands the counts to a reporter
//! at most once a second while there is something new, and once at the end.
//!
//! When the launcher is gone, its listener closes and the kernel fails the refused calls with
//! `ENOSYS` instead: still refused, no longer counted.
use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use libseccomp::{ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags};

/// Refusals since the last report: (system call, count), sorted by name.
pub type Counts = Vec<(String, u64)>;

/// Where counts go (the daemon, best effort; errors are the reporter's to swallow).
pub type Reporter = Box<dyn FnMut(Counts) + Send>;

const REPORT_EVERY: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(100);

pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    reporter: JoinHandle<()>,
}

impl Supervisor {
    pub fn start(listener: OwnedFd, report: Reporter) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Counts>();
        let reporter = std::thread::spawn(move || {
            let mut report = report;
            for counts in rx {
                report(counts);
            }
        });
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(&listener, &flag, &tx));
        Self {
            stop,
            thread,
            reporter,
        }
    }

    /// The agent's main process has exited: answer what is pending, report the rest, and
    /// wait for the last report to be sent.
    pub fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        let _ = self.reporter.join();
    }
}

fn serve(listener: &OwnedFd, stop: &AtomicBool, tx: &mpsc::Sender<Counts>) {
    let fd = listener.as_raw_fd();
    let mut pending: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_report = Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = if stopping { 0 } else { POLL.as_millis() as i32 };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if n > 0 && pfd.revents & libc::POLLIN != 0 {
            answer(fd, &mut pending);
        } else if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            break; // no process uses the filter any more
        } else if n == 0 && stopping {
            break; // nothing pending after the main process exited
        }
        if !pending.is_empty() && last_report.elapsed() >= REPORT_EVERY {
            let _ = tx.send(std::mem::take(&mut pending).into_iter().collect());
            last_report = Instant::now();
        }
    }
    if !pending.is_empty() {
        let _ = tx.send(pending.into_iter().collect());
    }
}

/// Receive one notification and refuse it.
fn answer(fd: i32, pending: &mut BTreeMap<String, u64>) {
    // ENOENT: the caller went away (killed or interrupted) after the notification was queued.
    let Ok(req) = ScmpNotifReq::receive(fd) else {
        return;
    };
    let resp = ScmpNotifResp::new_error(req.id, -libc::EPERM, ScmpNotifRespFlags::empty());
    // A failed answer means the caller is gone; it is counted all the same (it tried).
    let _ = resp.respond(fd);
    *pending
        .entry(super::seccomp::syscall_name(
            req.data.syscall.as_raw_syscall(),
        ))
        .or_default() += 1;
}
