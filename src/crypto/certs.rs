//! Certificate inspection for `check-config` (and `run`, which calls the same checks): does the
//! node's certificate chain to the federation CA, name this area, match its private key, and
//! how long until it (or the CA) expires.
//!
//! Owns: [`inspect`], which parses the CA file, the certificate file (leaf first, then any
//! intermediates) and the TLS private key with x509-parser / rustls and returns every
//! [`CertProblem`] found, plus the leaf's validity window.
//! Invariants: the area is named by the URI SAN `urn:refex:area:<id>` (see `pki`), which is what
//! the transport reads from a peer; "chains to the CA" means each signature on the way from the
//! leaf to a certificate of the CA file verifies (ring, via x509-parser's `verify`). Expired is
//! an error; expiring within [`EXPIRY_WARNING_DAYS`] is a warning.
//! Must not: read files (the caller hands the bytes in, having read the key with the secret-file
//! rules), log key material, or do network I/O.

use chrono::{DateTime, Utc};
use rustls_pki_types::{pem::PemObject, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::core::types::AreaId;
use crate::crypto::pki::area_uri;

/// A certificate expiring within this many days is reported as a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Longest chain followed from the leaf to the CA.
const MAX_CHAIN: usize = 8;

/// One thing wrong (or about to go wrong) with the TLS identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertProblem {
    /// A file holds no parseable certificate or key.
    #[error("{what}: {reason}")]
    Unreadable { what: &'static str, reason: String },
    /// The private key is not the one the certificate was issued for.
    #[error("the private key (keys.tls_key) does not match the certificate (keys.tls_cert)")]
    KeyMismatch,
    /// The certificate does not carry this area's URI SAN.
    #[error("the certificate names {found} but this node is area '{area}' (expected URI SAN {expected})")]
    WrongArea {
        area: String,
        expected: String,
        found: String,
    },
    /// The certificate lacks the DNS name peers connect to (from the peer directory).
    #[error("the certificate has no DNS name '{expected}' (the server_name peers use for this area); it has {found}")]
    ServerName { expected: String, found: String },
    /// No signature path leads from the certificate to a certificate in the CA file.
    #[error("the certificate does not chain to the CA in keys.tls_ca: {0}")]
    NotChained(String),
    /// A certificate's validity has ended.
    #[error("{which} expired on {not_after}")]
    Expired {
        which: &'static str,
        not_after: DateTime<Utc>,
    },
    /// A certificate's validity has not started.
    #[error("{which} is not valid before {not_before}")]
    NotYetValid {
        which: &'static str,
        not_before: DateTime<Utc>,
    },
    /// A certificate expires soon (a warning, not an error).
    #[error("{which} expires in {days} days, on {not_after}")]
    ExpiresSoon {
        which: &'static str,
        days: i64,
        not_after: DateTime<Utc>,
    },
}

impl CertProblem {
    /// Whether this only warrants a warning (the node can still run).
    pub fn is_warning(&self) -> bool {
        matches!(self, Self::ExpiresSoon { .. })
    }
}

/// What [`inspect`] found.
#[derive(Debug, Default)]
pub struct Inspection {
    /// The leaf certificate's `not_after`, when the certificate could be parsed.
    pub not_after: Option<DateTime<Utc>>,
    /// Every problem, errors and warnings, in the order found.
    pub problems: Vec<CertProblem>,
}

/// The PEM inputs of a TLS identity.
pub struct IdentityPem<'a> {
    pub ca: &'a [u8],
    pub cert: &'a [u8],
    pub key: &'a [u8],
}

fn ders(text: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(text) {
        let pem = pem.map_err(|e| format!("not PEM: {e}"))?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    if out.is_empty() {
        return Err("holds no PEM CERTIFICATE".into());
    }
    Ok(out)
}

/// The `not_after` of the first certificate in `pem` (the leaf of a chain file), if it parses.
pub fn first_not_after(pem: &[u8]) -> Option<DateTime<Utc>> {
    let ders = ders(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(ders.first()?).ok()?;
    Some(time(cert.validity().not_after))
}

fn parse_all<'a>(
    what: &'static str,
    ders: &'a [Vec<u8>],
) -> Result<Vec<X509Certificate<'a>>, CertProblem> {
    ders.iter()
        .map(|d| {
            x509_parser::parse_x509_certificate(d)
                .map(|(_, c)| c)
                .map_err(|e| CertProblem::Unreadable {
                    what,
                    reason: format!("not an X.509 certificate: {e}"),
                })
        })
        .collect()
}

