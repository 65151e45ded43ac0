//! The bpf(2) commands aya 0.14 keeps private or lacks: open and pin objects, create, update and
//! inspect cgroup links, batch map writes, and load a sock_addr program with an attach type
//! aya does not know (the AF_UNIX hooks).
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf(BPF_OBJ_GET)`: a descriptor for the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // obj_get: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    attr.call(BPF_OBJ_GET).map(owned)
}

/// `bpf(BPF_LINK_UPDATE)`: make `link` run `prog` instead, atomically (no detached instant).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // link_update: link_fd (u32), new_prog_fd (u32), flags (u32), old_prog_fd (u32).
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, prog.as_raw_fd() as u32);
    attr.call(BPF_LINK_UPDATE).map(drop)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` for the batch commands (`struct { in_batch, out_batch, keys, values,
/// count, map_fd, elem_flags, flags }`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf(BPF_MAP_UPDATE_BATCH)`: insert `keys.len() / key_size` entries in one call (aya 0.14
/// has no batch API; one syscall per entry made a 100k-prefix policy take a second).
/// `keys` and `values` are the packed arrays; returns how many were written.
pub fn update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> io::Result<usize> {
    batch(BPF_MAP_UPDATE_BATCH, map, keys, Some(values), count)
}

/// `bpf(BPF_MAP_DELETE_BATCH)`: delete `count` packed keys in one call.
pub fn delete_batch(map: BorrowedFd<'_>, keys: &[u8], count: usize) -> io::Result<usize> {
    batch(BPF_MAP_DELETE_BATCH, map, keys, None, count)
}

/// `bpf(BPF_MAP_LOOKUP_BATCH)` over a whole hash map, `chunk` entries per call: `each` gets
/// every packed key and value (a per-CPU map's value is one slot per possible CPU, each
/// rounded up to 8 bytes). Reads a map of 16k entries in a few dozen calls instead of 32k.
pub fn lookup_all(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: usize,
    each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    // The hash map's position token is a bucket index (u32); 8 bytes are ample.
    lookup_batched(map, key_size, value_size, 8, chunk, each)
}

/// The same over a map whose batch position is a key (maps without batch operations of their
/// own: the kernel's generic walk by `get_next_key`, e.g. LPM tries).
pub fn lookup_all_by_key(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: usize,
    each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    lookup_batched(map, key_size, value_size, key_size, chunk, each)
}

/// `BPF_MAP_LOOKUP_BATCH` until the end of the map, with a position token of `token_size`
/// bytes handed back to the kernel each call.
fn lookup_batched(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    token_size: usize,
    chunk: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    let mut keys = vec![0u8; key_size * chunk];
    let mut values = vec![0u8; value_size * chunk];
    let (mut token_in, mut token_out) = (vec![0u8; token_size], vec![0u8; token_size]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the buffers hold `chunk` keys and values and the tokens what the map's batch
        // position needs, and outlive the call; the kernel writes at most that much.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        for i in 0..n {
            each(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
        }
        match err {
            None => {}
            // The end of the map (the last chunk may still carry entries, handled above).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

fn batch(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> io::Result<usize> {
    if count == 0 {
        return Ok(0);
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: u32::try_from(count).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr points at `count` packed keys (and values) that outlive the call; the
    // kernel reads them and writes back `count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.count as usize)
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// `union bpf_attr` for the element commands (`map_fd`, `key`, `value`, `flags`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf(BPF_MAP_UPDATE_ELEM)` with a packed key and value (the batch fallback).
pub fn update_elem(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    elem(BPF_MAP_UPDATE_ELEM, map, key, Some(value))
}

/// `bpf(BPF_MAP_DELETE_ELEM)` with a packed key (the batch fallback).
pub fn delete_elem(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    elem(BPF_MAP_DELETE_ELEM, map, key, None)
}

