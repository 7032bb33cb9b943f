//! Property checks over the parsers of attacker-controlled bytes, shared by the `cargo fuzz`
//! targets in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the checked-in corpora on
//! stable so CI runs the same checks without a fuzzer.
//!
//! Each check returns `Err(why)` when a property fails (a panic inside a parser is a failure
//! too); "the input was rejected" is not a failure. The properties go beyond "no panic":
//! a request body that parses re-serializes to a fixed point, a wrapped blob decodes and
//! re-encodes to the same bytes, a SigV4 `Authorization` value re-renders to the same components,
//! and the canonical request is a pure function of the signed parts.
//!
//! Not an API: the module is hidden from the docs and may change with the parsers it covers.

use std::path::Path;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::auth::jwt::fuzz_support as jwt;
use crate::auth::sigv4::fuzz_support as sigv4;
use crate::authz::access_reason::AccessReason;
use crate::front::gcp::{blob, wire as gcp_wire};
use crate::front::xks::wire as xks_wire;

/// The outcome of one property check.
pub type Checked = Result<(), String>;

/// A property check over one input.
pub type Check = fn(&[u8]) -> Checked;

/// Every fuzz target, by the name of its `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("sigv4_authorization", sigv4_authorization),
    ("sigv4_canonical", sigv4_canonical),
    ("xks_request", xks_request),
    ("gcp_request", gcp_request),
    ("gcp_blob", gcp_blob),
    ("jwt_token", jwt_token),
    ("jwks", jwks),
    ("config", config),
];

/// Run the check of target `name` on `data`.
pub fn check(name: &str, data: &[u8]) -> Checked {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => f(data),
        None => Err(format!("no fuzz target named {name}")),
    }
}

fn ensure(condition: bool, why: impl FnOnce() -> String) -> Checked {
    if condition { Ok(()) } else { Err(why()) }
}

/// A SigV4 `Authorization` value that parses re-renders (in the signers' shape) to a value that
/// parses to the same components.
pub fn sigv4_authorization(data: &[u8]) -> Checked {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let Ok(parsed) = sigv4::parse(text) else {
        return Ok(());
    };
    let rendered = sigv4::render(&parsed);
    match sigv4::parse(&rendered) {
        Ok(again) => ensure(again == parsed, || {
            format!("re-rendered {rendered:?} parsed to {again:?}, not {parsed:?}")
        }),
        Err(e) => Err(format!("re-rendered {rendered:?} does not parse: {e}")),
    }
}

/// The canonical request is a pure function of the signed parts: computing it twice, adding an
/// unsigned header, or re-encoding an already canonical path changes nothing, and the canonical
/// URI holds only unreserved bytes, `/` and `%XX` triplets.
///
/// Input: `method \n path \n query \n signed-headers \n (name: value \n)*`.
pub fn sigv4_canonical(data: &[u8]) -> Checked {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let mut lines = text.split('\n');
    let (Some(method), Some(path), Some(query), Some(signed)) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return Ok(());
    };
    if !sigv4::signed_headers_ok(signed) {
        return Ok(());
    }
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.append(name, value);
        }
    }
    let canonical = |path: &str, headers: &HeaderMap| {
        sigv4::canonical_request(method, path, query, headers, Some("fuzz.example"), signed)
    };
    let Ok(first) = canonical(path, &headers) else {
        return Ok(());
    };
    let second = canonical(path, &headers).map_err(|e| format!("second run failed: {e}"))?;
    ensure(first == second, || "two runs disagree".to_owned())?;
    let unsigned = "x-fuzz-unsigned";
    if !signed.split(';').any(|n| n == unsigned) {
        let mut more = headers.clone();
        more.append(unsigned, HeaderValue::from_static("changed"));
        let with_unsigned =
            canonical(path, &more).map_err(|e| format!("unsigned header broke it: {e}"))?;
        ensure(with_unsigned == first, || {
            "an unsigned header changed the canonical request".to_owned()
        })?;
    }
    let uri_line = first
        .split(|b| *b == b'\n')
        .nth(1)
        .ok_or("canonical request has no URI line")?;
    let mut i = 0;
    while i < uri_line.len() {
        let b = uri_line[i];
        if b == b'%' {
            let triplet = uri_line.get(i + 1..i + 3);
            ensure(
                triplet.is_some_and(|t| t.iter().all(u8::is_ascii_hexdigit)),
                || {
                    format!(
                        "bare '%' in canonical URI {:?}",
                        String::from_utf8_lossy(uri_line)
                    )
                },
            )?;
            i += 3;
        } else {
            ensure(
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/'),
                || format!("byte {b:#04x} left unencoded in the canonical URI"),
            )?;
            i += 1;
        }
    }
    // Encoding is idempotent: a canonical path is its own canonical form.
    let encoded = std::str::from_utf8(uri_line).map_err(|e| e.to_string())?;
    let again = canonical(encoded, &headers).map_err(|e| e.to_string())?;
    let again_uri = again.split(|b| *b == b'\n').nth(1).unwrap_or_default();
    ensure(again_uri == uri_line, || {
        format!(
            "re-encoding {:?} gave {:?}",
            encoded,
            String::from_utf8_lossy(again_uri)
        )
    })
}

