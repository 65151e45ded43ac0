//! `[[egress]]` and `[[ingress]]` rules: `cidrs` (with `@group` references), `except`, `fqdns`
//! (egress only), `ports` and `protocol`, every problem reported at its entry.

use ipnet::IpNet;
use toml::Spanned;

use super::error::Source;
use super::local;
use super::parse::{self, CidrEntry};
use super::raw::RawRule;
use super::validate::{Ctx, origin};
use super::{Fqdn, Position, Positions, Protocol, Rule};

impl Ctx<'_> {
    /// `[[egress]]` (`positions` given: where ports and names are written is recorded for
    /// the warnings) or `[[ingress]]` rules.
    pub(super) fn rules(
        &mut self,
        src: &Source<'_>,
        raw: Option<Vec<Spanned<RawRule>>>,
        mut positions: Option<&mut Positions>,
    ) -> Vec<Rule> {
        raw.unwrap_or_default()
            .into_iter()
            .map(|r| {
                let egress = positions.is_some();
                let (rule, ports, fqdns) = self.rule(src, r, egress);
                if let Some(p) = positions.as_deref_mut() {
                    p.egress_ports.push(ports);
                    p.egress_fqdns.push(fqdns);
                }
                rule
            })
            .collect()
    }

    /// One rule, with the positions of its parsed `ports` entries and of its names.
    fn rule(
        &mut self,
        src: &Source<'_>,
        raw: Spanned<RawRule>,
        egress: bool,
    ) -> (Rule, Vec<Position>, Vec<Position>) {
        let start = raw.span().start;
        let raw = raw.into_inner();
        let protocol = match &raw.protocol {
            None => Some(Protocol::Any),
            Some(p) => parse::protocol(p.get_ref())
                .map_err(|e| self.errors.push(src.error_at(p, e)))
                .ok(),
        };

        let (fqdns, fqdn_positions) = match &raw.fqdns {
            Some(list) if !egress => {
                let msg = "`fqdns` is only for [[egress]] rules: an ingress rule names its peers \
                           by address, in `cidrs`";
                self.errors.push(src.error_at(list, msg));
                (Vec::new(), Vec::new())
            }
            Some(list) if list.get_ref().is_empty() => {
                let msg = "`fqdns` must not be empty; omit the key for a rule with only `cidrs`";
                self.errors.push(src.error_at(list, msg));
                (Vec::new(), Vec::new())
            }
            Some(list) => self.fqdn_list(src, list.get_ref()),
            None => (Vec::new(), Vec::new()),
        };

        let mut cidrs: Vec<IpNet> = Vec::new();
        let mut cidrs_ok = false;
        match &raw.cidrs {
            // An ingress rule with `fqdns` already has its error.
            None if raw.fqdns.is_some() => {}
            None if egress => self.errors.push(src.error(
                start,
                "rule has no `cidrs` and no `fqdns`; use cidrs = [\"0.0.0.0/0\", \"::/0\"] to \
                 mean everywhere, or fqdns = [\"api.example.com\"] for names",
            )),
            None => self.errors.push(src.error(
                start,
                "rule has no `cidrs`; use [\"0.0.0.0/0\", \"::/0\"] to mean everywhere",
            )),
            Some(list) if list.get_ref().is_empty() => {
                self.errors
                    .push(src.error_at(list, "`cidrs` must not be empty"));
            }
            Some(list) => (cidrs, cidrs_ok) = self.cidr_list(src, list.get_ref()),
        }

        let mut except = Vec::new();
        if let (Some(list), None, Some(_)) = (&raw.except, &raw.cidrs, &raw.fqdns) {
            let msg = "`except` needs `cidrs`: it carves addresses out of the rule's cidrs, \
                       not out of what its names resolve to";
            self.errors.push(src.error_at(list, msg));
        }
        for e in raw.except.iter().flat_map(|l| l.get_ref()) {
            if e.get_ref().starts_with('@') {
                let msg = "peer group references are only allowed in `cidrs`, not in `except`";
                self.errors.push(src.error_at(e, msg));
                continue;
            }
            match parse::cidr(e.get_ref()) {
                // Only judged against fully valid cidrs, to avoid a follow-on error.
                Ok(n) if cidrs_ok && !cidrs.iter().any(|c| c.contains(&n)) => {
                    let msg = format!("except {n} is not inside any of the rule's cidrs");
                    self.errors.push(src.error_at(e, msg));
                }
                Ok(n) => except.push(n),
                Err(m) => self.errors.push(src.error_at(e, m)),
            }
        }
        dedup_in_order(&mut except);

        let mut ports = Vec::new();
        let mut port_positions = Vec::new();
        if let Some(list) = &raw.ports {
            if list.get_ref().is_empty() {
                let msg = "`ports` must not be empty; omit the key to allow all ports";
                self.errors.push(src.error_at(list, msg));
            }
            if let Some(Err(msg)) = protocol.map(parse::ports_allowed) {
                self.errors.push(src.error_at(list, msg));
            }
            for p in list.get_ref() {
                match parse::port_entry(p.get_ref()) {
                    Ok(r) => {
                        ports.push(r);
                        port_positions.push(local::position(src, p));
                    }
                    Err(m) => self.errors.push(src.error_at(p, m)),
                }
            }
        }

        let rule = Rule {
            cidrs,
            except,
            fqdns,
            ports,
            protocol: protocol.unwrap_or_default(),
            origin: origin(src, start),
        };
        (rule, port_positions, fqdn_positions)
    }

    /// Entries of `fqdns`, duplicates dropped keeping the first, with where each is written.
    fn fqdn_list(
        &mut self,
        src: &Source<'_>,
        list: &[Spanned<String>],
    ) -> (Vec<Fqdn>, Vec<Position>) {
        let mut names: Vec<Fqdn> = Vec::new();
        let mut positions = Vec::new();
        for entry in list {
            match Fqdn::parse(entry.get_ref()) {
                Ok(name) if names.contains(&name) => {}
                Ok(name) => {
                    names.push(name);
                    positions.push(local::position(src, entry));
                }
                Err(m) => self.errors.push(src.error_at(entry, m)),
            }
        }
        (names, positions)
    }

    /// Entries of `cidrs` or `[quarantine] allow`: prefixes, bare addresses and `@group`
    /// references (expanded), duplicates dropped keeping the first. The flag is false when any
    /// entry was rejected.
    pub(super) fn cidr_list(
        &mut self,
        src: &Source<'_>,
        list: &[Spanned<String>],
    ) -> (Vec<IpNet>, bool) {
        let mut nets = Vec::new();
        let mut ok = true;
        for c in list {
            match parse::cidr_entry(c.get_ref()) {
                Ok(CidrEntry::Net(n)) => nets.push(n),
                Ok(CidrEntry::Group(g)) => match self.peers.get(g) {
                    Some(group) => nets.extend(group),
                    None => {
                        ok = false;
                        // Quoted with escapes: the name is the user's text (one error, one line).
                        let msg = format!("unknown peer group {:?}", format!("@{g}"));
                        self.errors.push(src.error_at(c, msg));
                    }
                },
                Err(m) => {
                    ok = false;
                    self.errors.push(src.error_at(c, m));
                }
            }
        }
        dedup_in_order(&mut nets);
        (nets, ok)
    }
}

/// Drops later duplicates, keeping the first of each. A strictly ascending list (the usual
/// shape of a big generated group) has none, which one pass shows; otherwise a sort of the
/// indices finds them (hashing 100,000 prefixes took ~5 ms of a reload).
pub(super) fn dedup_in_order(nets: &mut Vec<IpNet>) {
    if nets.windows(2).all(|w| w[0] < w[1]) {
        return;
    }
    let mut order: Vec<usize> = (0..nets.len()).collect();
    order.sort_by(|&a, &b| nets[a].cmp(&nets[b]).then(a.cmp(&b)));
    let mut keep = vec![true; nets.len()];
    for w in order.windows(2) {
        if nets[w[0]] == nets[w[1]] {
            keep[w[1]] = false;
        }
    }
    let mut keep = keep.into_iter();
    nets.retain(|_| keep.next().unwrap_or(true));
}
