//! Configuration from environment variables (each also a `--flag`), SPEC §6.
//!
//! Required values are `Option`s so that a missing one produces an error that
//! names the variable and says what to set, instead of clap's generic message.

use std::time::Duration;

use clap::Args;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set: {fix}")]
    Missing {
        var: &'static str,
        fix: &'static str,
    },
    #[error("{var} is invalid ({problem}): {fix}")]
    Invalid {
        var: &'static str,
        problem: String,
        fix: &'static str,
    },
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// postgres://… URL used for SQL and replication.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Replication slot (created if missing).
    #[arg(long, env = "SIDECAR_SLOT", default_value = "hubspot_sidecar")]
    pub slot: String,
    /// Publication (owned by the DBA, see sql/publication.sql).
    #[arg(long, env = "SIDECAR_PUBLICATION", default_value = "hubspot_sidecar")]
    pub publication: String,
    /// Address of the HTTP server (metrics, health, admin API, OAuth callback).
    #[arg(long, env = "SIDECAR_LISTEN", default_value = "0.0.0.0:9187")]
    pub listen: String,
    /// Base URL of the OAuth redirect URI.
    #[arg(
        long,
        env = "SIDECAR_PUBLIC_URL",
        default_value = "http://localhost:9187"
    )]
    pub public_url: String,
    /// Bearer token for /api/*.
    #[arg(long, env = "SIDECAR_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// 32-byte key, hex or base64: encrypts tokens at rest, signs OAuth state.
    #[arg(long, env = "SIDECAR_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    #[arg(
        long,
        env = "HUBSPOT_API_BASE",
        default_value = "https://api.hubapi.com"
    )]
    pub hubspot_api_base: String,
    #[arg(
        long,
        env = "HUBSPOT_AUTH_BASE",
        default_value = "https://app.hubspot.com"
    )]
    pub hubspot_auth_base: String,
    /// Date-versioned API paths (e.g. 2026-03), or `v3` for the legacy paths.
    #[arg(long, env = "HUBSPOT_API_VERSION", default_value = "2026-03")]
    pub hubspot_api_version: String,
    #[arg(long, env = "HUBSPOT_CLIENT_ID")]
    pub hubspot_client_id: Option<String>,
    #[arg(long, env = "HUBSPOT_CLIENT_SECRET", hide_env_values = true)]
    pub hubspot_client_secret: Option<String>,
    #[arg(long, env = "HUBSPOT_APP_ID")]
    pub hubspot_app_id: Option<String>,
    #[arg(long, env = "HUBSPOT_DEVELOPER_API_KEY", hide_env_values = true)]
    pub hubspot_developer_api_key: Option<String>,
    /// `app-events` or `timeline-v3`.
    #[arg(long, env = "HUBSPOT_ACTIVITY_API", default_value = "app-events")]
    pub hubspot_activity_api: String,
    #[arg(long, env = "HUBSPOT_APP_EVENT_PREFIX", default_value = "")]
    pub hubspot_app_event_prefix: String,
    /// Requests per rolling 10 s per portal.
    #[arg(long, env = "HUBSPOT_RATE_LIMIT", default_value_t = 100)]
    pub hubspot_rate_limit: u32,
    #[arg(long, env = "SIDECAR_FAIL_AFTER", default_value = "15m")]
    pub fail_after: String,
    #[arg(long, env = "SIDECAR_FAILED_RETENTION", default_value = "7d")]
    pub failed_retention: String,
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    #[arg(long, env = "SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// `json` or `text`; RUST_LOG filters.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: String,
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub slot: String,
    pub publication: String,
    pub listen: String,
    pub public_url: String,
    pub admin_token: String,
    pub secret_key: [u8; 32],
    pub hubspot: HubSpotConfig,
    pub fail_after: Duration,
    pub failed_retention: Duration,
    pub smtp_url: Option<String>,
    pub smtp_from: Option<String>,
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Config {
    // Hand-written so that secrets can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("listen", &self.listen)
            .field("public_url", &self.public_url)
            .field("hubspot_api_base", &self.hubspot.api_base)
            .field("hubspot_api_version", &self.hubspot.api_version)
            .field("hubspot_rate_limit", &self.hubspot.rate_limit)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub struct HubSpotConfig {
    pub api_base: String,
    pub auth_base: String,
    pub api_version: String,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub app_id: Option<String>,
    pub developer_api_key: Option<String>,
    pub activity_api: ActivityApi,
    pub app_event_prefix: String,
    pub rate_limit: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivityApi {
    AppEvents,
    TimelineV3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl Config {
    /// The defaults of SPEC §6 around a database and a HubSpot base URL, listening
    /// on a free loopback port: what the demo, the tests and the benchmark run with.
    pub fn local(
        database_url: &str,
        slot: &str,
        hubspot_base: &str,
        admin_token: &str,
        secret_key: [u8; 32],
    ) -> Config {
        Config {
            database_url: database_url.to_string(),
            slot: slot.to_string(),
            publication: "hubspot_sidecar".into(),
            listen: "127.0.0.1:0".into(),
            public_url: "http://localhost:9187".into(),
            admin_token: admin_token.to_string(),
            secret_key,
            hubspot: HubSpotConfig {
                api_base: hubspot_base.to_string(),
                auth_base: hubspot_base.to_string(),
                api_version: "2026-03".into(),
                client_id: None,
                client_secret: None,
                app_id: None,
                developer_api_key: None,
                activity_api: ActivityApi::AppEvents,
                app_event_prefix: String::new(),
                rate_limit: 100,
            },
            fail_after: Duration::from_secs(15 * 60),
            failed_retention: Duration::from_secs(7 * 86_400),
            smtp_url: None,
            smtp_from: None,
            log_format: LogFormat::Text,
        }
    }
}

impl RunArgs {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let database_url = self.database_url.ok_or(ConfigError::Missing {
            var: "DATABASE_URL",
            fix: "set it to the primary's URL, e.g. postgres://hubspot_sidecar:PASSWORD@db:5432/meltingspot",
        })?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                var: "DATABASE_URL",
                problem: "not a postgres:// URL".into(),
                fix: "use the form postgres://user:password@host:5432/dbname",
            });
        }
        let admin_token = self.admin_token.filter(|t| !t.is_empty()).ok_or(ConfigError::Missing {
            var: "SIDECAR_ADMIN_TOKEN",
            fix: "set it to a long random string, e.g. `openssl rand -hex 32`; the web app sends it as a bearer token",
        })?;
        let secret_key = parse_secret_key(self.secret_key.as_deref())?;
        let activity_api = match self.hubspot_activity_api.as_str() {
            "app-events" => ActivityApi::AppEvents,
            "timeline-v3" => ActivityApi::TimelineV3,
            other => {
                return Err(ConfigError::Invalid {
                    var: "HUBSPOT_ACTIVITY_API",
                    problem: format!("unknown value {other:?}"),
                    fix: "use app-events (default) or timeline-v3",
                })
            }
        };
        let version = self.hubspot_api_version.trim().to_string();
        if !(version == "v3" || is_date_version(&version)) {
            return Err(ConfigError::Invalid {
                var: "HUBSPOT_API_VERSION",
                problem: format!("{version:?} is neither v3 nor YYYY-MM"),
                fix: "use a date version such as 2026-03, or v3 for the legacy paths",
            });
        }
        if self.hubspot_rate_limit == 0 {
            return Err(ConfigError::Invalid {
                var: "HUBSPOT_RATE_LIMIT",
                problem: "0 would never send anything".into(),
                fix: "use the portal's 10-second limit minus a margin, e.g. 100",
            });
        }
        let log_format = match self.log_format.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                return Err(ConfigError::Invalid {
                    var: "LOG_FORMAT",
                    problem: format!("unknown value {other:?}"),
                    fix: "use json or text",
                })
            }
        };
        Ok(Config {
            database_url,
            slot: self.slot,
            publication: self.publication,
            listen: self.listen,
            public_url: self.public_url.trim_end_matches('/').to_string(),
            admin_token,
            secret_key,
            hubspot: HubSpotConfig {
                api_base: self.hubspot_api_base.trim_end_matches('/').to_string(),
                auth_base: self.hubspot_auth_base.trim_end_matches('/').to_string(),
                api_version: version,
                client_id: self.hubspot_client_id,
                client_secret: self.hubspot_client_secret,
                app_id: self.hubspot_app_id,
                developer_api_key: self.hubspot_developer_api_key,
                activity_api,
                app_event_prefix: self.hubspot_app_event_prefix,
                rate_limit: self.hubspot_rate_limit,
            },
            fail_after: parse_duration("SIDECAR_FAIL_AFTER", &self.fail_after)?,
            failed_retention: parse_duration("SIDECAR_FAILED_RETENTION", &self.failed_retention)?,
            smtp_url: self.smtp_url,
            smtp_from: self.smtp_from,
            log_format,
        })
    }
}