/// Serialize `parsed`, parse that as `$ty` and serialize again: the two must be equal. (A
/// macro, because the borrowing wire types cannot be named by one generic parse function.)
macro_rules! fixed_point {
    ($parsed:expr, $ty:ty) => {{
        let once = serde_json::to_vec($parsed).map_err(|e| format!("does not serialize: {e}"))?;
        let again: $ty =
            serde_json::from_slice(&once).map_err(|e| format!("does not reparse: {e}"))?;
        let twice = serde_json::to_vec(&again).map_err(|e| e.to_string())?;
        ensure(once == twice, || {
            format!(
                "not a fixed point: {} became {}",
                String::from_utf8_lossy(&once),
                String::from_utf8_lossy(&twice)
            )
        })
    }};
}

/// An XKS request body that parses re-serializes to a fixed point. The first byte picks the
/// API (metadata-only, encrypt, decrypt); the rest is the body.
pub fn xks_request(data: &[u8]) -> Checked {
    let Some((&kind, body)) = data.split_first() else {
        return Ok(());
    };
    match kind % 3 {
        0 => match serde_json::from_slice::<xks_wire::MetadataOnlyRequest<'_>>(body) {
            Ok(parsed) => fixed_point!(&parsed, xks_wire::MetadataOnlyRequest<'_>),
            Err(_) => Ok(()),
        },
        1 => match serde_json::from_slice::<xks_wire::EncryptRequest<'_>>(body) {
            Ok(parsed) => fixed_point!(&parsed, xks_wire::EncryptRequest<'_>),
            Err(_) => Ok(()),
        },
        _ => match serde_json::from_slice::<xks_wire::DecryptRequest<'_>>(body) {
            Ok(parsed) => fixed_point!(&parsed, xks_wire::DecryptRequest<'_>),
            Err(_) => Ok(()),
        },
    }
}

/// A Cloud EKM request body that parses re-serializes to a fixed point; its justification parses
/// the same way before and after; a numeric reason string means what the number means.
pub fn gcp_request(data: &[u8]) -> Checked {
    let Ok(parsed) = serde_json::from_slice::<gcp_wire::KeyOpRequest>(data) else {
        return Ok(());
    };
    fixed_point!(&parsed, gcp_wire::KeyOpRequest)?;
    let reason = gcp_wire::RequestContext::access_reason(parsed.additional_context.as_ref());
    let once = serde_json::to_vec(&parsed).map_err(|e| e.to_string())?;
    let again: gcp_wire::KeyOpRequest =
        serde_json::from_slice(&once).map_err(|e| format!("does not reparse: {e}"))?;
    let reason_again = gcp_wire::RequestContext::access_reason(again.additional_context.as_ref());
    ensure(reason == reason_again, || {
        format!("justification changed across re-serialization: {reason:?} vs {reason_again:?}")
    })?;
    if let Some(gcp_wire::ReasonValue::Name(name)) = parsed
        .additional_context
        .as_ref()
        .and_then(|c| c.access_reason_context.as_ref())
        .and_then(|a| a.reason.as_ref())
        && let Ok(code) = name.parse::<i64>()
        && let Ok(from_string) = AccessReason::from_json_string(name)
    {
        ensure(
            Ok(from_string.clone()) == AccessReason::from_json_number(code),
            || format!("reason {name:?} means {from_string:?} as a string but not as a number"),
        )?;
    }
    for field in [
        parsed.plaintext.as_deref(),
        parsed.wrapped_blob.as_deref(),
        parsed.additional_authenticated_data.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        if let Ok(bytes) = gcp_wire::b64_decode(field) {
            ensure(
                bytes.len() <= gcp_wire::decoded_len_upper_bound(field.len()),
                || "decoded more bytes than the bound allows".to_owned(),
            )?;
        }
    }
    Ok(())
}

