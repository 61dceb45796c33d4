//! Certificate generation for a cluster: one CA, and leaf certificates whose SPIFFE URI SAN names a
//! role (`node/<id>`, `client/<name>`, `admin/<name>`). This is what `bayard certs …` runs, and what
//! `bayard serve` uses to make development certificates on first start.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::transport::identity::Role;

/// Leaf certificates are valid this long unless told otherwise.
pub const DEFAULT_LEAF_VALIDITY_DAYS: i64 = 365;
/// The CA is valid this long.
pub const DEFAULT_CA_VALIDITY_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
    #[error("invalid subject alternative name `{name}`: {reason}")]
    InvalidSubjectAlternativeName { name: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a usable CA file: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    #[error(
        "refusing to overwrite {path}; pass --force to replace it (certificates it signed or made stop being trusted)"
    )]
    AlreadyExists { path: PathBuf },
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

/// Validity window of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (to tolerate clock skew between hosts) to `days` from now.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::hours(1), not_after: now + Duration::days(days) }
    }
}

/// A loaded CA that can sign leaf certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    pub certificate_pem: String,
}

impl CertificateAuthority {
    /// Makes a new self-signed CA.
    pub fn generate(common_name: &str, validity: Validity) -> Result<(Self, PemPair), CertificateError> {
        let mut params = CertificateParams::default();
        let mut distinguished_name = DistinguishedName::new();
        distinguished_name.push(DnType::CommonName, common_name);
        distinguished_name.push(DnType::OrganizationName, "bayard");
        params.distinguished_name = distinguished_name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key_pair = KeyPair::generate()?;
        let certificate = params.self_signed(&key_pair)?;
        let pair = PemPair { certificate_pem: certificate.pem(), private_key_pem: key_pair.serialize_pem() };
        let authority = CertificateAuthority {
            issuer: Issuer::new(params, key_pair),
            certificate_pem: pair.certificate_pem.clone(),
        };
        Ok((authority, pair))
    }

    /// Loads a CA from its PEM certificate and key files.
    pub fn load(certificate_path: &Path, key_path: &Path) -> Result<Self, CertificateError> {
        let certificate_pem = read_text(certificate_path)?;
        let key_pem = read_text(key_path)?;
        let key_pair = KeyPair::from_pem(&key_pem)
            .map_err(|error| CertificateError::InvalidCa { path: key_path.to_path_buf(), reason: error.to_string() })?;
        let issuer = Issuer::from_ca_cert_pem(&certificate_pem, key_pair).map_err(|error| {
            CertificateError::InvalidCa { path: certificate_path.to_path_buf(), reason: error.to_string() }
        })?;
        Ok(CertificateAuthority { issuer, certificate_pem })
    }

    /// Issues a leaf certificate for `role`. Node certificates carry `subject_alternative_names`
    /// (host names and IP addresses they are reached by) and both server and client usage;
    /// client and admin certificates are for client authentication only.
    pub fn issue(
        &self,
        role: &Role,
        trust_domain: &str,
        subject_alternative_names: &[String],
        validity: Validity,
    ) -> Result<PemPair, CertificateError> {
        let mut params = CertificateParams::default();
        let mut distinguished_name = DistinguishedName::new();
        distinguished_name.push(DnType::CommonName, format!("bayard {role}"));
        params.distinguished_name = distinguished_name;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.extended_key_usages = match role {
            Role::Node { .. } => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Role::Admin { .. } | Role::Client { .. } => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let uri = role.spiffe_uri(trust_domain);
        let uri_san = uri.clone().try_into().map_err(|error: rcgen::Error| {
            CertificateError::InvalidSubjectAlternativeName { name: uri, reason: error.to_string() }
        })?;
        params.subject_alt_names.push(SanType::URI(uri_san));
        for name in subject_alternative_names {
            params.subject_alt_names.push(subject_alternative_name(name)?);
        }
        let key_pair = KeyPair::generate()?;
        let certificate = params.signed_by(&key_pair, &self.issuer)?;
        Ok(PemPair { certificate_pem: certificate.pem(), private_key_pem: key_pair.serialize_pem() })
    }
}

fn subject_alternative_name(name: &str) -> Result<SanType, CertificateError> {
    let trimmed = name.trim();
    if let Ok(address) = trimmed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(address));
    }
    let dns_name = trimmed.to_string().try_into().map_err(|error: rcgen::Error| {
        CertificateError::InvalidSubjectAlternativeName { name: trimmed.to_string(), reason: error.to_string() }
    })?;
    Ok(SanType::DnsName(dns_name))
}

/// The names every node certificate carries so that local tools can reach it.
pub fn default_node_subject_alternative_names() -> Vec<String> {
    vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()]
}

fn read_text(path: &Path) -> Result<String, CertificateError> {
    fs::read_to_string(path).map_err(|source| CertificateError::Read { path: path.to_path_buf(), source })
}

/// Paths of a PEM pair written as `<directory>/<stem>.pem` and `<directory>/<stem>.key`.
pub fn pair_paths(directory: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (directory.join(format!("{stem}.pem")), directory.join(format!("{stem}.key")))
}

