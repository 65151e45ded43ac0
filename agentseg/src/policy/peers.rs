//! `[peers.NAME]` groups: checked before any segment, since a segment in any file may use
//! a group defined in another.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use toml::Spanned;

use super::Origin;
use super::error::{PolicyError, Source};
use super::parse;
use super::raw::RawPeer;
use super::validate::origin;

pub(super) struct PeerGroup<'s, 'a> {
    pub src: &'s Source<'a>,
    pub name: Spanned<String>,
    pub raw: Spanned<RawPeer>,
}

/// A group as its own file defines it: what can be checked without the other files.
#[derive(Debug, Clone)]
pub(super) struct CheckedGroup {
    pub name: String,
    /// Where the name is written (a duplicate is reported there).
    pub at: PolicyError,
    pub origin: Origin,
    /// Its valid CIDRs (an invalid one is an error in the file's own list).
    pub nets: Vec<IpNet>,
}

impl PeerGroup<'_, '_> {
    /// Checks the name and the CIDRs; `None` when the name itself is invalid.
    pub fn check(self, errors: &mut Vec<PolicyError>) -> Option<CheckedGroup> {
        let src = self.src;
        let name = self.name.get_ref();
        if let Err(m) = parse::peer_group_name(name) {
            errors.push(src.error_at(&self.name, m));
            return None;
        }
        let mut nets = Vec::new();
        match &self.raw.get_ref().cidrs {
            None => errors.push(src.error_at(&self.raw, "peer group has no `cidrs`")),
            Some(list) if list.get_ref().is_empty() => {
                errors.push(src.error_at(list, "`cidrs` of a peer group must not be empty"));
            }
            Some(list) => {
                for c in list.get_ref() {
                    if c.get_ref().starts_with('@') {
                        errors.push(src.error_at(
                            c,
                            "peer groups cannot reference other groups; list the CIDRs",
                        ));
                        continue;
                    }
                    match parse::cidr(c.get_ref()) {
                        Ok(n) => nets.push(n),
                        Err(m) => errors.push(src.error_at(c, m)),
                    }
                }
            }
        }
        Some(CheckedGroup {
            name: name.clone(),
            at: src.error_at(&self.name, ""),
            origin: origin(src, self.name.span().start),
            nets,
        })
    }
}

/// Adds `group` to the directory's groups unless another file defined it first. Inserted
/// even when partly invalid so that references to it do not add more errors.
pub(super) fn merge(
    group: &CheckedGroup,
    peers: &mut BTreeMap<String, Vec<IpNet>>,
    origins: &mut HashMap<String, Origin>,
    errors: &mut Vec<PolicyError>,
) {
    if let Some(first) = origins.get(&group.name) {
        let mut e = group.at.clone();
        e.message = format!(
            "duplicate peer group {:?}; first defined at {first}",
            group.name
        );
        errors.push(e);
        return;
    }
    origins.insert(group.name.clone(), group.origin.clone());
    peers.insert(group.name.clone(), group.nets.clone());
}
