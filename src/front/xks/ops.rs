//! The four XKS operations, each from its parsed request to its response: GetHealthStatus,
//! GetKeyMetadata, Encrypt (with the CDIV of Appendix C) and Decrypt. Authorization, limits and
//! the AAD framing happen here, in the spec's order; every core failure is mapped once.

use zeroize::Zeroizing;

use super::error::{XksError, XksErrorName as N, from_crypto};
use super::handler::{KeyStore, XksFront};
use super::request::{decode_field, decode_optional, frame, require_algorithm};
use super::settings::{MAX_METADATA, NotServed};
use super::wire::{self, RequestMetadata};
use crate::audit;
use crate::auth::Principal;
use crate::authz::{Permit, decide};
use crate::core::framing;
use crate::core::{Backend, CryptoError, GCM_TAG_LEN, KeyStatus, Operation};
use crate::front::{Response, json_response};

/// Decode bound for fields whose wrong sizes have their own error (IV, tag, metadata).
const ANY_SIZE: usize = usize::MAX / 2;

impl<B: Backend> XksFront<B> {
    /// GetHealthStatus.
    pub(super) async fn get_health_status(&self, store: &KeyStore) -> Result<Response, XksError> {
        if !store.settings.enabled {
            return Err(XksError::new(
                N::InvalidState,
                "key store is disabled by the operator",
            ));
        }
        let state = self.state.load();
        let report = self.service.health_report().await;
        let id = if report.hsm.serial.is_empty() {
            &report.hsm.token_label
        } else {
            &report.hsm.serial
        };
        let model = format!(
            "{} {} ({})",
            report.hsm.model, report.hsm.versions, report.hsm.token_label
        );
        let vendor = if report.hsm.manufacturer.is_empty() {
            "unknown"
        } else {
            &report.hsm.manufacturer
        };
        let resp = wire::HealthResponse {
            xks_proxy_fleet_size: state.fleet_size,
            xks_proxy_vendor: &state.vendor,
            xks_proxy_model: &self.model,
            ekm_vendor: vendor,
            ekm_fleet_details: vec![wire::EkmFleetDetail {
                id,
                model: &model,
                health_status: report.status.as_str(),
            }],
        };
        Ok(json(&resp))
    }

    /// GetKeyMetadata: the real key spec and usage read from the HSM.
    pub(super) async fn get_key_metadata(
        &self,
        store: &KeyStore,
        principal: &Principal,
        key: &str,
        md: &RequestMetadata<'_>,
    ) -> Result<Response, XksError> {
        let permit = authorize(store, principal, key, Operation::KeyMetadata, md)?;
        let (info, status) = self
            .service
            .key_metadata(&permit)
            .await
            .map_err(|e| crypto_error(&e))?;
        let spec = info.key_spec();
        let (status, reason) = match &status {
            KeyStatus::Enabled => ("ENABLED", None),
            KeyStatus::Disabled(why) => ("DISABLED", Some(why.as_str())),
        };
        if let Some(why) = reason {
            tracing::warn!(reason = why, "key reported DISABLED");
        }
        let resp = wire::KeyMetadataResponse {
            key_spec: &spec,
            key_usage: info.usage.names(),
            key_status: status,
        };
        Ok(json(&resp))
    }

