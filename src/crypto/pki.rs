//! Development PKI (rcgen): a federation CA and per-area node certificates for tests and demos.
//!
//! Node certificate: CN = area id; SAN DNS = `<area>.refex.internal` (the TLS server name);
//! SAN URI = `urn:refex:area:<area>` — the URI SAN binds the area id to the TLS identity, and
//! the transport reads the peer's area from it. ECDSA P-256 keys; EKU serverAuth + clientAuth,
//! because every node is both client and server.
//! Revocation: every issued certificate carries a random positive serial (returned in
//! [`NodeCert::serial`]) so a test can revoke it with [`DevCa::crl_pem`].
//! Must not: be used for production (the production CA is operated offline by the federation).

use chrono::{Datelike, Duration, Utc};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use ring::rand::SecureRandom;

use crate::core::types::AreaId;

/// Errors making certificates.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation failed: {0}")]
pub struct PkiError(String);

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        Self(e.to_string())
    }
}

/// The URI SAN that names an area.
pub fn area_uri(area: &AreaId) -> String {
    format!("urn:refex:area:{area}")
}

/// The TLS server name of an area's node.
pub fn area_server_name(area: &AreaId) -> String {
    format!("{area}.refex.internal")
}

/// A PEM certificate and its PEM private key.
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number (DER integer content bytes), for [`DevCa::crl_pem`].
    pub serial: Vec<u8>,
}

/// A development certificate authority.
pub struct DevCa {
    cert: Certificate,
    key: KeyPair,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let from = Utc::now() - Duration::days(1);
    let to = Utc::now() + Duration::days(i64::from(days));
    params.not_before = rcgen::date_time_ymd(from.year(), from.month() as u8, from.day() as u8);
    params.not_after = rcgen::date_time_ymd(to.year(), to.month() as u8, to.day() as u8);
}

impl DevCa {
    pub fn generate(name: &str, valid_days: u32) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let cert = Self::params(name, valid_days)?.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA that `generate(name, …)` made with the key `key_pem`: what it signs (certificates,
    /// CRLs) chains to the original CA certificate (same name, key and key identifier). For
    /// tests that revoke or rotate a federation's certificates on disk.
    pub fn from_key_pem(name: &str, key_pem: &str, valid_days: u32) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert = Self::params(name, valid_days)?.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    fn params(name: &str, valid_days: u32) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, valid_days);
        Ok(params)
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a node certificate for `area`.
    pub fn issue_node(&self, area: &AreaId, valid_days: u32) -> Result<NodeCert, PkiError> {
        self.issue(area, valid_days, true)
    }

    /// Issues a certificate for `area` without the area URI SAN (for tests of refusal).
    pub fn issue_without_area_uri(
        &self,
        area: &AreaId,
        valid_days: u32,
    ) -> Result<NodeCert, PkiError> {
        self.issue(area, valid_days, false)
    }

    fn issue(&self, area: &AreaId, valid_days: u32, with_uri: bool) -> Result<NodeCert, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, area.as_str());
        let mut sans = vec![SanType::DnsName(area_server_name(area).try_into()?)];
        if with_uri {
            sans.push(SanType::URI(area_uri(area).try_into()?));
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, valid_days);
        let mut serial = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| PkiError("no randomness for a serial number".into()))?;
        // Positive and minimally encoded: the top bit clear, the first byte non-zero.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.to_vec(),
        })
    }

    /// A CRL signed by this CA revoking the certificates with the given serials (valid 7 days).
    pub fn crl_pem(&self, revoked: &[&[u8]], crl_number: u64) -> Result<String, PkiError> {
        let ymd = |d: chrono::DateTime<Utc>| {
            rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8)
        };
        let now = Utc::now();
        let params = CertificateRevocationListParams {
            this_update: ymd(now - Duration::days(1)),
            next_update: ymd(now + Duration::days(7)),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: ymd(now - Duration::days(1)),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
    }
}
