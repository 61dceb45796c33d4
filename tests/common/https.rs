//! A small HTTPS client for the tests: real TLS (rustls, ring) to the node's TCP port, with or
//! without a client certificate, HTTP/1.1 or HTTP/2, one connection per request.

use std::net::SocketAddr;
use std::sync::Arc;

use bayard::transport::TlsFiles;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Clone)]
pub struct Https {
    pub address: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    http2: bool,
}

/// An answer: status, headers, and the body as JSON (`Null` when empty, a string when not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: serde_json::Value,
}

fn roots(ca: &std::path::Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(certificate.expect("ca pem")).expect("ca");
    }
    roots
}

fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
}

impl Https {
    /// Trusts the cluster CA, presents no certificate (API keys or nothing).
    pub fn anonymous(address: SocketAddr, ca: &std::path::Path) -> Self {
        let tls = builder().with_root_certificates(roots(ca)).with_no_client_auth();
        Https { address, tls: Arc::new(with_alpn(tls)), http2: false }
    }

    /// Presents a client or admin certificate.
    pub fn with_certificate(address: SocketAddr, files: &TlsFiles) -> Self {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&files.certificate).expect("cert").map(|c| c.expect("pem")).collect();
        let key = PrivateKeyDer::from_pem_file(&files.private_key).expect("key");
        let tls = builder()
            .with_root_certificates(roots(&files.ca_certificate))
            .with_client_auth_cert(chain, key)
            .expect("client auth");
        Https { address, tls: Arc::new(with_alpn(tls)), http2: false }
    }

    /// Speaks HTTP/2 (negotiated by ALPN).
    pub fn http2(mut self) -> Self {
        let mut config = (*self.tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        self.tls = Arc::new(config);
        self.http2 = true;
        self
    }

    /// A TLS connection on which nothing is sent (what a slow or hostile caller holds).
    pub async fn open_silent(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.address).await.expect("connect");
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("tls")
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send("GET", path, headers, None).await
    }

    pub async fn json(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &serde_json::Value) -> Answer {
        let mut with_type = vec![("content-type", "application/json")];
        with_type.extend_from_slice(headers);
        self.send(method, path, &with_type, Some(body.to_string().into_bytes())).await
    }

    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Answer {
        self.try_send(method, path, headers, body).await.expect("https request")
    }

    /// The request, or why it could not be made (TLS refused, connection closed).
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let tcp = tokio::net::TcpStream::connect(self.address).await.map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let io = TokioIo::new(tls);
        let mut request = hyper::Request::builder().method(method).uri(path).header("host", "localhost");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(bytes::Bytes::from(body.unwrap_or_default()))).expect("request");
        let response = if self.http2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            sender.send_request(request).await.map_err(|e| e.to_string())?
        } else {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            sender.send_request(request).await.map_err(|e| e.to_string())?
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer { status, headers, body })
    }
}

fn with_alpn(mut config: rustls::ClientConfig) -> rustls::ClientConfig {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}
