//! TLS termination inside CONNECT tunnels to intercepted hosts.
//!
//! Each configured MITM host gets its own rustls server configuration, built once at start. Its
//! certificate resolver serves the host's minted leaf only to a ClientHello whose SNI names
//! that same host: a client that asked to CONNECT to `api.openai.com` and then says
//! `evil.example` (or nothing) gets a fatal alert instead of a certificate for another name.
//! ALPN offers `h2` and `http/1.1`, so the decrypted connection speaks whatever the client
//! prefers. Each host's configuration keeps its own session cache, and rustls resumes a session
//! only for the SNI it was made for.
//!
//! Not here: what happens to the decrypted requests (the gateway, via `proxy`).

use std::collections::HashMap;
use std::sync::Arc;

use pingora::listeners::tls::Acceptor;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::app::AppState;
use crate::tls::{LeafCertCache, TlsError};
use crate::upstream::ProviderRoute;

/// An intercepted host: the provider its requests go to and its TLS acceptor.
pub struct MitmHost {
    pub provider: Arc<ProviderRoute>,
    pub acceptor: Acceptor,
}

/// Every configured MITM host by lowercase name.
pub struct MitmHosts {
    hosts: HashMap<String, MitmHost>,
}

impl MitmHosts {
    pub fn new(state: &AppState, leaves: &Arc<LeafCertCache>) -> Result<MitmHosts, TlsError> {
        let mut hosts = HashMap::new();
        for (name, provider) in &state.config().providers {
            let Some(route) = state.provider(name) else {
                continue;
            };
            for host in &provider.mitm_hosts {
                let resolver = Arc::new(TargetCertResolver {
                    host: host.clone(),
                    leaves: leaves.clone(),
                });
                let mut config = server_config_builder()?.with_cert_resolver(resolver);
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                hosts.insert(
                    host.clone(),
                    MitmHost {
                        provider: route.clone(),
                        acceptor: Acceptor::from_server_config(Arc::new(config)),
                    },
                );
            }
        }
        Ok(MitmHosts { hosts })
    }

    /// The host for a name as CONNECT targets and SNI names are normalised (lowercase, no
    /// trailing dot).
    pub fn get(&self, host: &str) -> Option<&MitmHost> {
        self.hosts.get(host)
    }

    /// Every MITM host name (to resolve their addresses, `governed`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }
}

/// The acceptor for the proxy listener's own TLS (an `https://` proxy URL): one fixed
/// certificate, HTTP/1.1 only (a CONNECT is an HTTP/1.1 request).
pub fn listener_acceptor(cert: Arc<CertifiedKey>) -> Result<Acceptor, TlsError> {
    let mut config = server_config_builder()?.with_cert_resolver(Arc::new(FixedCert(cert)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Acceptor::from_server_config(Arc::new(config)))
}

fn server_config_builder(
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth())
}

/// Serves the leaf of one host, and only when the ClientHello names that host.
#[derive(Debug)]
struct TargetCertResolver {
    host: String,
    leaves: Arc<LeafCertCache>,
}

impl ResolvesServerCert for TargetCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            tracing::info!(target_host = %self.host, "MITM handshake refused: the ClientHello names no host (SNI)");
            return None;
        };
        if !sni.trim_end_matches('.').eq_ignore_ascii_case(&self.host) {
            tracing::info!(target_host = %self.host, sni = %sni, "MITM handshake refused: the ClientHello names another host than the CONNECT");
            return None;
        }
        match self.leaves.get(&self.host) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                tracing::error!(error = %e, "cannot mint a leaf certificate");
                None
            }
        }
    }
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