/// decode(encode(x)) == x and encode(decode(b)) == b for the wrapped-blob format.
pub fn gcp_blob(data: &[u8]) -> Checked {
    if let Ok(parsed) = blob::parse(data) {
        let encoded = blob::encode(
            parsed.flags,
            parsed.key_version,
            parsed.iv,
            parsed.ciphertext,
            &parsed.tag,
        );
        ensure(encoded == data, || {
            "parse then encode changed the bytes".to_owned()
        })?;
    }
    // Build a blob from the input's parts and decode it.
    let [flags, id_len, rest @ ..] = data else {
        return Ok(());
    };
    let id_len = usize::from(*id_len).clamp(1, rest.len().max(1));
    let Some(id) = rest
        .get(..id_len)
        .and_then(|id| std::str::from_utf8(id).ok())
    else {
        return Ok(());
    };
    let rest = rest.get(id_len..).unwrap_or_default();
    if rest.len() < blob::IV_LEN + crate::core::GCM_TAG_LEN {
        return Ok(());
    }
    let (iv, rest) = rest.split_at(blob::IV_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - crate::core::GCM_TAG_LEN);
    let flags = flags & blob::FLAG_HEALTH_CHECK;
    let encoded = blob::encode(flags, id, iv, ciphertext, tag);
    let decoded = blob::parse(&encoded).map_err(|e| format!("encoded blob does not parse: {e}"))?;
    ensure(
        decoded.flags == flags
            && decoded.key_version == id
            && decoded.iv == iv
            && decoded.ciphertext == ciphertext
            && decoded.tag.as_slice() == tag,
        || "encode then parse lost a field".to_owned(),
    )
}

/// What the verifier reads from a token before any signature check is deterministic and never
/// yields an empty key id.
pub fn jwt_token(data: &[u8]) -> Checked {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let value = format!("Bearer {text}");
    let first = jwt::token(&value);
    let second = jwt::token(&value);
    ensure(format!("{first:?}") == format!("{second:?}"), || {
        "two reads of one token disagree".to_owned()
    })?;
    match first {
        Ok(view) => ensure(!view.kid.is_empty(), || "accepted an empty kid".to_owned()),
        Err(_) => Ok(()),
    }
}

/// A JWKS document parses deterministically, and a set that parses holds at least one key.
pub fn jwks(data: &[u8]) -> Checked {
    let first = jwt::jwks(data);
    ensure(first == jwt::jwks(data), || {
        "two parses disagree".to_owned()
    })?;
    match first {
        Ok(0) => Err("a key set with no usable key was accepted".to_owned()),
        _ => Ok(()),
    }
}

/// The config loader never panics and reports the same problems for the same text. File
/// references resolve under a directory that does not exist, so nothing outside is read.
pub fn config(data: &[u8]) -> Checked {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let base = Path::new("/nonexistent/ekm-proxy-fuzz");
    let run = || match crate::config::from_str(text, Path::new("fuzz.toml"), base) {
        Ok(settings) => format!("{settings:?}"),
        Err(e) => e.to_string(),
    };
    let first = run();
    ensure(first == run(), || {
        "two loads of one text disagree".to_owned()
    })
}
