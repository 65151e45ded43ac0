//! The raw loader of the AF_UNIX hooks. aya 0.14 has no attach type for `cgroup/connect_unix`
//! and `sendmsg_unix` (BPF_CGROUP_UNIX_CONNECT = 49, BPF_CGROUP_UNIX_SENDMSG = 50), so they
//! live in a second object whose sections say `cgroup/connect4`/`sendmsg4`: aya-obj (the
//! parser and relocator aya itself uses) reads and relocates it against the maps the main
//! object already opened, and `BPF_PROG_LOAD` is issued here with the real attach types.
use std::{
    collections::{HashMap, HashSet},
    os::fd::{OwnedFd, RawFd},
};

use agentseg_common::prog_names;

use super::{DatapathError, sys};

/// The AF_UNIX object built by `build.rs` (empty when the eBPF build was skipped).
pub(super) static UNIX_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentseg-unix"));

pub const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
pub const BPF_CGROUP_UNIX_SENDMSG: u32 = 50;

/// One AF_UNIX program, relocated and ready for `BPF_PROG_LOAD`.
pub struct UnixProgram {
    pub name: &'static str,
    attach_type: u32,
    insns: Vec<aya_obj::generated::bpf_insn>,
    license: std::ffi::CString,
}

impl UnixProgram {
    /// Load (verify) it: returns the program's fd.
    pub fn load(&self) -> Result<OwnedFd, DatapathError> {
        // SAFETY: bpf_insn is a plain 8-byte repr(C) struct; the slice covers exactly the
        // vector's initialised elements.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.insns.as_ptr().cast::<u8>(),
                std::mem::size_of_val(self.insns.as_slice()),
            )
        };
        sys::prog_load_sock_addr(self.name, bytes, self.attach_type, &self.license)
            .map_err(|e| DatapathError::Unix(format!("loading {}: {e}", self.name)))
    }
}

/// Parse and relocate both AF_UNIX programs; `maps` holds the descriptor of every map of the
/// main object by name (the programs share its maps). Loading is left to the caller, so that
/// each program can be verified on a thread of its own.
pub fn prepare(maps: &HashMap<String, RawFd>) -> Result<Vec<UnixProgram>, DatapathError> {
    if UNIX_OBJECT.is_empty() {
        return Err(DatapathError::NoObject);
    }
    let bad = |what: String| DatapathError::Unix(what);
    let mut obj = aya_obj::Object::parse(UNIX_OBJECT)
        .map_err(|e| bad(format!("parsing the AF_UNIX object: {e}")))?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let defs: Vec<(String, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(name, map)| (name.clone(), map.clone()))
        .collect();
    let mut refs = Vec::with_capacity(defs.len());
    for (name, def) in &defs {
        let fd = maps.get(name).ok_or_else(|| {
            bad(format!(
                "the AF_UNIX object uses map {name}, which the main object lacks"
            ))
        })?;
        refs.push((name.as_str(), *fd, def));
    }
    obj.relocate_maps(refs.into_iter(), &text_sections)
        .map_err(|e| bad(format!("relocating the AF_UNIX object's maps: {e}")))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| bad(format!("relocating the AF_UNIX object's calls: {e}")))?;
    let mut out = Vec::new();
    for (name, attach_type) in [
        (prog_names::CONNECT_UNIX, BPF_CGROUP_UNIX_CONNECT),
        (prog_names::SENDMSG_UNIX, BPF_CGROUP_UNIX_SENDMSG),
    ] {
        let prog = obj
            .programs
            .get(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let function = obj
            .functions
            .get(&prog.function_key())
            .ok_or(DatapathError::MissingProgram(name))?;
        out.push(UnixProgram {
            name,
            attach_type,
            insns: function.instructions.clone(),
            license: prog.license.clone(),
        });
    }
    Ok(out)
}