    /// Encrypt, with the CDIV and its verification decrypt when asked for.
    pub(super) async fn encrypt(
        &self,
        store: &KeyStore,
        principal: &Principal,
        key: &str,
        req: &wire::EncryptRequest<'_>,
        md: &RequestMetadata<'_>,
    ) -> Result<Response, XksError> {
        require_algorithm(req.encryption_algorithm.as_deref())?;
        let cdiv = match req.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some("SHA_256") => true,
            Some(_) => {
                return Err(XksError::new(
                    N::Validation,
                    "ciphertextDataIntegrityValueAlgorithm must be SHA_256",
                ));
            }
        };
        let limits = store.settings.limits;
        let plaintext = Zeroizing::new(decode_field(
            "plaintext",
            req.plaintext.as_deref(),
            limits.max_plaintext,
        )?);
        let aad = decode_optional(
            "additionalAuthenticatedData",
            req.additional_authenticated_data.as_deref(),
            limits.max_aad,
        )?;
        let permit = authorize(store, principal, key, Operation::Encrypt, md)?;
        let metadata = &store.settings.ciphertext_metadata;
        let full_aad = frame(store.settings.framing, aad.as_deref(), metadata)?;
        let verify_aad = if cdiv { Some(full_aad.clone()) } else { None };
        let sealed = self
            .service
            .encrypt(&permit, plaintext, full_aad, cdiv)
            .await
            .map_err(|e| crypto_error(&e))?;
        let cdiv_value = match verify_aad {
            Some(verify_aad) => {
                // Appendix C: compute the integrity value first, then prove the output decrypts.
                let value = framing::cdiv_sha256(
                    aad.as_deref().unwrap_or_default(),
                    metadata,
                    &sealed.iv,
                    &sealed.ciphertext,
                    &sealed.tag,
                );
                self.service
                    .verify_sealed(&permit, &sealed, verify_aad)
                    .await
                    .map_err(|e| crypto_error(&e))?;
                Some(wire::b64_encode(&value))
            }
            None => None,
        };
        let resp = wire::EncryptResponse {
            ciphertext: wire::b64_encode(&sealed.ciphertext),
            ciphertext_metadata: (!metadata.is_empty()).then(|| wire::b64_encode(metadata)),
            initialization_vector: wire::b64_encode(&sealed.iv),
            authentication_tag: wire::b64_encode(&sealed.tag),
            ciphertext_data_integrity_value: cdiv_value,
        };
        Ok(json(&resp))
    }

    /// Decrypt.
    pub(super) async fn decrypt(
        &self,
        store: &KeyStore,
        principal: &Principal,
        key: &str,
        req: &wire::DecryptRequest<'_>,
        md: &RequestMetadata<'_>,
    ) -> Result<Response, XksError> {
        require_algorithm(req.encryption_algorithm.as_deref())?;
        let limits = store.settings.limits;
        let ciphertext = decode_field(
            "ciphertext",
            req.ciphertext.as_deref(),
            limits.max_plaintext,
        )?;
        // Fixed-size fields: a wrong size, however large, gets the field's own error below;
        // the server's body limit bounds what is decoded.
        let iv = decode_field(
            "initializationVector",
            req.initialization_vector.as_deref(),
            ANY_SIZE,
        )?;
        let tag = decode_field(
            "authenticationTag",
            req.authentication_tag.as_deref(),
            ANY_SIZE,
        )?;
        let aad = decode_optional(
            "additionalAuthenticatedData",
            req.additional_authenticated_data.as_deref(),
            limits.max_aad,
        )?;
        let metadata = decode_optional(
            "ciphertextMetadata",
            req.ciphertext_metadata.as_deref(),
            ANY_SIZE,
        )?
        .unwrap_or_default();
        if metadata.len() > MAX_METADATA {
            return Err(XksError::new(
                N::Validation,
                "ciphertextMetadata exceeds 20 bytes",
            ));
        }
        let permit = authorize(store, principal, key, Operation::Decrypt, md)?;
        // Wrong IV or tag sizes cannot authenticate: the spec's InvalidCiphertextException
        // covers "IV or tag invalid", and it is what the HSM itself would conclude.
        if iv.len() != 12 && iv.len() != 16 {
            return Err(XksError::new(
                N::InvalidCiphertext,
                "initializationVector must be 12 or 16 bytes",
            ));
        }
        let tag: [u8; GCM_TAG_LEN] = tag.try_into().map_err(|_| {
            XksError::new(N::InvalidCiphertext, "authenticationTag must be 16 bytes")
        })?;
        let full_aad = frame(store.settings.framing, aad.as_deref(), &metadata)?;
        let plaintext = self
            .service
            .decrypt(&permit, iv, ciphertext, tag, full_aad)
            .await
            .map_err(|e| crypto_error(&e))?;
        let encoded = Zeroizing::new(wire::b64_encode(&plaintext));
        Ok(json(&wire::DecryptResponse {
            plaintext: &encoded,
        }))
    }
}

/// The key store's switch, its key allow-list, then its policy rules (`authz::decide`, the code
/// `policy explain` runs too).
fn authorize(
    store: &KeyStore,
    principal: &Principal,
    key: &str,
    op: Operation,
    md: &RequestMetadata<'_>,
) -> Result<Permit, XksError> {
    store
        .settings
        .serves(key)
        .map_err(|refusal| match refusal {
            NotServed::Disabled => {
                XksError::new(N::InvalidState, "key store is disabled by the operator")
            }
            NotServed::NotExposed => XksError::new(N::KeyNotFound, "external key not found"),
        })?;
    let request = decide::XksRequest {
        principal,
        key,
        op,
        metadata: md.authz(),
    };
    decide::xks(&store.settings.policy, &request)
        .outcome
        .map_err(|denial| {
            tracing::warn!(rule = %denial.rule, reason = %audit::bounded(&denial.reason), "request denied by policy");
            XksError::denied(&denial.rule, denial.to_string())
        })
}

fn crypto_error(e: &CryptoError) -> XksError {
    match e {
        CryptoError::Internal(_) => {
            tracing::error!(error = %e, "key operation failed");
        }
        // An HSM outage is logged once, at its start and end, by the HSM layer; each request's
        // own line (and audit event) still records its outcome.
        _ => tracing::debug!(error = %e, "key operation refused"),
    }
    from_crypto(e)
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(http::StatusCode::OK, body),
        Err(_) => XksError::new(N::Internal, "internal error").to_response(),
    }
}
