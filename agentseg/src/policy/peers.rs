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

impl PeerGroup<'_, '_> {
    pub fn check(
        self,
        peers: &mut BTreeMap<String, Vec<IpNet>>,
        origins: &mut HashMap<String, Origin>,
        errors: &mut Vec<PolicyError>,
    ) {
        let src = self.src;
        let name = self.name.get_ref();
        if let Err(m) = parse::peer_group_name(name) {
            errors.push(src.error_at(&self.name, m));
            return;
        }
        if let Some(first) = origins.get(name) {
            errors.push(src.error_at(
                &self.name,
                format!("duplicate peer group {name:?}; first defined at {first}"),
            ));
            return;
        }
        origins.insert(name.clone(), origin(src, self.name.span().start));
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
        // Inserted even when partly invalid so that references to it do not add more errors.
        peers.insert(name.clone(), nets);
    }
}
