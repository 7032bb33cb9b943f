//! The Cloud EKM operations after authentication: the body parsed with its access context
//! ([`Body`]), the binary fields decoded, the blob checked and the request authorized
//! ([`GcpFront::prepare`], which yields the grant for the audit line), and the wrap or unwrap in
//! the HSM ([`GcpFront::execute`]).

use zeroize::Zeroizing;

use super::blob::{self, FLAG_HEALTH_CHECK};
use super::error::{Code, GcpError, Reason};
use super::handler::{
    BLOB_OVERHEAD, GcpFront, OkBody, State, Verb, check_key_path, crypto_error, decode_optional,
    decode_required, parse,
};
use super::settings::GcpKeySettings;
use super::wire::{self, KeyOpRequest, RequestContext};
use crate::audit;
use crate::auth::Principal;
use crate::authz::Permit;
use crate::authz::access_reason::AccessReason;
use crate::authz::decide::{self, AccessRequest};
use crate::core::{Backend, Operation};

impl<B: Backend> GcpFront<B> {
    /// Everything up to the HSM call: the binary fields decoded, the blob checked (unwrap), and
    /// the request authorized (the grant it names goes to the audit line).
    pub(super) fn prepare(
        &self,
        state: &State,
        verb: Verb,
        access: &Access<'_>,
        request: &KeyOpRequest,
    ) -> Result<Prepared, GcpError> {
        let limits = state.settings.limits;
        let key = access.key;
        let aad = decode_optional(
            "additionalAuthenticatedData",
            request.additional_authenticated_data.as_deref(),
            limits.max_aad,
        )?
        .unwrap_or_default();
        match verb {
            Verb::Wrap => {
                let plaintext = Zeroizing::new(decode_required(
                    "plaintext",
                    request.plaintext.as_deref(),
                    limits.max_plaintext,
                )?);
                let granted = self.authorize(access, Operation::Wrap, &key.hsm_key)?;
                let flags = if access.health_check {
                    FLAG_HEALTH_CHECK
                } else {
                    0
                };
                Ok(Prepared {
                    granted,
                    aad,
                    op: PreparedOp::Wrap { plaintext, flags },
                })
            }
            Verb::Unwrap => {
                let raw = decode_required(
                    "wrappedBlob",
                    request.wrapped_blob.as_deref(),
                    limits.max_plaintext.saturating_add(BLOB_OVERHEAD),
                )?;
                // Checked on a borrowed view, then kept as owned parts for the HSM call.
                let parsed = blob::parse(&raw)
                    .map_err(|e| GcpError::invalid_field("wrappedBlob", e.to_string()))?;
                if !key.accepts_version(parsed.key_version) {
                    return Err(GcpError::new(
                        Code::InvalidArgument,
                        Reason::UnknownKeyVersion,
                        "wrappedBlob was made by a key version this key path does not accept",
                    ));
                }
                if access.health_check && !parsed.is_health_check() {
                    // Health checks may skip justification policy, so they must never be able
                    // to open real data.
                    return Err(GcpError::new(
                        Code::InvalidArgument,
                        Reason::HealthCheckBlobRequired,
                        "a key health check can only unwrap a blob made by a key health check",
                    ));
                }
                let granted = self.authorize(access, Operation::Unwrap, parsed.key_version)?;
                Ok(Prepared {
                    granted,
                    aad,
                    op: PreparedOp::Unwrap {
                        flags: parsed.flags,
                        key_version: parsed.key_version.to_owned(),
                        iv: parsed.iv.to_vec(),
                        ciphertext: parsed.ciphertext.to_vec(),
                        tag: parsed.tag,
                    },
                })
            }
        }
    }

