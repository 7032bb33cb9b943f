//! Reading the PEM files named in `TlsSettings`: certificate chains, the private key and the CA
//! bundle, with errors that name the file and the problem.
//!
//! Only file I/O and PEM/DER decoding live here; no policy. Key bytes are held in zeroizing
//! buffers and never appear in errors (PEM error details, which may quote input, are replaced by
//! fixed descriptions).

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use super::TlsError;

/// Reads every `CERTIFICATE` block of `path`, in order; at least one is required.
pub(super) fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the one private key of `path`.
pub(super) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    let bytes = Zeroizing::new(read(WHAT, path)?);
    let mut keys = PrivateKeyDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(WHAT, path, &e))?;
    match keys.len() {
        1 => Ok(keys.remove(0)),
        0 if contains(&bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") => {
            Err(TlsError::EncryptedPrivateKey {
                path: path.to_path_buf(),
            })
        }
        0 => Err(TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        }),
        count => Err(TlsError::MultiplePrivateKeys {
            path: path.to_path_buf(),
            count,
        }),
    }
}

/// Reads the CA bundle into a root store. Every certificate must be a usable trust anchor: a
/// silently skipped CA would surface much later as unexplained client rejections.
pub(super) fn ca_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    const WHAT: &str = "CA bundle";
    let certs = certificates(WHAT, path).map_err(|e| match e {
        TlsError::NoCertificate { path, .. } => TlsError::CaBundleEmpty { path },
        other => other,
    })?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCertificate {
            what: WHAT,
            path: path.to_path_buf(),
            index: i + 1,
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Maps a PEM error to a fixed description: some variants carry input bytes (a malformed line,
/// a base64 symbol), which for the key file would be key material.
fn pem_error(what: &'static str, path: &Path, e: &pem::Error) -> TlsError {
    let detail = match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM block has no matching END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a PEM block contains invalid base64",
        pem::Error::SectionTooLarge => "a PEM block is too large",
        _ => "malformed PEM",
    };
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        detail,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
