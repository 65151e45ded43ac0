//! Domain-name patterns, as `[[egress]] fqdns` writes them:
//!
//! | pattern           | matches                                                        |
//! |-------------------|----------------------------------------------------------------|
//! | `api.example.com` | exactly that name                                              |
//! | `*.example.org`   | every name ONE OR MORE labels below `example.org` (`a.example.org`, `a.b.example.org`), never `example.org` itself |
//!
//! A pattern is lower-cased and a trailing dot dropped. Labels are 1-63 characters of
//! `a-z 0-9 - _` and do not start or end with `-`; the whole pattern (with its `*.`) is at most
//! 253 characters, so the shortest name a wildcard matches is a valid name too. `*` is only
//! allowed as the whole first label. Internationalized names are written in their ASCII form
//! (`xn--...`), as DNS carries them.
//!
//! [`Fqdn::matches`] takes a name as it comes off the wire: case does not matter and a trailing
//! dot is optional. A name that is not made of such labels (another character, an empty label,
//! a label over 63 characters, more than 253 in all) matches no pattern, whatever the pattern:
//! the resolver refuses oddly formed names rather than guess what they mean.
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Longest name in its dotted text form, without the trailing dot (RFC 1035: 255 octets on the
/// wire, length bytes included).
pub const NAME_MAX: usize = 253;
/// Longest label (RFC 1035).
pub const LABEL_MAX: usize = 63;

/// A validated domain-name pattern (see the module table). Ordered and compared by its text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fqdn {
    /// Lower case, no trailing dot; starts with `*.` for a wildcard.
    text: String,
}

impl Fqdn {
    /// Parse a pattern; the error is the reason (one line, the pattern quoted), for
    /// file:line:column errors.
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.is_ascii() {
            return Err(format!(
                "domain name {s:?} has non-ASCII characters: write an internationalized name in \
                 its ASCII form (\"xn--...\"), as DNS carries it"
            ));
        }
        let lower = s.to_ascii_lowercase();
        let text = lower.strip_suffix('.').unwrap_or(&lower);
        if text.is_empty() {
            return Err(format!("domain name {s:?} is empty"));
        }
        if text.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{s:?} is an IP address, not a domain name: list it in `cidrs`"
            ));
        }
        let domain = text.strip_prefix("*.").unwrap_or(text);
        if text == "*" {
            return Err(format!(
                "domain name {s:?}: a wildcard needs the domain it stands below, like \
                 \"*.example.org\" (which matches names below example.org, never example.org \
                 itself)"
            ));
        }
        if domain.contains('*') {
            return Err(format!(
                "domain name {s:?}: `*` is only allowed as the whole first label, as in \
                 \"*.example.org\""
            ));
        }
        if text.len() > NAME_MAX {
            return Err(format!(
                "domain name {s:?} is {} characters long; names have at most {NAME_MAX}",
                text.len()
            ));
        }
        for label in domain.split('.') {
            label_ok(label).map_err(|why| format!("domain name {s:?}: {why}"))?;
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }

    /// Whether `name` (as it comes off the wire: any case, trailing dot optional) is matched:
    /// equal to an exact pattern, or one or more labels below a wildcard's domain. A name that
    /// is not well formed (see the module documentation) matches nothing.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if !well_formed(name) {
            return false;
        }
        match self.text.strip_prefix("*.") {
            None => name.eq_ignore_ascii_case(&self.text),
            Some(domain) => {
                // At least one label, then a dot, then the domain.
                name.len() > domain.len() + 1
                    && name
                        .get(name.len() - domain.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(domain))
                    && name.as_bytes().get(name.len() - domain.len() - 1) == Some(&b'.')
            }
        }
    }

    /// Whether this is a `*.` pattern.
    pub fn is_wildcard(&self) -> bool {
        self.text.starts_with("*.")
    }

    /// The name without its `*.` (the name itself for an exact pattern).
    pub fn domain(&self) -> &str {
        self.text.strip_prefix("*.").unwrap_or(&self.text)
    }

    /// The pattern as written, lower case, without a trailing dot.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A label of a pattern: 1-63 characters of `a-z 0-9 - _`, no `-` at either end.
