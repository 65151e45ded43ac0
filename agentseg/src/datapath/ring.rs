//! The event ring buffer's reader: an async task that copies records out of `AS_EVENTS` (a
//! decision, or an AF_UNIX decision with its address, told apart by size) and hands them on
//! in batches. It only copies: naming and judging happen on the engine thread.
use agentseg_common::{Event, UNIX_PATH_LEN, UnixEvent};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tracing::warn;

/// Records handed on at once.
const BATCH: usize = 4096;

/// The ring buffer, taken out of the datapath for its reader ([`super::Datapath::take_events`]).
pub struct EventRing(pub(super) RingBuf<MapData>);

/// One record as the kernel wrote it.
#[derive(Debug, Clone)]
pub struct KernelRecord {
    pub event: Event,
    /// The AF_UNIX address as text: a path, or `@name` for an abstract name.
    pub unix: Option<String>,
}

/// An AF_UNIX address as operators write it: the path, or `@` + the abstract name (bytes
/// that are not printable shown as `\xNN`).
fn unix_address(path: &[u8; UNIX_PATH_LEN], len: u32) -> String {
    let len = (len as usize).min(UNIX_PATH_LEN);
    let (prefix, bytes) = match path.first() {
        Some(0) => ("@", &path[1..len.max(1)]),
        _ => {
            let end = path[..len].iter().position(|&b| b == 0).unwrap_or(len);
            ("", &path[..end])
        }
    };
    let mut out = String::from(prefix);
    for &b in bytes {
        if b.is_ascii_graphic() || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Copy records out of the ring buffer and hand them on in batches (`wrap` makes the channel's
/// message of one batch). Returns when the channel closes or the ring fails.
pub async fn read_ring<T>(ring: EventRing, tx: mpsc::Sender<T>, wrap: fn(Vec<KernelRecord>) -> T) {
    let EventRing(ring) = ring;
    // SAFETY: the ring buffer owns its descriptor and lives inside the AsyncFd until both go.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return warn!("event ring buffer: {e}; no events will be read"),
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let mut batch = Vec::new();
        {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<UnixEvent>() {
                    // SAFETY: the kernel wrote a `UnixEvent` (repr(C), plain integers) here;
                    // the length is checked and the read is unaligned-safe.
                    let u = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<UnixEvent>()) };
                    batch.push(KernelRecord {
                        event: u.event,
                        unix: Some(unix_address(&u.path, u.path_len)),
                    });
                } else if item.len() >= std::mem::size_of::<Event>() {
                    // SAFETY: as above, for an `Event`.
                    let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
                    batch.push(KernelRecord { event, unix: None });
                }
                if batch.len() >= BATCH {
                    break;
                }
            }
        }
        if batch.len() < BATCH {
            guard.clear_ready();
        }
        drop(guard);
        if !batch.is_empty() && tx.send(wrap(batch)).await.is_err() {
            return;
        }
    }
}
