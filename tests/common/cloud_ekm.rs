//! A minimal Cloud EKM client for tests outside `tests/gcp.rs`: `POST <prefix>/k1:wrap|unwrap`
//! with a freshly signed bearer token from the test signer and a customer-initiated context.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use ekm_proxy::client::{ClientTls, Response, XksClient, XksClientConfig};
use ekm_proxy::secret::SecretString;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::Full;
use serde_json::{Value, json};

use super::jwks::signer1;
use super::proxy::{GCP_PREFIX, TestProxy};

/// Client settings for the proxy's TLS listener without SigV4 (bearer-token fronts): the test
/// CA, no client certificate.
pub fn bearer_client_config(proxy: &TestProxy) -> XksClientConfig {
    let addr = proxy.addr("tls");
    XksClientConfig {
        addr,
        tls: Some(ClientTls {
            ca_pem: proxy.pki.ca.cert_pem().into_bytes(),
            client_cert_pem: None,
            client_key_pem: None,
            server_name: "localhost".into(),
        }),
        host: format!("localhost:{}", addr.port()),
        prefix: String::new(),
        access_key_id: String::new(),
        secret: SecretString::from(""),
        region: String::new(),
        service: String::new(),
    }
}

/// Minimal Cloud EKM client: `POST <prefix>/k1:wrap|unwrap` with a fresh bearer token.
pub struct GcpClient {
    cfg: Arc<XksClientConfig>,
    client: Option<XksClient>,
}

impl GcpClient {
    pub fn new(proxy: &TestProxy) -> Self {
        Self {
            cfg: Arc::new(bearer_client_config(proxy)),
            client: None,
        }
    }

    pub async fn op(&mut self, op: &str, body: Value) -> Response {
        if self.client.as_ref().is_none_or(XksClient::is_closed) {
            self.client = Some(XksClient::connect(self.cfg.clone()).await.expect("connect"));
        }
        let req = http::Request::post(format!("{GCP_PREFIX}/k1:{op}"))
            .header(HOST, &self.cfg.host)
            .header(CONTENT_TYPE, "application/json")
            .header(
                AUTHORIZATION,
                format!("Bearer {}", signer1().token().sign()),
            )
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
            .unwrap();
        let client = self.client.as_mut().unwrap();
        match client.send_raw(req).await {
            Ok(r) => r,
            Err(e) => {
                self.client = None;
                panic!("Cloud EKM {op}: transport: {e}");
            }
        }
    }

    pub fn context() -> Value {
        json!({
            "relativeResourceName": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
            "accessReasonContext": { "reason": "CUSTOMER_INITIATED_ACCESS" },
        })
    }

    pub async fn wrap(&mut self, plaintext: &[u8]) -> Response {
        let body =
            json!({ "plaintext": B64.encode(plaintext), "additionalContext": Self::context() });
        self.op("wrap", body).await
    }

    pub async fn unwrap(&mut self, blob: &str) -> Response {
        let body = json!({ "wrappedBlob": blob, "additionalContext": Self::context() });
        self.op("unwrap", body).await
    }
}
