//! Typed configuration: a TOML file, then environment overrides, then secrets read from files.
//!
//! Precedence (last wins): built-in defaults < `--config` file < `PROVISIOND__SECTION__KEY`
//! environment variables < `DATABASE_URL`. Secrets (`*_file` keys) are read from files so that
//! systemd credentials (`LoadCredential=`) work; they are held as [`Secret`] and never printed.
//! `config/provisiond.example.toml` documents every key; `tests/integration/config.rs` keeps it loadable.

use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("cannot read secret file {path} (for {key}): {source}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub sweep: SweepConfig,
    pub http: HttpConfig,
    pub hetzner: HetznerSettings,
    pub tailscale: TailscaleSettings,
    pub provision: ProvisionConfig,
    /// Seed region name → Hetzner locations, first choice first.
    pub regions: Regions,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:pass@host:port/db`. May carry a password, so it is a secret.
    pub url: Option<Secret>,
    /// File holding the URL (systemd credential); used when `url` and `DATABASE_URL` are unset.
    pub url_file: Option<PathBuf>,
    pub pool_size: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Who owns `agents` and `users` (see [`ModeSetting`]).
    pub mode: ModeSetting,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            url_file: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            mode: ModeSetting::Auto,
        }
    }
}

/// `database.mode`: whether `agents` and `users` are the web app's (adopted: the daemon never
/// inserts them and refuses orders for ones that do not exist) or the daemon's (standalone: it
/// creates an agent's row on its first order). `auto`, the default, decides from the database:
/// adopted when a `users` table exists (provisiond never creates one) or the first migration
/// found `agents` already there. Why a default that looks: both deployments then work without
/// a setting, and the wrong guess cannot happen silently (an explicit `standalone` on the web
/// app's database is refused at startup). `provisiond check-config` prints the mode in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeSetting {
    #[default]
    Auto,
    Adopted,
    Standalone,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// How long a claim holds a job without a heartbeat before the sweep may take it back.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// First retry delay; doubles per retry, with jitter, up to `backoff_cap`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// An external runner's job with no heartbeat for this long is failed (the seed's 900 s).
    #[serde(with = "humantime_serde")]
    pub external_timeout: Duration,
    /// Retries after the first attempt, for new jobs (the seed's default 3).
    pub max_retries: i32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease_ttl: Duration::from_secs(60),
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(600),
            external_timeout: Duration::from_secs(900),
            max_retries: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Whether `serve` claims jobs at all (an HTTP-only host sets this to false).
    pub enabled: bool,
    /// Jobs this process runs at once.
    pub concurrency: usize,
    /// Most jobs taken by one claim statement.
    pub claim_batch: usize,
    /// Polling backstop when no NOTIFY arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often the leases of all held jobs are extended (one UPDATE for all of them).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// On SIGTERM, how long running jobs get to reach a checkpoint before their leases are
    /// handed back. Keep it under systemd's TimeoutStopSec.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            enabled: true,
            concurrency: 64,
            claim_batch: 32,
            poll_interval: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepConfig {
    /// Cron expression with seconds (tokio-cron-scheduler), e.g. every 15 s.
    pub schedule: String,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            schedule: "*/15 * * * * *".to_owned(),
        }
    }
}

/// The Hetzner Cloud project the daemon creates servers in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HetznerSettings {
    pub base_url: url::Url,
    /// API token of the project. Prefer `token_file` (a systemd credential).
    pub token: Option<Secret>,
    /// The name under which every daemon on this database shares the project's request budget
    /// (Hetzner limits requests per project): daemons with the same name share one bucket.
    pub project: String,
    /// `false`: this daemon paces its Hetzner requests alone (only right for a single daemon on
    /// the project; kept for comparisons in `provisiond bench fleet`).
    pub share_budget: bool,
    pub token_file: Option<PathBuf>,
    /// Checked against `GET /server_types` at startup: deprecated or unavailable is an error.
    pub server_type: String,
    pub image: String,
    /// SSH key names or ids; without any, Hetzner generates a root password (never logged).
    pub ssh_keys: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for HetznerSettings {
    fn default() -> Self {
        HetznerSettings {
            base_url: url::Url::parse("https://api.hetzner.cloud/v1").expect("static URL"),
            token: None,
            token_file: None,
            project: "default".to_owned(),
            share_budget: true,
            server_type: "cpx22".to_owned(),
            image: "ubuntu-24.04".to_owned(),
            ssh_keys: Vec::new(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The tailnet the VMs join, through an OAuth client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TailscaleSettings {
    /// Without the `/api/v2` suffix.
    pub base_url: url::Url,
    /// `-` is the OAuth client's own tailnet.
    pub tailnet: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    /// Must be exactly the OAuth client's tag set; the VMs advertise them.
    pub tags: Vec<String>,
    /// Lifetime of each single-use auth key. Keep it short: Hetzner stores user_data.
    #[serde(with = "humantime_serde")]
    pub key_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for TailscaleSettings {
    fn default() -> Self {
        TailscaleSettings {
            base_url: url::Url::parse("https://api.tailscale.com").expect("static URL"),
            tailnet: "-".to_owned(),
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            tags: vec!["tag:customer-vm".to_owned()],
            key_expiry: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The step machine, its deadline and the reaper.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisionConfig {
    /// An attempt that has not finished this long after its claim fails (the seed's 15 min).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Cron expression (with seconds) for the reaper of unowned servers and devices.
    pub reaper_schedule: String,
    /// An unowned server or device younger than this is left alone (it may be mid-creation).
    #[serde(with = "humantime_serde")]
    pub reaper_grace: Duration,
    /// How long a rollback keeps retrying deletes (through 429s and 5xx) before leaving the
    /// rest to the reaper.
    #[serde(with = "humantime_serde")]
    pub rollback_timeout: Duration,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            deadline: Duration::from_secs(900),
            reaper_schedule: "0 */5 * * * *".to_owned(),
            reaper_grace: Duration::from_secs(1800),
            rollback_timeout: Duration::from_secs(600),
        }
    }
}

/// The HTTP surface (webhooks, callbacks, status, admin, health, metrics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where `serve` listens. Empty: no HTTP server.
    pub listen: String,
    /// File holding the bearer token of the admin and status API. Unset: those routes answer 503.
    pub admin_token_file: Option<PathBuf>,
    /// File holding the Stripe endpoint secret; the whole `whsec_...` string is the HMAC key.
    pub stripe_webhook_secret_file: Option<PathBuf>,
    /// How far a Stripe-Signature `t=` may be from now, either way.
    #[serde(with = "humantime_serde")]
    pub stripe_tolerance: Duration,
    /// File holding the runners' callback secret (the seed's GITHUB_CALLBACK_SECRET).
    pub runner_secret_file: Option<PathBuf>,
    /// Require `X-Signature-Timestamp` on runner callbacks (signature over `"{ts}.{body}"`).
    /// When false, a timestamped callback is still checked, and a plain one is accepted.
    pub runner_require_timestamp: bool,
    /// How far a runner callback's timestamp may be from now, either way.
    #[serde(with = "humantime_serde")]
    pub runner_timestamp_tolerance: Duration,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub body_limit: usize,
    /// Region of a paid order whose metadata names none (the seed's column default).
    pub default_region: String,
    /// A connection whose request headers are not complete this long after it was accepted (or
    /// after its previous response) is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request whose body has not fully arrived this long after its headers gets 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Most connections served at once; at the cap, the oldest connection waiting for a request
    /// is closed to make room.
    pub max_connections: usize,
    /// `/readyz` answers 503 when the database has not answered within this.
    #[serde(with = "humantime_serde")]
    pub readiness_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".to_owned(),
            admin_token_file: None,
            stripe_webhook_secret_file: None,
            stripe_tolerance: Duration::from_secs(300),
            runner_secret_file: None,
            runner_require_timestamp: false,
            runner_timestamp_tolerance: Duration::from_secs(300),
            body_limit: 64 * 1024,
            default_region: "us-east".to_owned(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 512,
            readiness_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Regions(pub BTreeMap<String, Vec<String>>);

impl Default for Regions {
    fn default() -> Self {
        let map = [
            ("us-east", &["ash"][..]),
            ("us-west", &["hil"][..]),
            ("eu-central", &["fsn1", "nbg1", "hel1"][..]),
            ("ap-southeast", &["sin"][..]),
        ]
        .into_iter()
        .map(|(r, l)| (r.to_owned(), l.iter().map(|s| (*s).to_owned()).collect()))
        .collect();
        Regions(map)
    }
}

impl Regions {
    pub fn contains(&self, region: &str) -> bool {
        self.0.contains_key(region)
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

const ENV_PREFIX: &str = "PROVISIOND__";

impl Config {
    /// Loads defaults, the optional file, and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (mut tree, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                let tree: toml::Table =
                    text.parse()
                        .map_err(|e: toml::de::Error| ConfigError::Parse {
                            origin: format!("in {}", p.display()),
                            message: e.message().to_owned(),
                        })?;
                (
                    tree,
                    format!("in {} (with environment overrides)", p.display()),
                )
            }
            None => (toml::Table::new(), "(defaults and environment)".to_owned()),
        };
        let mut database_url = None;
        for (key, value) in env {
            if key == "DATABASE_URL" && !value.is_empty() {
                database_url = Some(Secret::new(value));
            } else if let Some(rest) = key.strip_prefix(ENV_PREFIX) {
                apply_override(&mut tree, rest, &value)?;
            }
        }
        refuse_removed_keys(&tree, &origin)?;
        // serde_path_to_error names the key that failed ("queue.lease_ttl: ...").
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| ConfigError::Parse {
                origin: origin.clone(),
                message: format!("{}: {}", e.path(), e.inner().message()),
            })?;
        if database_url.is_some() {
            config.database.url = database_url;
        }
        if config.database.url.is_none()
            && let Some(path) = &config.database.url_file
        {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                key: "database.url_file",
                path: path.clone(),
                source,
            })?;
            config.database.url = Some(Secret::new(text.trim()));
        }
        read_secret_file(
            &mut config.hetzner.token,
            &config.hetzner.token_file,
            "hetzner.token_file",
        )?;
        read_secret_file(
            &mut config.tailscale.client_secret,
            &config.tailscale.client_secret_file,
            "tailscale.client_secret_file",
        )?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let q = &self.queue;
        let w = &self.worker;
        if q.lease_ttl < Duration::from_secs(2) {
            return invalid("queue.lease_ttl must be at least 2s".into());
        }
        if w.heartbeat_interval.is_zero() || w.heartbeat_interval * 2 > q.lease_ttl {
            return invalid(format!(
                "worker.heartbeat_interval ({}) must be non-zero and at most half of queue.lease_ttl ({}), \
                 or a slow heartbeat loses leases",
                humantime::format_duration(w.heartbeat_interval),
                humantime::format_duration(q.lease_ttl)
            ));
        }
        if q.backoff_base.is_zero() || q.backoff_cap < q.backoff_base {
            return invalid("queue.backoff_base must be > 0 and <= queue.backoff_cap".into());
        }
        if q.backoff_cap > Duration::from_secs(24 * 3600) {
            return invalid("queue.backoff_cap must be at most 24h".into());
        }
        if !(0..=100).contains(&q.max_retries) {
            return invalid("queue.max_retries must be between 0 and 100".into());
        }
        if q.external_timeout < Duration::from_secs(10) {
            return invalid("queue.external_timeout must be at least 10s".into());
        }
        if w.concurrency == 0 || w.claim_batch == 0 {
            return invalid("worker.concurrency and worker.claim_batch must be at least 1".into());
        }
        if w.poll_interval.is_zero() {
            return invalid("worker.poll_interval must be > 0".into());
        }
        if self.database.pool_size < 2 {
            return invalid("database.pool_size must be at least 2".into());
        }
        if self.regions.0.is_empty() {
            return invalid("at least one region must be configured".into());
        }
        for (region, locations) in &self.regions.0 {
            if !crate::domain::valid_region_name(region) || locations.is_empty() {
                return invalid(format!(
                    "region {region:?} needs a lowercase name and at least one location"
                ));
            }
        }
        if self.tailscale.tags.is_empty()
            || self.tailscale.tags.iter().any(|t| !t.starts_with("tag:"))
        {
            return invalid("tailscale.tags must be a non-empty list of \"tag:...\" names".into());
        }
        if self.tailscale.key_expiry < Duration::from_secs(300)
            || self.tailscale.key_expiry > Duration::from_secs(24 * 3600)
        {
            return invalid("tailscale.key_expiry must be between 5m and 24h".into());
        }
        if self.provision.deadline < Duration::from_secs(60) {
            return invalid("provision.deadline must be at least 1m".into());
        }
        if self.sweep.schedule.trim().is_empty() {
            return invalid("sweep.schedule must be a cron expression".into());
        }
        let h = &self.http;
        // Zero would disable the limit it names (hyper reads `None` as "no timeout").
        if h.header_read_timeout.is_zero()
            || h.body_read_timeout.is_zero()
            || h.readiness_timeout.is_zero()
        {
            return invalid(
                "http.header_read_timeout, http.body_read_timeout and http.readiness_timeout must be > 0"
                    .into(),
            );
        }
        if h.max_connections < 2 {
            return invalid("http.max_connections must be at least 2".into());
        }
        Ok(())
    }

    /// The database URL, or a clear error naming where it can come from.
    pub fn database_url(&self) -> Result<&Secret, ConfigError> {
        self.database.url.as_ref().ok_or_else(|| {
            ConfigError::Invalid(
                "no database URL: set DATABASE_URL, database.url or database.url_file".into(),
            )
        })
    }
}

/// Fills `value` from `file` when it is not set directly.
/// Keys that existed once and were removed, with why: a config naming one is refused with that
/// reason rather than an "unknown field" that reads like a typo.
const REMOVED_KEYS: [(&str, &str, &str); 2] = [
    (
        "worker",
        "handler",
        "`serve` always runs the provisioning step machine; the no-op handler that marked jobs \
         running without a VM exists only in benchmarks and tests that build their own worker",
    ),
    (
        "worker",
        "noop_hold",
        "it belonged to the removed no-op handler (see worker.handler)",
    ),
];

fn refuse_removed_keys(tree: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    for (section, key, why) in REMOVED_KEYS {
        let named = tree
            .get(section)
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.contains_key(key));
        if named {
            return Err(ConfigError::Parse {
                origin: origin.to_owned(),
                message: format!("{section}.{key} was removed: {why}"),
            });
        }
    }
    Ok(())
}

fn read_secret_file(
    value: &mut Option<Secret>,
    file: &Option<PathBuf>,
    key: &'static str,
) -> Result<(), ConfigError> {
    if value.is_none()
        && let Some(path) = file
    {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
            key,
            path: path.clone(),
            source,
        })?;
        *value = Some(Secret::new(text.trim()));
    }
    Ok(())
}

/// `WORKER__CONCURRENCY=8` sets `[worker] concurrency = 8`. The value is read as a TOML literal
/// when it parses as one (numbers, booleans, arrays), else as a string.
fn apply_override(tree: &mut toml::Table, path: &str, value: &str) -> Result<(), ConfigError> {
    let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
    if keys.iter().any(String::is_empty) {
        return Err(ConfigError::Invalid(format!(
            "environment override {ENV_PREFIX}{path} has an empty key"
        )));
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut table = tree;
    for key in parents {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "environment override {ENV_PREFIX}{path}: {key} is not a section"
                )));
            }
        };
    }
    table.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.queue.max_retries, 3);
        assert_eq!(c.queue.external_timeout, Duration::from_secs(900));
        assert!(c.regions.contains("eu-central"));
    }

    #[test]
    fn env_overrides_and_database_url() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("PROVISIOND__WORKER__CONCURRENCY", "7"),
                ("PROVISIOND__QUEUE__LEASE_TTL", "90s"),
                ("DATABASE_URL", "postgres://u:hunter2@h/db"),
            ]),
        )
        .unwrap();
        assert_eq!(c.worker.concurrency, 7);
        assert_eq!(c.queue.lease_ttl, Duration::from_secs(90));
        assert_eq!(
            c.database_url().unwrap().expose(),
            "postgres://u:hunter2@h/db"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = Config::load_with_env(None, env(&[("PROVISIOND__WORKER__BOGUS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::load_with_env(None, env(&[("PROVISIOND__QUEUE__LEASE_TTL", "3s")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat_interval"), "{e}");
    }

    #[test]
    fn the_removed_noop_handler_is_refused_by_name() {
        // From a file, any value (the old default too), and from the environment.
        for text in [
            "[worker]\nhandler = \"noop\"\n",
            "[worker]\nhandler = \"provision\"\n",
            "[worker]\nnoop_hold = \"1s\"\n",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("provisiond.toml");
            std::fs::write(&path, text).unwrap();
            let e = Config::load_with_env(Some(&path), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("was removed"), "{text}: {e}");
            assert!(e.contains("provisiond.toml"), "{e}");
        }
        let e = Config::load_with_env(None, env(&[("PROVISIOND__WORKER__HANDLER", "noop")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker.handler was removed"), "{e}");
        assert!(e.contains("no-op handler"), "{e}");
    }
}
