//! `http_get`: fetches a URL on the tokio runtime, within the configured allowlist.
//!
//! Guarding against server-side request forgery takes three checks: the host must be on the
//! allowlist (at submit time), every address it resolves to must be public unless private
//! ranges are allowed (at run time, since DNS can change), and the connection goes to the
//! address that was checked (reqwest's `resolve` pins it, so a second lookup cannot rebind
//! it). Redirects are not followed, since they could lead anywhere.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::files::hex;
use super::{arg_str, JobCtx, Task, TaskError, TaskResult};
use crate::config::Settings;
use crate::job::Kind;

pub struct HttpGet {
    allow_hosts: Vec<String>,
    allow_private: bool,
    max_bytes: u64,
    timeout: Duration,
}

impl HttpGet {
    pub fn new(settings: &Settings) -> Self {
        HttpGet {
            allow_hosts: settings.http_allow_hosts.clone(),
            allow_private: settings.http_allow_private,
            max_bytes: settings.http_max_bytes,
            timeout: Duration::from_millis(settings.http_timeout_ms),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow_hosts.iter().any(|pattern| {
            let pattern = pattern.to_ascii_lowercase();
            if pattern == "*" {
                true
            } else if let Some(suffix) = pattern.strip_prefix("*.") {
                host.ends_with(&format!(".{suffix}"))
            } else {
                host == pattern
            }
        })
    }

    fn parse(&self, raw: &str) -> Result<reqwest::Url, String> {
        let url =
            reqwest::Url::parse(raw).map_err(|e| format!("args.url: `{raw}` is not a URL: {e}"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!(
                "args.url: scheme `{}` is not supported; use http:// or https://",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("args.url: credentials in the URL are not allowed".into());
        }
        let host = url.host_str().ok_or("args.url: has no host")?;
        if !self.host_allowed(host.trim_start_matches('[').trim_end_matches(']')) {
            return Err(format!(
                "args.url: host `{host}` is not on the allowlist (--http-allow-hosts)"
            ));
        }
        if let Some(ip) = literal_ip(&url) {
            if !self.allow_private && !is_public(ip) {
                return Err(format!(
                    "args.url: {ip} is a loopback or private address; refused \
                     (allow with --http-allow-private)"
                ));
            }
        }
        Ok(url)
    }
}

fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    }
}

/// True for addresses on the public internet; false for loopback, private, link-local,
/// carrier-grade NAT, unspecified, multicast and documentation ranges.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64))
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

#[async_trait]
impl Task for HttpGet {
    fn name(&self) -> &str {
        "http_get"
    }
    fn description(&self) -> &str {
        "GETs an http:// or https:// URL on an allowed host (async io); its status, size and sha256. Redirects are not followed."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io]
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"url": {"type": "string", "minLength": 1, "maxLength": 8192}},
            "required": ["url"],
            "additionalProperties": false
        })
    }
    fn check_args(&self, args: &Value) -> Result<(), String> {
        match args.get("url").and_then(Value::as_str) {
            Some(u) => self.parse(u).map(|_| ()),
            None => Ok(()),
        }
    }
    async fn run_async(&self, _ctx: JobCtx, args: Value) -> TaskResult {
        let url = self
            .parse(arg_str(&args, "url")?)
            .map_err(TaskError::Permanent)?;
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|e| TaskError::Transient(format!("cannot resolve `{host}`: {e}")))?
            .collect();
        let addr = addrs
            .iter()
            .copied()
            .find(|a| self.allow_private || is_public(a.ip()))
            .ok_or_else(|| {
                TaskError::Permanent(format!(
                    "`{host}` resolves only to loopback or private addresses; refused \
                     (allow with --http-allow-private)"
                ))
            })?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .resolve(&bare, addr)
            .no_proxy()
            .build()
            .map_err(|e| TaskError::Permanent(format!("http client: {e}")))?;
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| TaskError::Transient(format!("GET failed: {e}")))?;
        let status = response.status().as_u16();
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes)
        {
            return Err(TaskError::Permanent(format!(
                "the response is larger than the {} bytes allowed (--http-max-bytes)",
                self.max_bytes
            )));
        }
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| TaskError::Transient(format!("reading the body failed: {e}")))?;
            bytes += chunk.len() as u64;
            if bytes > self.max_bytes {
                return Err(TaskError::Permanent(format!(
                    "the response is larger than the {} bytes allowed (--http-max-bytes)",
                    self.max_bytes
                )));
            }
            hasher.update(&chunk);
        }
        Ok(json!({ "status": status, "bytes": bytes, "sha256": hex(&hasher.finalize()) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