fn is_date_version(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
}

pub fn parse_secret_key(value: Option<&str>) -> Result<[u8; 32], ConfigError> {
    use base64::Engine;
    const FIX: &str = "set it to 32 random bytes as hex or base64, e.g. `openssl rand -hex 32`";
    let raw = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(ConfigError::Missing {
            var: "SIDECAR_SECRET_KEY",
            fix: FIX,
        })?;
    let bytes = if raw.len() == 64 && raw.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(raw).ok()
    } else {
        base64::engine::general_purpose::STANDARD.decode(raw).ok()
    };
    let bytes = bytes.ok_or_else(|| ConfigError::Invalid {
        var: "SIDECAR_SECRET_KEY",
        problem: "neither hex nor base64".into(),
        fix: FIX,
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| ConfigError::Invalid {
        var: "SIDECAR_SECRET_KEY",
        problem: format!("{} bytes instead of 32", b.len()),
        fix: FIX,
    })
}

/// Parses `90s`, `15m`, `2h`, `7d` (or a bare number of seconds).
pub fn parse_duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let v = value.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num.parse().map_err(|_| ConfigError::Invalid {
        var,
        problem: format!("{value:?} is not a duration"),
        fix: "use a number with a unit: 90s, 15m, 2h or 7d",
    })?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(ConfigError::Invalid {
                var,
                problem: format!("unknown unit in {value:?}"),
                fix: "use s, m, h or d, e.g. 15m",
            })
        }
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Cli::parse_from(v).run
    }

    #[test]
    fn missing_database_url_names_the_variable_and_the_fix() {
        let mut a = args(&["--admin-token", "t", "--secret-key", &"ab".repeat(32)]);
        a.database_url = None;
        let err = a.validate().unwrap_err().to_string();
        assert!(err.starts_with("DATABASE_URL is not set"), "{err}");
        assert!(err.contains("postgres://"), "{err}");
    }

    #[test]
    fn short_secret_key_is_refused_with_its_length() {
        let err = parse_secret_key(Some("abcd")).unwrap_err().to_string();
        assert!(err.contains("SIDECAR_SECRET_KEY"), "{err}");
        assert!(err.contains("3 bytes instead of 32"), "{err}");
        assert!(parse_secret_key(Some(&"0f".repeat(32))).is_ok());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("X", "15m").unwrap(),
            Duration::from_secs(900)
        );
        assert_eq!(
            parse_duration("X", "7d").unwrap(),
            Duration::from_secs(604_800)
        );
        assert!(parse_duration("X", "7w")
            .unwrap_err()
            .to_string()
            .contains("X is invalid"));
    }
}
