//! The two bpf(2) commands aya 0.14 keeps private: open a pinned object, swap a link's program.
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
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32), path_fd (s32).
    let mut attr = [0u64; 3];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: attr lives across the call; the kernel reads 24 bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpf(BPF_LINK_UPDATE)`: make `link` run `prog` instead, atomically (no detached instant).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // link_update: link_fd (u32), new_prog_fd (u32), flags (u32), old_prog_fd (u32).
    let mut attr = [0u32; 4];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    // SAFETY: attr lives across the call; the kernel reads 16 bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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
