//! A small client of the server's HTTP API (HTTP/1.1 over TLS, or plain on loopback),
//! used by the `rustci` command's server subcommands: JSON requests and server-sent-event
//! streams.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A client of one server, authenticating with one API key.
#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    key: Option<String>,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Which certificate authorities an `https://` client trusts.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Trust {
    /// The system's CA bundle (`$SSL_CERT_FILE`, else
    /// `/etc/ssl/certs/ca-certificates.crt`): for a certificate a public CA issued.
    #[default]
    System,
    /// These CA certificates (PEM, one or more): a server's data-directory CA
    /// (`<data>/pki/ca.pem`) or the CA of a brought certificate.
    CaPem(String),
    /// The CA whose SHA-256 fingerprint this is (`sha256:…` as the server prints it),
    /// found in the chain the server presents; the leaf must verify against it.
    Fingerprint([u8; 32]),
}

impl Trust {
    /// A configuration with no roots, for a client that never opens TLS.
    fn unused_config() -> Result<rustls::ClientConfig, String> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth())
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let roots_from = |pem: &[u8], what: &str| -> Result<rustls::RootCertStore, String> {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("reading {what}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("a certificate of {what} is not usable: {e}"))?;
            }
            Ok(roots)
        };
        let config = match self {
            Trust::System => {
                let path = std::env::var_os("SSL_CERT_FILE")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
                let pem = std::fs::read(&path).map_err(|e| {
                    format!(
                        "reading the system's CA bundle {} ({e}); give the server's CA \
                         (--ca, or --ca-fingerprint) or set SSL_CERT_FILE",
                        path.display()
                    )
                })?;
                // A system bundle may hold a certificate this client cannot use (an
                // unusual key or extension); the others still count.
                let mut roots = rustls::RootCertStore::empty();
                let (usable, _) = roots.add_parsable_certificates(
                    CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok),
                );
                if usable == 0 {
                    return Err(format!(
                        "the system's CA bundle {} holds no usable certificate",
                        path.display()
                    ));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::CaPem(pem) => {
                let roots = roots_from(pem.as_bytes(), "the CA file")?;
                if roots.is_empty() {
                    return Err("the CA file holds no certificate".into());
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::Fingerprint(pin) => builder
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(
                    rustci_runners_valkyrie::pki::PinnedCa::new(*pin),
                ))
                .with_no_client_auth(),
        };
        Ok(config)
    }
}

/// Every message of an error's source chain, joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// A whole response.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl ApiResponse {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The envelope's error message, or the status line when there is none.
    pub fn error_message(&self) -> String {
        let v = self.json();
        match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            _ => format!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ),
        }
    }
}

/// One server-sent event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (default `message`).
    pub event: String,
    /// `id:`, when given.
    pub id: Option<String>,
    /// `data:` lines joined by newlines.
    pub data: String,
}

/// Reads server-sent events from a response body.
#[derive(Debug)]
pub struct SseReader {
    body: Incoming,
    buf: Vec<u8>,
    /// HTTP status of the response.
    pub status: u16,
}

impl SseReader {
    /// The next event; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<SseEvent, String>> {
        loop {
            if let Some(end) = find_blank_line(&self.buf) {
                let raw: Vec<u8> = self.buf.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&raw[..end.0]).into_owned();
                let mut ev = SseEvent {
                    event: "message".into(),
                    ..SseEvent::default()
                };
                let mut data = Vec::new();
                for line in text.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => ev.event = value.to_string(),
                        "id" => ev.id = Some(value.to_string()),
                        "data" => data.push(value.to_string()),
                        _ => {}
                    }
                }
                ev.data = data.join("\n");
                return Some(Ok(ev));
            }
            match self.body.frame().await {
                None => return None,
                Some(Err(e)) => return Some(Err(format!("reading the event stream: {e}"))),
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        self.buf.extend_from_slice(d);
                    }
                }
            }
        }
    }
}