/// Writes a PEM pair; the key is created with mode 0600 and neither file is overwritten unless
/// `overwrite` is set.
pub fn write_pair(
    directory: &Path,
    stem: &str,
    pair: &PemPair,
    overwrite: bool,
) -> Result<(PathBuf, PathBuf), CertificateError> {
    fs::create_dir_all(directory)
        .map_err(|source| CertificateError::Write { path: directory.to_path_buf(), source })?;
    let (certificate_path, key_path) = pair_paths(directory, stem);
    if !overwrite {
        for path in [&certificate_path, &key_path] {
            if path.exists() {
                return Err(CertificateError::AlreadyExists { path: path.clone() });
            }
        }
    }
    write_file(&key_path, pair.private_key_pem.as_bytes(), 0o600)?;
    write_file(&certificate_path, pair.certificate_pem.as_bytes(), 0o644)?;
    Ok((certificate_path, key_path))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertificateError> {
    let write_error = |source| CertificateError::Write { path: path.to_path_buf(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(write_error)?;
    // The mode above applies only to a file that did not exist: an older file keeps its own, so
    // set it explicitly (a key written over a 0644 file must end up 0600).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(write_error)?;
    }
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    Ok(())
}

/// The DNS names and IP addresses (as text) a PEM certificate is valid for.
pub fn certificate_names(path: &Path) -> Result<Vec<String>, CertificateError> {
    let read_error = |reason: String| CertificateError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
    };
    let pem = fs::read_to_string(path).map_err(|source| CertificateError::Read { path: path.to_path_buf(), source })?;
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|error| read_error(error.to_string()))?;
    let (_, certificate) =
        x509_parser::parse_x509_certificate(&block.contents).map_err(|error| read_error(error.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(extension)) = certificate.subject_alternative_name() {
        for name in &extension.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(dns.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let address = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(|octets| IpAddr::from(octets).to_string()),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(|octets| IpAddr::from(octets).to_string()),
                        _ => None,
                    };
                    names.extend(address);
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

/// Files a development node uses, made on first start when no certificate flags are given.
#[derive(Debug, Clone)]
pub struct DevelopmentCertificates {
    pub ca_certificate: PathBuf,
    pub node_certificate: PathBuf,
    pub node_key: PathBuf,
    /// What this call created (empty when everything already existed).
    pub created: Vec<PathBuf>,
}

/// Ensures `directory` holds a development CA, a certificate for `node_id`, and an admin
/// certificate (`admin-dev`) for the CLI. Existing files are kept.
pub fn ensure_development_certificates(
    directory: &Path,
    node_id: u64,
    trust_domain: &str,
    extra_subject_alternative_names: &[String],
) -> Result<DevelopmentCertificates, CertificateError> {
    let mut created = Vec::new();
    let (ca_certificate, ca_key) = pair_paths(directory, "ca");
    let authority = if ca_certificate.exists() && ca_key.exists() {
        CertificateAuthority::load(&ca_certificate, &ca_key)?
    } else {
        let (authority, pair) =
            CertificateAuthority::generate("bayard development ca", Validity::days_from_now(DEFAULT_CA_VALIDITY_DAYS))?;
        let (certificate_path, key_path) = write_pair(directory, "ca", &pair, true)?;
        created.push(certificate_path);
        created.push(key_path);
        authority
    };
    let (node_certificate, node_key) = pair_paths(directory, &format!("node-{node_id}"));
    // A development certificate made before without names asked for now (`--dev-san`) is made
    // again: the CA key is right here, and a certificate remote clients refuse helps nobody.
    let lacks_names = node_certificate.exists()
        && certificate_names(&node_certificate)
            .is_ok_and(|names| extra_subject_alternative_names.iter().any(|wanted| !names.contains(wanted)));
    if !(node_certificate.exists() && node_key.exists()) || lacks_names {
        let mut names = default_node_subject_alternative_names();
        for name in extra_subject_alternative_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let pair = authority.issue(
            &Role::Node { node_id },
            trust_domain,
            &names,
            Validity::days_from_now(DEFAULT_LEAF_VALIDITY_DAYS),
        )?;
        let (certificate_path, key_path) = write_pair(directory, &format!("node-{node_id}"), &pair, true)?;
        created.push(certificate_path);
        created.push(key_path);
    }
    let (admin_certificate, admin_key) = pair_paths(directory, "admin-dev");
    if !(admin_certificate.exists() && admin_key.exists()) {
        let pair = authority.issue(
            &Role::Admin { name: "dev".to_string() },
            trust_domain,
            &[],
            Validity::days_from_now(DEFAULT_LEAF_VALIDITY_DAYS),
        )?;
        let (certificate_path, key_path) = write_pair(directory, "admin-dev", &pair, true)?;
        created.push(certificate_path);
        created.push(key_path);
    }
    Ok(DevelopmentCertificates { ca_certificate, node_certificate, node_key, created })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn keys_are_written_private_even_over_an_older_open_file() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().unwrap();
        let (_, pair) = CertificateAuthority::generate("ca", Validity::days_from_now(1)).unwrap();
        let (_, key_path) = pair_paths(directory.path(), "ca");
        fs::write(&key_path, b"old key").unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        write_pair(directory.path(), "ca", &pair, true).unwrap();
        assert_eq!(fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&key_path).unwrap(), pair.private_key_pem);
    }
}
