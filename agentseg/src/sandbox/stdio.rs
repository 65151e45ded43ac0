//! Descriptors 0-2 of the agent. A socket there was made outside the pen and would be judged
//! as its creator's: the agent gets a pipe instead, and the launcher relays between the two
//! (one thread per relayed descriptor, copying until EOF).
use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::mpsc,
    time::{Duration, Instant},
};

/// Relays planned before the fork.
pub struct Stdio {
    /// What the child puts on 0, 1, 2 (`None`: keep the inherited descriptor).
    pub child: [Option<OwnedFd>; 3],
    /// Per relayed descriptor: (source, sink) for the launcher's copy thread.
    relays: Vec<(File, File, bool)>,
}

/// Make sure 0-2 are open (on /dev/null if not): anything the launcher opens later must never
/// land there and reach the agent as its stdio.
pub fn ensure_open() -> io::Result<()> {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: a static C string; open takes the lowest free descriptor, `fd` itself.
            let got = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            if got != fd {
                return Err(io::Error::other(format!(
                    "descriptor {fd} was closed and could not be reopened on /dev/null"
                )));
            }
        }
    }
    Ok(())
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0) && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn dup(fd: RawFd) -> io::Result<File> {
    // SAFETY: duplicating an open descriptor into one we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { File::from_raw_fd(new) })
}

impl Stdio {
    /// Plan the replacement of every socket on 0-2.
    pub fn prepare() -> io::Result<Self> {
        let mut child: [Option<OwnedFd>; 3] = [None, None, None];
        let mut relays = Vec::new();
        for fd in 0..3 {
            if !is_socket(fd) {
                continue;
            }
            let (read, write) = pipe()?;
            let ours = dup(fd)?;
            if fd == 0 {
                child[0] = Some(read.into());
                relays.push((ours, write, false));
            } else {
                child[fd as usize] = Some(write.into());
                relays.push((read, ours, true));
            }
        }
        Ok(Self { child, relays })
    }

    /// Descriptors 0-2 that get replaced, for a message.
    pub fn replaced(&self) -> Vec<RawFd> {
        (0..3)
            .filter(|i| self.child[*i].is_some())
            .map(|i| i as RawFd)
            .collect()
    }

    /// Raw numbers for the child plan.
    pub fn raw(&self) -> [Option<RawFd>; 3] {
        [0, 1, 2].map(|i| self.child[i].as_ref().map(|f| f.as_raw_fd()))
    }

    /// After the fork: close the child's ends here and start copying. The returned handle
    /// waits for the output relays.
    pub fn start(self) -> Relays {
        drop(self.child);
        let (tx, rx) = mpsc::channel();
        let mut outputs = 0;
        for (mut from, mut to, output) in self.relays {
            let tx = tx.clone();
            outputs += usize::from(output);
            std::thread::spawn(move || {
                let _ = copy(&mut from, &mut to);
                drop(to); // EOF for the reader of an input relay
                if output {
                    let _ = tx.send(());
                }
            });
        }
        Relays { rx, outputs }
    }
}

fn copy(from: &mut File, to: &mut File) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

/// The running relays.
pub struct Relays {
    rx: mpsc::Receiver<()>,
    outputs: usize,
}

impl Relays {
    /// Wait until the agent's output pipes reach EOF, at most `grace` (a process the agent
    /// left behind may keep them open; its later output is then lost).
    pub fn finish(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for _ in 0..self.outputs {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.rx.recv_timeout(left).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_recognised_and_pipes_are_not() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(is_socket(a.as_raw_fd()));
        let (r, _w) = pipe().unwrap();
        assert!(!is_socket(r.as_raw_fd()));
    }

    #[test]
    fn a_relay_copies_until_eof() {
        let (mut r1, w1) = pipe().unwrap();
        let (r2, mut w2) = pipe().unwrap();
        let relays = Stdio {
            child: [None, None, None],
            relays: vec![(r2, w1, true)],
        }
        .start();
        w2.write_all(b"hello").unwrap();
        drop(w2);
        relays.finish(Duration::from_secs(5));
        let mut got = String::new();
        r1.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
    }
}
