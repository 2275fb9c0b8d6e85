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

/// Where the server may send requests on a caller's behalf (`http_get`, completion
/// callbacks): hosts on the allowlist (`--http-allow-hosts`), and public addresses only unless
/// `--http-allow-private`. [`AddressRules::check`] judges a URL at submit time;
/// [`AddressRules::client`] resolves it at send time and pins the connection to an address
/// that passed.
#[derive(Clone, Debug)]
pub struct AddressRules {
    allow_hosts: Vec<String>,
    allow_private: bool,
}

/// Why [`AddressRules::client`] gave no client.
#[derive(Debug)]
pub enum AddressError {
    /// The name did not resolve (DNS may answer later).
    Unresolved(String),
    /// Every address it resolves to is refused, or no client could be built.
    Refused(String),
}

impl AddressRules {
    pub fn new(settings: &Settings) -> Self {
        AddressRules {
            allow_hosts: settings.http_allow_hosts.clone(),
            allow_private: settings.http_allow_private,
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

    /// Parses `raw` and checks it against the rules as far as can be done without DNS: an
    /// http(s) URL without credentials, on an allowed host, and not a refused address literal.
    /// Messages start with `field` (`args.url`, `callback_url`).
    pub fn check(&self, field: &str, raw: &str) -> Result<reqwest::Url, String> {
        let url =
            reqwest::Url::parse(raw).map_err(|e| format!("{field}: `{raw}` is not a URL: {e}"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!(
                "{field}: scheme `{}` is not supported; use http:// or https://",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{field}: credentials in the URL are not allowed"));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("{field}: has no host"))?;
        if !self.host_allowed(host.trim_start_matches('[').trim_end_matches(']')) {
            return Err(format!(
                "{field}: host `{host}` is not on the allowlist (--http-allow-hosts)"
            ));
        }
        if let Some(ip) = literal_ip(&url) {
            if !self.allow_private && !is_public(ip) {
                return Err(format!(
                    "{field}: {ip} is a loopback, private or reserved address; refused \
                     (allow with --http-allow-private)"
                ));
            }
        }
        Ok(url)
    }

    /// A client for one request to `url` (already [`check`](Self::check)ed): its host
    /// resolved now, an allowed address picked, and the connection pinned to it (reqwest's
    /// `resolve`), so a second lookup cannot rebind it. No redirects, no proxy.
    pub async fn client(
        &self,
        url: &reqwest::Url,
        timeout: Duration,
    ) -> Result<reqwest::Client, AddressError> {
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|e| AddressError::Unresolved(format!("cannot resolve `{host}`: {e}")))?
            .collect();
        let addr = addrs
            .iter()
            .copied()
            .find(|a| self.allow_private || is_public(a.ip()))
            .ok_or_else(|| {
                AddressError::Refused(format!(
                    "`{host}` resolves only to loopback, private or reserved addresses; refused \
                     (allow with --http-allow-private)"
                ))
            })?;
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .resolve(&bare, addr)
            .no_proxy()
            .build()
            .map_err(|e| AddressError::Refused(format!("http client: {e}")))
    }
}

pub struct HttpGet {
    rules: AddressRules,
    max_bytes: u64,
    timeout: Duration,
}

impl HttpGet {
    pub fn new(settings: &Settings) -> Self {
        HttpGet {
            rules: AddressRules::new(settings),
            max_bytes: settings.http_max_bytes,
            timeout: Duration::from_millis(settings.http_timeout_ms),
        }
    }

    fn parse(&self, raw: &str) -> Result<reqwest::Url, String> {
        self.rules.check("args.url", raw)
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
/// carrier-grade NAT, unspecified, broadcast, multicast, documentation and benchmarking
/// ranges, and for the IPv6 forms that carry an IPv4 address a router may translate to
/// (IPv4-mapped, IPv4-compatible, NAT64, 6to4) or that are private by another name
/// (unique-local, the deprecated site-local).
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
                // 100.64.0.0/10, carrier-grade NAT
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
                // 198.18.0.0/15, benchmarking (RFC 2544): lab networks, often inside
                || (o[0] == 198 && (o[1] & 0xFE) == 18))
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            // Ranges whose traffic reaches an IPv4 address chosen by the sender, through the
            // host's own stack or a translating router: `::a.b.c.d` reaches 127.0.0.1 or
            // 10.0.0.1 as easily as a public address, so they are refused whole rather than
            // judged by the address inside.
            let ipv4_compatible = s[..6] == [0; 6]; // ::/96, with :: and ::1
                                                    // 64:ff9b::/96 (well-known NAT64) and 64:ff9b:1::/48 (local-use NAT64)
            let nat64 = s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1);
            let six_to_four = s[0] == 0x2002; // 2002::/16
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || ipv4_compatible
                || nat64
                || six_to_four
                // fc00::/7, unique local
                || (s[0] & 0xfe00) == 0xfc00
                // fe80::/10, link-local
                || (s[0] & 0xffc0) == 0xfe80
                // fec0::/10, site-local (deprecated, still private where used)
                || (s[0] & 0xffc0) == 0xfec0
                // 2001:db8::/32, documentation
                || (s[0] == 0x2001 && s[1] == 0x0db8))
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
        let client = self
            .rules
            .client(&url, self.timeout)
            .await
            .map_err(|e| match e {
                AddressError::Unresolved(m) => TaskError::Transient(m),
                AddressError::Refused(m) => TaskError::Permanent(m),
            })?;
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

    fn refused(ips: &[&str]) {
        for ip in ips {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must be refused");
        }
    }

    fn allowed(ips: &[&str]) {
        for ip in ips {
            assert!(is_public(ip.parse().unwrap()), "{ip} must be allowed");
        }
    }

    #[test]
    fn ipv4_compatible_ipv6_is_refused_whatever_it_carries() {
        refused(&[
            "::127.0.0.1",
            "::10.0.0.1",
            "::8.8.8.8",
            "::0.0.0.2",
            "::ffff",
        ]);
        // Just outside ::/96: the next /96 up is ordinary (unassigned) space, not this form.
        allowed(&["0:0:0:0:0:1::1"]);
    }

    #[test]
    fn nat64_prefixes_are_refused() {
        refused(&[
            "64:ff9b::7f00:1",
            "64:ff9b::8.8.8.8",
            "64:ff9b:1::1",
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
        ]);
        allowed(&["64:ff9b:2::1", "64:ff9a::1"]);
    }

    #[test]
    fn six_to_four_is_refused() {
        refused(&["2002::1", "2002:7f00:1::", "2002:ffff:ffff::1"]);
        allowed(&["2003::1", "2001:4860::8888"]);
    }

    #[test]
    fn site_local_is_refused() {
        refused(&["fec0::1", "feff:ffff::1"]);
        allowed(&["2a00::1"]);
    }

    #[test]
    fn benchmarking_is_refused() {
        refused(&["198.18.0.1", "198.19.255.255"]);
        allowed(&["198.17.255.255", "198.20.0.1"]);
    }

    #[test]
    fn ipv6_documentation_is_refused() {
        refused(&["2001:db8::1"]);
        allowed(&["2001:db9::1"]);
    }

    #[test]
    fn a_refused_literal_is_a_422_at_submit() {
        let task = HttpGet {
            rules: AddressRules {
                allow_hosts: vec!["*".into()],
                allow_private: false,
            },
            max_bytes: 1,
            timeout: Duration::from_secs(1),
        };
        for url in [
            "http://[::7f00:1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[64:ff9b:1::1]/",
            "http://[2002:a00:1::1]/",
            "http://[fec0::1]/",
            "http://198.18.0.1/",
        ] {
            let e = task.check_args(&json!({ "url": url })).unwrap_err();
            assert!(e.contains("refused"), "{url}: {e}");
        }
        assert!(task
            .check_args(&json!({"url": "http://[2606:4700::1111]/"}))
            .is_ok());
    }
}
