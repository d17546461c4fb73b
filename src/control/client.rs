//! The API client the CLI uses: finds the running server through the state directory.

use std::path::Path;

use anyhow::{bail, Context};

use super::{ApiAddr, ADDR_FILE, TOKEN_FILE};

/// A client of a running `livemount serve`.
#[derive(Clone)]
pub struct Client {
    url: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// Connects to the server whose state directory is `state`.
    pub fn from_state(state: &Path) -> anyhow::Result<Client> {
        let addr_path = state.join(ADDR_FILE);
        let addr: ApiAddr = serde_json::from_slice(&std::fs::read(&addr_path).with_context(|| {
            format!(
                "no running livemount server found for state directory {} (no {}); start one with `livemount serve --state {}`",
                state.display(),
                ADDR_FILE,
                state.display()
            )
        })?)
        .with_context(|| format!("reading {}", addr_path.display()))?;
        let token = std::fs::read_to_string(state.join(TOKEN_FILE))
            .with_context(|| format!("reading the API token in {}", state.display()))?
            .trim()
            .to_string();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .into();
        Ok(Client {
            url: addr.url,
            token,
            agent,
        })
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b),
            (_, None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        let mut response = response.with_context(|| {
            format!(
                "cannot reach the livemount server at {} (is `livemount serve` running?)",
                self.url
            )
        })?;
        let status = response.status();
        let text = response.body_mut().read_to_string()?;
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or(text);
            bail!("{msg}");
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected reply from {url}"))
    }

    /// `call` on a blocking thread, for async callers.
    pub async fn request<T: serde::de::DeserializeOwned + Send + 'static>(
        self,
        method: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        tokio::task::spawn_blocking(move || self.call(method, &path, body)).await?
    }
}
