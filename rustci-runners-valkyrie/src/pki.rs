//! The control plane's private certificate authority: created on first start in the data
//! directory, it signs the server's certificate and every agent's client certificate.
//! Agents pin it by the SHA-256 fingerprint of its DER encoding (`sha256:<64 hex>`),
//! the way `kubeadm join --discovery-token-ca-cert-hash` does.
//!
//! Files (all PEM; keys mode 0600): `ca.pem`, `ca.key`, `server.pem` (leaf then CA),
//! `server.key`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// The DNS name every control-plane certificate carries and agents verify, whatever
/// address they reach it by: the CA is private and pinned, so a fixed name is as strong
/// as a host name and survives address changes (containers, NAT, load balancers).
pub const SERVER_NAME: &str = "rustci-control-plane";

/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a server certificate is valid; it is re-issued at start when less than a
/// third is left.
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A certificate, key or request could not be made or read.
    #[error("{context}: {message}")]
    Invalid {
        /// What was being done.
        context: String,
        /// The cause.
        message: String,
    },
}

fn invalid(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let context = context.into();
    move |e| PkiError::Invalid {
        context,
        message: e.to_string(),
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PkiError {
    let context = context.into();
    move |source| PkiError::Io { context, source }
}

/// `sha256:<hex>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", crate::spool::hex(&Sha256::digest(der)))
}

/// Parses a fingerprint as printed by the server: `sha256:` and 64 hex digits (colons
/// between bytes and upper case are accepted).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hex = s.strip_prefix("sha256:").ok_or_else(|| {
        format!("a CA fingerprint starts with \"sha256:\" (as the server prints it), not {s:?}")
    })?;
    let hex: String = hex.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "a CA fingerprint has 64 hex digits after \"sha256:\"; {s:?} does not"
        ));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(out)
}

/// Writes a private file (mode 0600) atomically and fsynced.
pub(crate) fn write_private(path: &Path, data: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// The first certificate of a PEM text, as DER.
pub fn first_cert_der(pem: &str) -> Result<CertificateDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "no certificate in the PEM text".to_string())?
        .map_err(|e| format!("reading a PEM certificate: {e}"))
}

/// Expiry of a DER certificate.
pub fn not_after(der: &[u8]) -> Result<SystemTime, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("reading a certificate: {e}"))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

/// The common name of a DER certificate's subject.
pub fn common_name(der: &[u8]) -> Result<String, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("reading a certificate: {e}"))?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or_else(|| "the certificate has no common name".to_string())
}