    /// The HSM call and the answer.
    pub(super) async fn execute(
        &self,
        key: &GcpKeySettings,
        prepared: Prepared,
    ) -> Result<OkBody, GcpError> {
        let Prepared { granted, aad, op } = prepared;
        match op {
            PreparedOp::Wrap { plaintext, flags } => {
                let full_aad = blob::aad(&key.path, flags, &key.hsm_key, &aad);
                let sealed = self
                    .service
                    .encrypt(&granted.permit, plaintext, full_aad, false)
                    .await
                    .map_err(|e| crypto_error(&e))?;
                let blob = blob::encode(
                    flags,
                    &key.hsm_key,
                    &sealed.iv,
                    &sealed.ciphertext,
                    &sealed.tag,
                );
                Ok(OkBody::json(&wire::WrapResponse {
                    wrapped_blob: wire::b64_encode(&blob),
                }))
            }
            PreparedOp::Unwrap {
                flags,
                key_version,
                iv,
                ciphertext,
                tag,
            } => {
                let full_aad = blob::aad(&key.path, flags, &key_version, &aad);
                let plaintext = self
                    .service
                    .decrypt(&granted.permit, iv, ciphertext, tag, full_aad)
                    .await
                    .map_err(|e| crypto_error(&e))?;
                let encoded = Zeroizing::new(wire::b64_encode(&plaintext));
                Ok(OkBody::json(&wire::UnwrapResponse {
                    plaintext: &encoded,
                }))
            }
        }
    }

    /// The key's grants, resource pin and justification policy (`authz::decide`, the code
    /// `policy explain` runs too).
    fn authorize(
        &self,
        req: &Access<'_>,
        op: Operation,
        hsm_key: &str,
    ) -> Result<Granted, GcpError> {
        let request = AccessRequest {
            principal: req.principal,
            key: &req.key.path,
            hsm_key,
            op,
            resource_name: req.resource,
            reason: req.reason,
            health_check: req.health_check,
        };
        let decision = decide::cloud_ekm(&req.key.access, &request);
        // An allowed Cloud EKM request is always decided by a grant.
        let grant = decision.decided_by.name().unwrap_or_default().to_owned();
        match decision.outcome {
            Ok(permit) => Ok(Granted { permit, grant }),
            Err(denial) => {
                tracing::warn!(rule = %denial.rule, reason = %audit::bounded(&denial.reason), "request denied by policy");
                Err(GcpError::new(
                    Code::PermissionDenied,
                    Reason::AccessDenied,
                    denial.to_string(),
                )
                .with("rule", denial.rule.clone())
                .denied_by(denial.rule))
            }
        }
    }
}

/// The body of a wrap or unwrap, parsed and checked against the URL, with its access context.
pub(super) struct Body {
    pub(super) request: KeyOpRequest,
    pub(super) reason: AccessReason,
    pub(super) health_check: bool,
}

impl Body {
    pub(super) fn parse(body: &[u8], key_path: &str) -> Result<Body, GcpError> {
        let request: KeyOpRequest = parse(body)?;
        check_key_path(request.key_path.as_deref(), key_path)?;
        let context = request.additional_context.as_ref();
        let reason = RequestContext::access_reason(context).map_err(|e| {
            GcpError::invalid_field(
                "additionalContext.accessReasonContext.reason",
                e.to_string(),
            )
        })?;
        let health_check = context.and_then(|c| c.is_key_health_check) == Some(true);
        Ok(Body {
            reason,
            health_check,
            request,
        })
    }

    /// The caller's resource using the key (`relativeResourceName`), when given.
    pub(super) fn resource(&self) -> Option<&str> {
        self.request
            .additional_context
            .as_ref()
            .and_then(|c| c.relative_resource_name.as_deref())
            .filter(|r| !r.is_empty())
    }
}

/// A positive decision: the permit and the grant that allowed it (for the audit line).
pub(super) struct Granted {
    pub(super) permit: Permit,
    pub(super) grant: String,
}

/// A request ready for the HSM.
pub(super) struct Prepared {
    pub(super) granted: Granted,
    pub(super) aad: Vec<u8>,
    pub(super) op: PreparedOp,
}

/// The HSM call a prepared request makes.
pub(super) enum PreparedOp {
    Wrap {
        plaintext: Zeroizing<Vec<u8>>,
        flags: u8,
    },
    Unwrap {
        flags: u8,
        key_version: String,
        iv: Vec<u8>,
        ciphertext: Vec<u8>,
        tag: [u8; crate::core::GCM_TAG_LEN],
    },
}

/// The request facts authorization needs.
pub(super) struct Access<'a> {
    pub(super) principal: &'a Principal,
    pub(super) key: &'a GcpKeySettings,
    pub(super) resource: Option<&'a str>,
    pub(super) reason: &'a AccessReason,
    pub(super) health_check: bool,
}