fn label_ok(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label (two dots in a row, or a leading dot)".to_owned());
    }
    if label.len() > LABEL_MAX {
        return Err(format!(
            "label {label:?} is {} characters long; labels have at most {LABEL_MAX}",
            label.len()
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "label {label:?} contains {c:?}; only a-z, 0-9, '-' and '_' are allowed"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(())
}

/// A name off the wire (trailing dot removed): at most 253 characters of labels of 1-63
/// characters of `A-Z a-z 0-9 - _`.
fn well_formed(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= LABEL_MAX
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl fmt::Display for Fqdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Fqdn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Fqdn {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<Fqdn> for String {
    fn from(p: Fqdn) -> String {
        p.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Fqdn {
        Fqdn::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// `n` labels of `len` characters joined by dots.
    fn labels(n: usize, len: usize) -> String {
        vec!["a".repeat(len); n].join(".")
    }

    #[test]
    fn names_are_lower_cased_without_trailing_dot() {
        let f = p("API.Example.COM.");
        assert_eq!(f.to_string(), "api.example.com");
        assert_eq!(f.as_str(), "api.example.com");
        assert!(!f.is_wildcard());
        assert_eq!(f.domain(), "api.example.com");
        let w = p("*.Example.org");
        assert_eq!(w.to_string(), "*.example.org");
        assert!(w.is_wildcard());
        assert_eq!(w.domain(), "example.org");
        for ok in [
            "localhost",
            "_dmarc.example.com",
            "a-b.c_d.e9",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(p(ok).as_str(), ok);
        }
    }

    #[test]
    fn exact_names_match_in_any_case_with_or_without_trailing_dot() {
        let f = p("api.example.com");
        for yes in [
            "api.example.com",
            "API.EXAMPLE.COM",
            "api.example.com.",
            "Api.Example.Com.",
        ] {
            assert!(f.matches(yes), "{yes}");
        }
        for no in [
            "example.com",
            "x.api.example.com",
            "api.example.co",
            "api.example.com..",
            "api-example.com",
            "apiexample.com",
            "",
            ".",
        ] {
            assert!(!f.matches(no), "{no}");
        }
    }

    #[test]
    fn a_wildcard_matches_one_or_more_labels_below_never_the_domain_itself() {
        let w = p("*.example.org");
        for yes in [
            "a.example.org",
            "a.b.example.org",
            "x.y.z.example.org.",
            "A.EXAMPLE.ORG",
            "_srv.example.org",
        ] {
            assert!(w.matches(yes), "{yes}");
        }
        for no in [
            "example.org",
            "example.org.",
            ".example.org",
            "a..example.org",
            "aexample.org",
            "a.example.org.evil.com",
            "a.example.orgx",
            "a.xexample.org",
            "org",
            "*.example.org",
        ] {
            assert!(!w.matches(no), "{no}");
        }
    }

    #[test]
    fn oddly_formed_names_match_nothing() {
        let w = p("*.example.org");
        for bad in [
            "a b.example.org",
            "a\\.b.example.org",
            "a\0.example.org",
            "é.example.org",
            "a/b.example.org",
        ] {
            assert!(!w.matches(bad), "{bad:?}");
        }
        let long_label = format!("{}.example.org", "a".repeat(64));
        assert!(!w.matches(&long_label));
        assert!(w.matches(&format!("{}.example.org", "a".repeat(63))));
    }

    #[test]
    fn length_limits_are_exact() {
        // 63-character labels pass, 64 do not.
        assert!(Fqdn::parse(&format!("{}.com", "a".repeat(63))).is_ok());
        let e = Fqdn::parse(&format!("{}.com", "a".repeat(64))).unwrap_err();
        assert!(e.contains("at most 63"), "{e}");
        // 253 characters in all pass (4 x 63 + 3 dots = 255: trim to 253), 254 do not.
        let n253 = format!("{}.{}", labels(3, 63), "a".repeat(61));
        assert_eq!(n253.len(), 253);
        let f = p(&n253);
        assert!(f.matches(&n253));
        assert!(
            f.matches(&format!("{n253}.")),
            "the trailing dot is not counted"
        );
        assert!(p(&format!("{n253}.")).matches(&n253));
        let n254 = format!("{}.{}", labels(3, 63), "a".repeat(62));
        assert_eq!(n254.len(), 254);
        let e = Fqdn::parse(&n254).unwrap_err();
        assert!(e.contains("at most 253"), "{e}");
        // The `*.` counts: its shortest match is as long as the pattern.
        let w253 = format!("*.{}.{}", labels(3, 63), "a".repeat(59));
        assert_eq!(w253.len(), 253);
        let w = p(&w253);
        assert!(w.matches(&w253.replacen('*', "b", 1)));
        assert!(!w.matches(&w253.replacen('*', "bb", 1)), "254 characters");
        let w254 = format!("*.{}.{}", labels(3, 63), "a".repeat(60));
        assert!(Fqdn::parse(&w254).unwrap_err().contains("at most 253"));
    }

    #[test]
    fn refusals_say_why() {
        for (bad, why) in [
            ("", "empty"),
            (".", "empty"),
            ("*", "a wildcard needs the domain"),
            ("*.", "a wildcard needs the domain"),
            ("a.*.b", "only allowed as the whole first label"),
            ("*foo.b", "only allowed as the whole first label"),
            ("*.*.b", "only allowed as the whole first label"),
            ("foo*.b", "only allowed as the whole first label"),
            ("a..b", "empty label"),
            (".a.b", "empty label"),
            ("a.b..", "empty label"),
            ("*..b", "empty label"),
            ("-a.b", "starts or ends with '-'"),
            ("a-.b", "starts or ends with '-'"),
            ("a.b c", "contains ' '"),
            ("a/b", "contains '/'"),
            ("a:b.c", "contains ':'"),
            ("bücher.de", "ASCII form"),
            ("192.0.2.1", "IP address"),
            ("2001:db8::1", "IP address"),
        ] {
            let e = Fqdn::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn serde_is_the_string() {
        let f = p("*.Example.org.");
        let json = serde_json::to_string(&f).expect("serializes");
        assert_eq!(json, "\"*.example.org\"");
        assert_eq!(serde_json::from_str::<Fqdn>(&json).expect("parses"), f);
        assert!(serde_json::from_str::<Fqdn>("\"a.*.b\"").is_err());
    }
}