/// The control plane's CA.
pub struct Authority {
    dir: PathBuf,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// The server's certificate chain and key, PEM.
#[derive(Clone)]
pub struct ServerIdentity {
    /// Leaf certificate followed by the CA.
    pub chain_pem: String,
    /// The leaf's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity").finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads the CA from `dir`, or creates it there (with the directory). Returns it and
    /// whether it was created now.
    pub fn load_or_create(dir: &Path) -> Result<(Authority, bool), PkiError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if let (Some(cert), Some(key)) = (read(&cert_path)?, read(&key_path)?) {
            let key = KeyPair::from_pem(&key).map_err(invalid(format!(
                "reading the CA key {}",
                key_path.display()
            )))?;
            let issuer = Issuer::from_ca_cert_pem(&cert, key).map_err(invalid(format!(
                "reading the CA certificate {}",
                cert_path.display()
            )))?;
            let ca_der = first_cert_der(&cert).map_err(|message| PkiError::Invalid {
                context: format!("reading {}", cert_path.display()),
                message,
            })?;
            return Ok((
                Authority {
                    dir: dir.to_path_buf(),
                    ca_pem: cert,
                    ca_der,
                    issuer,
                },
                false,
            ));
        }
        let key = KeyPair::generate().map_err(invalid("generating the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A name of its own: a certificate of another control plane's CA then fails as
        // "unknown issuer", not as a signature that does not verify.
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        dn.push(DnType::CommonName, format!("rustci control plane CA {tag}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + CA_VALIDITY);
        let cert = params
            .self_signed(&key)
            .map_err(invalid("creating the CA certificate"))?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &cert.pem())?;
        let ca_pem = cert.pem();
        Ok((
            Authority {
                dir: dir.to_path_buf(),
                ca_der: cert.der().clone(),
                ca_pem,
                issuer: Issuer::new(params, key),
            },
            true,
        ))
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// `sha256:<hex>` of the CA certificate: what agents pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.ca_der)
    }

    /// The server's certificate for [`SERVER_NAME`] plus `names` (host names and IP
    /// addresses), loaded from the directory when it covers them and is not near expiry,
    /// otherwise issued now and stored.
    pub fn server_identity(&self, names: &[String]) -> Result<ServerIdentity, PkiError> {
        let (cert_path, key_path) = (self.dir.join("server.pem"), self.dir.join("server.key"));
        let mut wanted: Vec<String> = vec![SERVER_NAME.to_string()];
        for n in names {
            if !n.is_empty() && !wanted.contains(n) {
                wanted.push(n.clone());
            }
        }
        if let (Some(chain), Some(key)) = (read(&cert_path)?, read(&key_path)?)
            && let Ok(der) = first_cert_der(&chain)
            && self.still_good(&der, &wanted)
        {
            return Ok(ServerIdentity {
                chain_pem: chain,
                key_pem: key,
            });
        }
        let key = KeyPair::generate().map_err(invalid("generating the server key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, SERVER_NAME);
        params.distinguished_name = dn;
        params.subject_alt_names = wanted
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(invalid(format!("server name {n:?}"))),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + SERVER_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(invalid("signing the server certificate"))?;
        let chain_pem = format!("{}{}", cert.pem(), self.ca_pem);
        let key_pem = key.serialize_pem();
        write_private(&key_path, &key_pem)?;
        write_private(&cert_path, &chain_pem)?;
        Ok(ServerIdentity { chain_pem, key_pem })
    }

    fn still_good(&self, der: &CertificateDer<'_>, names: &[String]) -> bool {
        use x509_parser::prelude::FromDer;
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
            return false;
        };
        // Signed by this CA (a CA replaced by hand makes the old leaf useless).
        let Ok((_, ca)) = x509_parser::certificate::X509Certificate::from_der(&self.ca_der) else {
            return false;
        };
        if cert.verify_signature(Some(ca.public_key())).is_err() {
            return false;
        }
        let validity = cert.validity();
        let left =
            validity.not_after.timestamp() - time::OffsetDateTime::now_utc().unix_timestamp();
        if left < (SERVER_VALIDITY.as_secs() / 3) as i64 {
            return false;
        }
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return false;
        };
        let have: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                    16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        names.iter().all(|n| have.contains(n))
    }

    /// Signs a client certificate for agent `agent_id` over the key of `csr_pem`, valid
    /// for `validity`. The request's own subject and extensions are ignored: the
    /// certificate names the agent and allows client authentication only.
    pub fn sign_agent(
        &self,
        csr_pem: &str,
        agent_id: &str,
        validity: Duration,
    ) -> Result<(String, SystemTime), PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(invalid("reading the certificate signing request"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        // A little in the past: an agent whose clock is slightly behind still accepts it.
        params.not_before = offset(now - Duration::from_secs(300));
        let until = now + validity;
        params.not_after = offset(until);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(invalid("signing the agent certificate"))?;
        Ok((cert.pem(), until))
    }
}

/// A new key pair and a certificate signing request for it, PEM: `(key, csr)`.
pub fn new_key_and_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(invalid("generating the agent key"))?;
    csr_for(&key.serialize_pem(), name).map(|csr| (key.serialize_pem(), csr))
}

/// A certificate signing request for an existing key (PEM).
pub fn csr_for(key_pem: &str, name: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(invalid("reading the agent key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(invalid("creating the certificate signing request"))
}

/// A TLS server-certificate verifier that trusts the CA whose fingerprint is pinned,
/// found in the chain the server presents: the leaf must verify against that CA for
/// [`SERVER_NAME`]. What the agent uses on first contact, before it has the CA file.
#[derive(Debug)]
pub struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: std::sync::Mutex<Option<CertificateDer<'static>>>,
}

impl PinnedCa {
    /// A verifier for the CA with this SHA-256 fingerprint.
    pub fn new(pin: [u8; 32]) -> Self {
        PinnedCa {
            pin,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            found: std::sync::Mutex::new(None),
        }
    }

    /// The pinned CA, once a handshake presented it.
    pub fn found(&self) -> Option<CertificateDer<'static>> {
        self.found.lock().expect("pin").clone()
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref())[..] == self.pin[..])
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's certificate chain has no CA with the pinned fingerprint".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("the pinned CA is not usable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().expect("pin") = Some(ca.clone().into_owned());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects to `addr` with TLS, verifies the server against the CA pinned by `pin`, and
/// returns that CA's PEM. The agent's first step, before it registers.
pub async fn fetch_pinned_ca(addr: &str, pin: [u8; 32]) -> Result<String, String> {
    fetch_pinned_ca_named(addr, SERVER_NAME, pin).await
}

/// [`fetch_pinned_ca`] for a server that must prove the name `server_name` (a host name
/// or an IP address): how a client of the HTTPS API fetches the CA it then trusts.
pub async fn fetch_pinned_ca_named(
    addr: &str,
    server_name: &str,
    pin: [u8; 32],
) -> Result<String, String> {
    let verifier = Arc::new(PinnedCa::new(pin));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(verifier.clone())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("server name {server_name:?}: {e}"))?;
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {addr}: {e}"))?;
    let der = verifier
        .found()
        .ok_or_else(|| format!("{addr} presented no CA with the pinned fingerprint"))?;
    Ok(der_to_pem(&der))
}

/// PEM text of a DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = Authority::load_or_create(dir.path()).unwrap();
        assert!(created);
        let fp = ca.fingerprint();
        assert_eq!(fp.len(), 71);
        let parsed = parse_fingerprint(&fp).unwrap();
        assert_eq!(parsed[..], Sha256::digest(ca.ca_der().as_ref())[..]);
        let upper_colons: String = fp.as_bytes()[7..]
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            parse_fingerprint(&format!("sha256:{upper_colons}")).unwrap(),
            parsed
        );
        assert!(parse_fingerprint(&fp[7..]).unwrap_err().contains("sha256:"));
        assert!(
            parse_fingerprint("sha256:abcd")
                .unwrap_err()
                .contains("64 hex")
        );
        // Loading again gives the same CA.
        let (again, created) = Authority::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(again.fingerprint(), fp);
        // PEM written by hand is what rustls reads back.
        assert_eq!(
            first_cert_der(&der_to_pem(ca.ca_der())).unwrap(),
            *ca.ca_der()
        );
    }

    #[test]
    fn server_certificate_is_reused_until_its_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = Authority::load_or_create(dir.path()).unwrap();
        let a = ca
            .server_identity(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let b = ca.server_identity(&["127.0.0.1".into()]).unwrap();
        assert_eq!(a.chain_pem, b.chain_pem, "names covered: reused");
        let c = ca.server_identity(&["cp.example".into()]).unwrap();
        assert_ne!(a.chain_pem, c.chain_pem, "a new name: re-issued");
    }

    #[test]
    fn agent_certificates_name_the_agent_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = Authority::load_or_create(dir.path()).unwrap();
        let (_key, csr) = new_key_and_csr("whatever the agent says").unwrap();
        let (pem, until) = ca
            .sign_agent(&csr, "agent-123", Duration::from_secs(3600))
            .unwrap();
        let der = first_cert_der(&pem).unwrap();
        assert_eq!(common_name(&der).unwrap(), "agent-123");
        let expiry = not_after(&der).unwrap();
        let diff = until
            .duration_since(expiry)
            .unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(2), "{diff:?}");
        let err = ca
            .sign_agent("not a csr", "x", Duration::from_secs(60))
            .unwrap_err();
        assert!(
            err.to_string().contains("certificate signing request"),
            "{err}"
        );
    }
}