/// End of the first event in `buf`: (length of its text, bytes to consume).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    buf.windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2))
}

impl ApiClient {
    /// A client of the server at `base` (e.g. `https://127.0.0.1:8080`) that trusts the
    /// system's CA bundle ([`Trust::System`]).
    pub fn new(base: &str, key: Option<String>) -> Result<Self, String> {
        Self::with_trust(base, key, Trust::System)
    }

    /// A client of the server at `base` (`https://…`, or `http://…` for a server with
    /// plain HTTP on loopback) that verifies the server's certificate with `trust`.
    pub fn with_trust(base: &str, key: Option<String>, trust: Trust) -> Result<Self, String> {
        let base = base.trim_end_matches('/').to_string();
        if let Some(rest) = base.strip_prefix("http://") {
            // The API key would cross the network in clear: plain HTTP is for loopback.
            let authority = rest.split('/').next().unwrap_or_default();
            let host = match authority.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => h,
                _ => authority,
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(format!(
                    "server URL {base:?}: plain http:// only to a loopback address (the API key would cross the network in clear); use https://"
                ));
            }
        } else if !base.starts_with("https://") {
            return Err(format!(
                "server URL {base:?}: expected https://HOST:PORT (or http:// for a server with plain HTTP on loopback)"
            ));
        }
        // Plain HTTP checks no certificate, so it reads no CA (a host without a system
        // bundle can still reach a loopback server over http://).
        let tls = if base.starts_with("https://") {
            trust.client_config()?
        } else {
            Trust::unused_config()?
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(ApiClient {
            base,
            key,
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    fn build(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
    ) -> Result<hyper::Request<Full<Bytes>>, String> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.header("x-api-key", k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some((ctype, bytes)) => {
                req = req.header("content-type", ctype);
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        req.body(body)
            .map_err(|e| format!("building the request: {e}"))
    }

    async fn send(
        &self,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, String> {
        self.http.request(req).await.map_err(|e| {
            let text = chain(&e);
            let hint = if text.contains("certificate") || text.contains("pinned") {
                " (trust the server's CA with --ca FILE or --ca-fingerprint sha256:…, \
                     or run beside the server with --data-dir)"
            } else {
                ""
            };
            format!("cannot reach the server at {}: {text}{hint}", self.base)
        })
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
    ) -> Result<ApiResponse, String> {
        let response = self.send(self.build(method, path, body, headers)?).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the response: {e}"))?
            .to_bytes();
        Ok(ApiResponse {
            status,
            headers,
            body,
        })
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<ApiResponse, String> {
        self.request("GET", path, None, &[]).await
    }

    /// POST `path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<ApiResponse, String> {
        self.request(
            "POST",
            path,
            Some(("application/json", body.to_string().into_bytes())),
            &[],
        )
        .await
    }

    /// Opens an event stream (GET with `Accept: text/event-stream` and extra headers).
    pub async fn events(&self, path: &str, headers: &[(&str, &str)]) -> Result<SseReader, String> {
        let mut all = vec![("accept", "text/event-stream")];
        all.extend_from_slice(headers);
        let response = self.send(self.build("GET", path, None, &all)?).await?;
        Ok(SseReader {
            status: response.status().as_u16(),
            body: response.into_body(),
            buf: Vec::new(),
        })
    }
}

#[cfg(feature = "server")]
impl ApiClient {
    /// A client of a [`Server`](crate::server::Server) started in this process: its URL,
    /// trusting its data directory's CA (the system's bundle when it brought its own
    /// certificate).
    pub fn of(server: &crate::server::Server, key: Option<String>) -> Result<Self, String> {
        let trust = match server.ca_pem() {
            Some(pem) if server.app().config.tls_cert.is_none() => Trust::CaPem(pem.to_string()),
            _ => Trust::System,
        };
        Self::with_trust(&server.url(), key, trust)
    }
}
