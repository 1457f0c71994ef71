//! Names an operator types: site, client and resource names, alias FQDNs, and `HOST:PORT` targets.
//! Every check returns a reason a person can act on.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Why a name or target was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} '{name}' is not valid: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'")]
    BadLabel { what: &'static str, name: String },
    #[error("alias '{0}' is not a valid DNS name: use lowercase labels of letters, digits and '-' separated by dots, at least two labels, at most 253 characters")]
    BadAlias(String),
    #[error("target '{0}' has no port (expected HOST:PORT, e.g. prometheus:9090)")]
    TargetWithoutPort(String),
    #[error("target '{target}' has port '{port}', which is not in 1-65535")]
    TargetBadPort { target: String, port: String },
    #[error("target '{0}' has an invalid host (expected a DNS name, an IPv4 address or [IPv6])")]
    TargetBadHost(String),
}

/// Checks a site, client or resource name: one DNS label, so `NAME.<zone>` is always a valid name.
pub fn check_label(what: &'static str, name: &str) -> Result<(), NameError> {
    if is_label(name) {
        Ok(())
    } else {
        Err(NameError::BadLabel { what, name: name.to_owned() })
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks an alias FQDN (a trailing dot is accepted and dropped) and returns its canonical form.
pub fn check_alias(alias: &str) -> Result<String, NameError> {
    let canon = alias.strip_suffix('.').unwrap_or(alias).to_ascii_lowercase();
    let labels: Vec<&str> = canon.split('.').collect();
    if canon.len() > 253 || labels.len() < 2 || !labels.iter().all(|l| is_label(l)) {
        return Err(NameError::BadAlias(alias.to_owned()));
    }
    Ok(canon)
}

/// A resource's target: a host the site resolves with its own resolver, and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// A DNS name or an IP address literal.
    pub host: String,
    /// The TCP/UDP port.
    pub port: u16,
}

impl Target {
    /// Parses `HOST:PORT` (`[IPv6]:PORT` for IPv6 literals).
    pub fn parse(text: &str) -> Result<Target, NameError> {
        let t = text.trim();
        let (host, port) = if let Some(rest) = t.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| NameError::TargetBadHost(t.to_owned()))?;
            let port = after.strip_prefix(':').ok_or_else(|| NameError::TargetWithoutPort(t.to_owned()))?;
            h.parse::<Ipv6Addr>().map_err(|_| NameError::TargetBadHost(t.to_owned()))?;
            (h.to_owned(), port)
        } else {
            let (h, port) = t.rsplit_once(':').ok_or_else(|| NameError::TargetWithoutPort(t.to_owned()))?;
            if h.contains(':') {
                // A bare IPv6 literal with a port is ambiguous.
                return Err(NameError::TargetBadHost(t.to_owned()));
            }
            if h.parse::<IpAddr>().is_err() && !is_hostname(h) {
                return Err(NameError::TargetBadHost(t.to_owned()));
            }
            (h.to_ascii_lowercase(), port)
        };
        if port.is_empty() {
            return Err(NameError::TargetWithoutPort(t.to_owned()));
        }
        match port.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(Target { host, port: p as u16 }),
            _ => Err(NameError::TargetBadPort { target: t.to_owned(), port: port.to_owned() }),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Host names as Docker and Kubernetes use them: labels may contain '_' and uppercase in the wild.
fn is_hostname(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn targets() {
        let ok = [
            ("prometheus:9090", "prometheus", 9090),
            ("10.0.0.5:22", "10.0.0.5", 22),
            ("[2001:db8::1]:443", "2001:db8::1", 443),
            ("svc.ns.svc.cluster.local:8120", "svc.ns.svc.cluster.local", 8120),
            ("my_container:80", "my_container", 80),
        ];
        for (text, host, port) in ok {
            assert_eq!(Target::parse(text).unwrap(), Target { host: host.into(), port }, "{text}");
        }
        let bad = [
            ("prometheus", NameError::TargetWithoutPort("prometheus".into())),
            ("prometheus:", NameError::TargetWithoutPort("prometheus:".into())),
            ("h:0", NameError::TargetBadPort { target: "h:0".into(), port: "0".into() }),
            ("h:65536", NameError::TargetBadPort { target: "h:65536".into(), port: "65536".into() }),
            ("h:http", NameError::TargetBadPort { target: "h:http".into(), port: "http".into() }),
            (":80", NameError::TargetBadHost(":80".into())),
            ("2001:db8::1:80", NameError::TargetBadHost("2001:db8::1:80".into())),
            ("bad host:80", NameError::TargetBadHost("bad host:80".into())),
        ];
        for (text, err) in bad {
            assert_eq!(Target::parse(text).unwrap_err(), err, "{text}");
        }
    }

    #[test]
    fn labels_and_aliases() {
        assert!(check_label("resource", "k8s-prometheus").is_ok());
        for bad in ["", "-a", "a-", "Upper", "a.b", "a_b", &"x".repeat(64)] {
            assert!(check_label("resource", bad).is_err(), "{bad}");
        }
        assert_eq!(check_alias("Periphery.Private.Example.com.").unwrap(), "periphery.private.example.com");
        for bad in ["single", "a..b", "-a.com", "a b.com", ""] {
            assert!(check_alias(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn target_parse_never_panics_and_round_trips(s in ".{0,80}") {
            if let Ok(t) = Target::parse(&s) {
                prop_assert_eq!(Target::parse(&t.to_string()).unwrap(), t);
            }
        }
    }
}