fn time(t: x509_parser::time::ASN1Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn validity(
    which: &'static str,
    cert: &X509Certificate<'_>,
    now: DateTime<Utc>,
) -> Vec<CertProblem> {
    let not_before = time(cert.validity().not_before);
    let not_after = time(cert.validity().not_after);
    let mut out = Vec::new();
    if not_after <= now {
        out.push(CertProblem::Expired { which, not_after });
    } else if (not_after - now).num_days() < EXPIRY_WARNING_DAYS {
        out.push(CertProblem::ExpiresSoon {
            which,
            days: (not_after - now).num_days(),
            not_after,
        });
    }
    if not_before > now {
        out.push(CertProblem::NotYetValid { which, not_before });
    }
    out
}

fn names(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

fn list(items: &[String], none: &str) -> String {
    if items.is_empty() {
        none.to_owned()
    } else {
        items.join(", ")
    }
}

/// Follows issuer links from `leaf` through `intermediates` to one of `roots`, verifying each
/// signature.
fn chains(
    leaf: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    roots: &[X509Certificate<'_>],
) -> Result<(), String> {
    let mut current = leaf;
    for _ in 0..MAX_CHAIN {
        let signed_by = |c: &X509Certificate<'_>| {
            c.subject() == current.issuer()
                && current.verify_signature(Some(c.public_key())).is_ok()
        };
        if roots.iter().any(signed_by) {
            return Ok(());
        }
        match intermediates.iter().find(|c| signed_by(c)) {
            Some(next) if !std::ptr::eq(next, current) => current = next,
            _ => {
                return Err(format!(
                    "no certificate there issued and signed '{}'",
                    current.issuer()
                ))
            }
        }
    }
    Err(format!("no path within {MAX_CHAIN} certificates"))
}

fn key_matches(key_pem: &[u8], leaf: &X509Certificate<'_>) -> Result<bool, CertProblem> {
    let unreadable = |reason: String| CertProblem::Unreadable {
        what: "keys.tls_key",
        reason,
    };
    let der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| unreadable(format!("not a PEM private key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| unreadable(format!("unsupported private key: {e}")))?;
    let spki = signer
        .public_key()
        .ok_or_else(|| unreadable("cannot derive the public key of this key type".into()))?;
    Ok(spki.as_ref() == leaf.public_key().raw)
}

/// Inspects a TLS identity for `area`. `server_name` is the DNS name peers use for this area
/// (from the peer directory), when known.
pub fn inspect(
    pem: &IdentityPem<'_>,
    area: &AreaId,
    server_name: Option<&str>,
    now: DateTime<Utc>,
) -> Inspection {
    let mut out = Inspection::default();
    let unreadable = |what, reason| CertProblem::Unreadable { what, reason };
    let ca_ders = ders(pem.ca).map_err(|r| unreadable("keys.tls_ca", r));
    let cert_ders = ders(pem.cert).map_err(|r| unreadable("keys.tls_cert", r));
    let roots = ca_ders
        .as_deref()
        .map_err(Clone::clone)
        .and_then(|d| parse_all("keys.tls_ca", d));
    let chain = cert_ders
        .as_deref()
        .map_err(Clone::clone)
        .and_then(|d| parse_all("keys.tls_cert", d));
    let roots = match roots {
        Ok(r) => Some(r),
        Err(p) => {
            out.problems.push(p);
            None
        }
    };
    let chain = match chain {
        Ok(c) => c,
        Err(p) => {
            out.problems.push(p);
            return out;
        }
    };
    let Some((leaf, intermediates)) = chain.split_first() else {
        return out;
    };
    out.not_after = Some(time(leaf.validity().not_after));

    match key_matches(pem.key, leaf) {
        Ok(true) => {}
        Ok(false) => out.problems.push(CertProblem::KeyMismatch),
        Err(p) => out.problems.push(p),
    }
    let (uris, dns) = names(leaf);
    let expected = area_uri(area);
    if !uris.contains(&expected) {
        let found: Vec<String> = uris.iter().map(|u| format!("URI SAN {u}")).collect();
        out.problems.push(CertProblem::WrongArea {
            area: area.to_string(),
            expected,
            found: list(&found, "no area (no URI SAN)"),
        });
    }
    if let Some(name) = server_name {
        if !dns.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            out.problems.push(CertProblem::ServerName {
                expected: name.to_owned(),
                found: list(&dns, "no DNS names"),
            });
        }
    }
    if let Some(roots) = &roots {
        if let Err(why) = chains(leaf, intermediates, roots) {
            out.problems.push(CertProblem::NotChained(why));
        }
        for ca in roots {
            out.problems
                .extend(validity("the CA certificate (keys.tls_ca)", ca, now));
        }
    }
    out.problems
        .extend(validity("the node certificate (keys.tls_cert)", leaf, now));
    for c in intermediates {
        out.problems.extend(validity(
            "an intermediate certificate (keys.tls_cert)",
            c,
            now,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::pki::DevCa;

    fn area(s: &str) -> AreaId {
        AreaId::parse(s).unwrap()
    }

    fn check(ca: &DevCa, cert: &str, key: &str, a: &str, days_ahead: i64) -> Inspection {
        let ca_pem = ca.cert_pem();
        inspect(
            &IdentityPem {
                ca: ca_pem.as_bytes(),
                cert: cert.as_bytes(),
                key: key.as_bytes(),
            },
            &area(a),
            Some(&format!("{a}.refex.internal")),
            Utc::now() + chrono::Duration::days(days_ahead),
        )
    }

    #[test]
    fn a_good_identity_has_no_problems_and_reports_not_after() {
        let ca = DevCa::generate("test CA", 365).unwrap();
        let node = ca.issue_node(&area("west-midlands"), 90).unwrap();
        let r = check(&ca, &node.cert_pem, &node.key_pem, "west-midlands", 0);
        assert_eq!(r.problems, vec![]);
        let days = (r.not_after.unwrap() - Utc::now()).num_days();
        assert!((88..=90).contains(&days), "{days}");
    }

    #[test]
    fn another_areas_certificate_is_named_as_such() {
        let ca = DevCa::generate("test CA", 365).unwrap();
        let b = ca.issue_node(&area("london"), 90).unwrap();
        let r = check(&ca, &b.cert_pem, &b.key_pem, "west-midlands", 0);
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        let text: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
        assert!(text[0].contains("urn:refex:area:london"), "{text:?}");
        assert!(text[0].contains("urn:refex:area:west-midlands"), "{text:?}");
        assert!(text[1].contains("west-midlands.refex.internal"), "{text:?}");
    }

    #[test]
    fn a_key_from_another_certificate_is_a_mismatch() {
        let ca = DevCa::generate("test CA", 365).unwrap();
        let a = ca.issue_node(&area("west-midlands"), 90).unwrap();
        let other = ca.issue_node(&area("west-midlands"), 90).unwrap();
        let r = check(&ca, &a.cert_pem, &other.key_pem, "west-midlands", 0);
        assert_eq!(r.problems, vec![CertProblem::KeyMismatch]);
    }

    #[test]
    fn a_certificate_from_another_ca_does_not_chain() {
        let ca = DevCa::generate("test CA", 365).unwrap();
        let rogue = DevCa::generate("test CA", 365).unwrap();
        let a = rogue.issue_node(&area("west-midlands"), 90).unwrap();
        let r = check(&ca, &a.cert_pem, &a.key_pem, "west-midlands", 0);
        assert!(
            matches!(r.problems.as_slice(), [CertProblem::NotChained(_)]),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn a_certificate_without_the_area_uri_is_refused() {
        let ca = DevCa::generate("test CA", 365).unwrap();
        let a = ca
            .issue_without_area_uri(&area("west-midlands"), 90)
            .unwrap();
        let r = check(&ca, &a.cert_pem, &a.key_pem, "west-midlands", 0);
        assert_eq!(r.problems.len(), 1);
        assert!(r.problems[0].to_string().contains("no URI SAN"));
    }

    #[test]
    fn expiry_warns_within_30_days_and_is_an_error_after() {
        let ca = DevCa::generate("test CA", 365).unwrap();
        let a = ca.issue_node(&area("west-midlands"), 90).unwrap();
        let soon = check(&ca, &a.cert_pem, &a.key_pem, "west-midlands", 75);
        assert!(
            matches!(soon.problems.as_slice(), [CertProblem::ExpiresSoon { days, .. }] if *days < 30),
            "{:?}",
            soon.problems
        );
        assert!(soon.problems[0].is_warning());
        let late = check(&ca, &a.cert_pem, &a.key_pem, "west-midlands", 120);
        assert!(
            matches!(late.problems.as_slice(), [CertProblem::Expired { .. }]),
            "{:?}",
            late.problems
        );
        assert!(!late.problems[0].is_warning());
    }

    #[test]
    fn garbage_files_are_named() {
        let ca = DevCa::generate("test CA", 365).unwrap();
        let a = ca.issue_node(&area("west-midlands"), 90).unwrap();
        let r = check(&ca, "not a certificate", &a.key_pem, "west-midlands", 0);
        assert!(r.problems[0].to_string().starts_with("keys.tls_cert:"));
        let r = check(&ca, &a.cert_pem, "nope", "west-midlands", 0);
        assert!(r.problems[0].to_string().starts_with("keys.tls_key:"));
    }
}
