//! The wire: one pooled reqwest client per `Client` and process. A forked child gets a new
//! one (the parent's pooled sockets are shared with the parent and its runtime is gone).

use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Reply, Request, SendError};
use crate::error::{CoreError, CoreResult};
use crate::sync::lock;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub timeout: Duration,
    pub connect_timeout: Option<Duration>,
    pub http2: bool,
    pub headers: HeaderMap,
}

pub struct Http {
    config: HttpConfig,
    /// The client of the fork epoch it was built in.
    client: Mutex<Option<(u64, reqwest::Client)>>,
}

/// A header pair, or a `ValueError` naming what is wrong with it.
pub fn header(name: &str, value: &str) -> CoreResult<(HeaderName, HeaderValue)> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| CoreError::invalid(format!("headers: {name:?} is not a valid header name")))?;
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        CoreError::invalid(format!(
            "headers: the value of {name} is not a valid header value (control characters?)"
        ))
    })?;
    if super::SECRET_HEADERS.contains(&name.as_str()) {
        value.set_sensitive(true);
    }
    Ok((name, value))
}

impl Http {
    /// The headers sent with every request.
    pub fn default_headers(&self) -> &HeaderMap {
        &self.config.headers
    }

    pub fn new(config: HttpConfig) -> CoreResult<Self> {
        let http = Self {
            config,
            client: Mutex::new(None),
        };
        http.build()?; // configuration errors now, not at the first call
        Ok(http)
    }

    fn build(&self) -> CoreResult<reqwest::Client> {
        let mut builder = reqwest::Client::builder()
            .timeout(self.config.timeout)
            .default_headers(self.config.headers.clone())
            .user_agent(concat!("tenuto/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .gzip(true)
            .brotli(true);
        if let Some(connect) = self.config.connect_timeout {
            builder = builder.connect_timeout(connect);
        }
        if !self.config.http2 {
            builder = builder.http1_only();
        }
        builder
            .build()
            .map_err(|err| CoreError::invalid(format!("cannot build the HTTP client: {err}")))
    }

    /// This process's client, built after a fork.
    fn client(&self) -> CoreResult<reqwest::Client> {
        let epoch = crate::runtime::fork_epoch();
        let mut slot = lock(&self.client);
        if let Some((built, client)) = slot.as_ref() {
            if *built == epoch {
                return Ok(client.clone());
            }
        }
        if let Some(stale) = slot.take() {
            // Its pool's sockets belong to the parent; closing them here would hang up
            // on the parent's connections.
            std::mem::forget(stale);
        }
        let client = self.build()?;
        *slot = Some((epoch, client.clone()));
        Ok(client)
    }

    /// One attempt. Must run on tenuto's runtime.
    pub async fn send(&self, request: &Request) -> Result<Reply, SendError> {
        let client = self
            .client()
            .map_err(|err| SendError::Connect(err.to_string()))?;
        let mut builder = client
            .request(request.method.clone(), request.url.clone())
            .headers(request.headers.clone());
        if let Some(timeout) = request.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        let response = builder.send().await.map_err(classify)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let body = response.bytes().await.map_err(classify)?.to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// A reqwest error as a retryable failure, its message without the URL (which may hold
/// credentials; messages show the redacted one) but with its causes, where the useful
/// part is ("Connection refused", "connection reset").
fn classify(err: reqwest::Error) -> SendError {
    if err.is_timeout() {
        return SendError::Timeout;
    }
    let err = err.without_url();
    let mut reason = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        cause = inner.source();
    }
    SendError::Connect(reason.replace('\n', " "))
}