fn elem(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: &[u8],
    value: Option<&[u8]>,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.map_or(0, |v| v.as_ptr() as u64),
        ..Default::default()
    };
    // SAFETY: attr points at a key (and value) of the map's sizes that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;

/// A zeroed `union bpf_attr` large enough for every command used here; the kernel checks that
/// bytes it does not know are zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    fn call(&mut self, cmd: libc::c_long) -> io::Result<libc::c_long> {
        // SAFETY: the attr buffer outlives the call and every pointer stored in it points at
        // memory the caller keeps alive across it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                std::mem::size_of::<Attr>(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a fresh descriptor that we now own.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `bpf(BPF_LINK_CREATE)` for a cgroup: attach `prog` to the cgroup open as `cgroup` with
/// `attach_type` as a link (coexisting with every other program on the cgroup).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    // link_create: prog_fd, target_fd, attach_type, flags.
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, cgroup.as_raw_fd() as u32);
    attr.put_u32(8, attach_type);
    attr.call(BPF_LINK_CREATE).map(owned)
}

/// `bpf(BPF_LINK_DETACH)`: detach a link now (a link merely unpinned and closed is freed
/// later, from a workqueue).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.call(BPF_LINK_DETACH).map(drop)
}

/// `bpf(BPF_OBJ_PIN)`: pin the object behind `fd` at `path` (on a bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // obj_pin: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    attr.put_u32(8, fd.as_raw_fd() as u32);
    attr.call(BPF_OBJ_PIN).map(drop)
}

/// What the kernel says about a cgroup link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the link was detached (`bpftool link detach`, the cgroup removed).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// `bpf(BPF_OBJ_GET_INFO_BY_FD)` on a cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) cgroup { cgroup_id, attach_type }.
    let mut info = [0u8; 64];
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, info.len() as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    attr.call(BPF_OBJ_GET_INFO_BY_FD)?;
    let u32_at =
        |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&info[16..24]);
    Ok(CgroupLinkInfo {
        link_id: u32_at(4),
        prog_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(id),
        attach_type: u32_at(24),
    })
}

/// `bpf(BPF_PROG_LOAD)` of a cgroup sock_addr program with an explicit expected attach type
/// (the AF_UNIX hooks, which aya 0.14 cannot load). On a verifier refusal the error carries
/// the verifier's log.
pub fn prog_load_sock_addr(
    name: &str,
    insns: &[u8],
    expected_attach_type: u32,
    license: &std::ffi::CStr,
) -> io::Result<OwnedFd> {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const INSN_SIZE: usize = 8;
    let mut log = vec![0u8; 1 << 20];
    let mut prog_name = [0u8; 16];
    for (dst, src) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src;
    }
    let attempt = |log_level: u32, log: &mut [u8]| {
        // prog_load: prog_type(0), insn_cnt(4), insns(8), license(16), log_level(24),
        // log_size(28), log_buf(32), kern_version(40), prog_flags(44), prog_name(48..64),
        // prog_ifindex(64), expected_attach_type(68).
        let mut attr = Attr::new();
        attr.put_u32(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR);
        attr.put_u32(4, (insns.len() / INSN_SIZE) as u32);
        attr.put_u64(8, insns.as_ptr() as u64);
        attr.put_u64(16, license.as_ptr() as u64);
        if log_level != 0 {
            attr.put_u32(24, log_level);
            attr.put_u32(28, log.len() as u32);
            attr.put_u64(32, log.as_mut_ptr() as u64);
        }
        attr.0[48..64].copy_from_slice(&prog_name);
        attr.put_u32(68, expected_attach_type);
        attr.call(BPF_PROG_LOAD).map(owned)
    };
    match attempt(0, &mut log) {
        Ok(fd) => Ok(fd),
        Err(first) => match attempt(1, &mut log) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                Err(io::Error::new(
                    first.kind(),
                    format!(
                        "{first}; verifier log (last lines):\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ),
                ))
            }
        },
    }
}
