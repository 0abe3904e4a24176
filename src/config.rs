//! Configuration from environment variables (each also a `--flag`), SPEC §6.
//!
//! Required values are `Option`s so that a missing one produces an error that
//! names the variable and says what to set, instead of clap's generic message.

use std::time::Duration;

use clap::Args;

use crate::hubspot::endpoint::KNOWN_VERSIONS;

/// A missing or invalid setting, with the variable to fix and how.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{var} is not set: {fix}")]
    Missing {
        /// The environment variable that is missing.
        var: &'static str,
        /// What to set it to.
        fix: &'static str,
    },
    /// A variable is set but its value cannot be used.
    #[error("{var} is invalid ({problem}): {fix}")]
    Invalid {
        /// The environment variable whose value is wrong.
        var: &'static str,
        /// What is wrong with the value.
        problem: String,
        /// What to set it to instead.
        fix: &'static str,
    },
}

/// Flags and environment variables of `hubspot-sidecar run`, before validation (SPEC §6).
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
    /// Previous SIDECAR_SECRET_KEY values, comma-separated: still open and
    /// verify what they sealed or signed, while everything is sealed again
    /// under the current key.
    #[arg(long, env = "SIDECAR_SECRET_KEY_PREVIOUS", hide_env_values = true)]
    pub secret_key_previous: Option<String>,
    /// REST base URL of the HubSpot API (tests point it at the emulator).
    #[arg(
        long,
        env = "HUBSPOT_API_BASE",
        default_value = "https://api.hubapi.com"
    )]
    pub hubspot_api_base: String,
    /// Base URL where the browser authorizes the OAuth app.
    #[arg(
        long,
        env = "HUBSPOT_AUTH_BASE",
        default_value = "https://app.hubspot.com"
    )]
    pub hubspot_auth_base: String,
    /// Date-versioned API paths (e.g. 2026-03), or `v3` for the legacy paths.
    #[arg(long, env = "HUBSPOT_API_VERSION", default_value = "2026-03")]
    pub hubspot_api_version: String,
    /// Client id of the HubSpot OAuth app.
    #[arg(long, env = "HUBSPOT_CLIENT_ID")]
    pub hubspot_client_id: Option<String>,
    /// Client secret of the HubSpot OAuth app.
    #[arg(long, env = "HUBSPOT_CLIENT_SECRET", hide_env_values = true)]
    pub hubspot_client_secret: Option<String>,
    /// Numeric id of the HubSpot app (required for `timeline-v3`).
    #[arg(long, env = "HUBSPOT_APP_ID")]
    pub hubspot_app_id: Option<String>,
    /// Developer account API key; creates the `timeline-v3` event templates only.
    #[arg(long, env = "HUBSPOT_DEVELOPER_API_KEY", hide_env_values = true)]
    pub hubspot_developer_api_key: Option<String>,
    /// `app-events` or `timeline-v3`.
    #[arg(long, env = "HUBSPOT_ACTIVITY_API", default_value = "app-events")]
    pub hubspot_activity_api: String,
    /// Prefix of each App Event `eventTypeName` (`app-events` only).
    #[arg(long, env = "HUBSPOT_APP_EVENT_PREFIX", default_value = "")]
    pub hubspot_app_event_prefix: String,
    /// Requests per rolling 10 s per portal.
    #[arg(long, env = "HUBSPOT_RATE_LIMIT", default_value_t = 100)]
    pub hubspot_rate_limit: u32,
    /// How long a portal may go with no successful call before it enters `failed`.
    #[arg(long, env = "SIDECAR_FAIL_AFTER", default_value = "15m")]
    pub fail_after: String,
    /// How long a failed integration's queued work is kept before it is dropped.
    #[arg(long, env = "SIDECAR_FAILED_RETENTION", default_value = "7d")]
    pub failed_retention: String,
    /// SMTP server URL; when set, the sidecar mails failure notifications itself.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Sender address of notification e-mails.
    #[arg(long, env = "SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// `json` or `text`; RUST_LOG filters.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// Largest single message of the replication stream, in MiB.
    #[arg(long, env = "SIDECAR_STREAM_MAX_MESSAGE_MB", default_value_t = 128)]
    pub stream_max_message_mb: usize,
}

/// The default of SIDECAR_STREAM_MAX_MESSAGE_MB. A row change arrives as one
/// message, and with REPLICA IDENTITY FULL an update carries the old row too:
/// 128 MiB passes a member whose values are tens of MB (HubSpot takes
/// 65,536 characters per value), within the Deployment's 256 MiB.
pub const DEFAULT_STREAM_MAX_MESSAGE_MB: usize = 128;
const MIB: usize = 1024 * 1024;

/// The `application_name` of every session the sidecar opens.
pub const APPLICATION_NAME: &str = "hubspot-sidecar";

/// The database the sidecar reads and writes: one parsed URL that both the
/// SQL pool (`store::Db`) and the replication stream are built from.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// The parsed `DATABASE_URL` (its TLS parameters are in `tls`).
    pub pg: tokio_postgres::Config,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, checked, files loaded.
    pub tls: crate::tls::TlsSettings,
}

impl DatabaseConfig {
    /// Parses a `postgres://` URL; the error names `DATABASE_URL` and the fix.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                var: "DATABASE_URL",
                problem: "not a postgres:// URL".into(),
                fix: "use the form postgres://user:password@host:5432/dbname",
            });
        }
        let (url, tls) =
            crate::tls::TlsSettings::from_url(url).map_err(|e| ConfigError::Invalid {
                var: "DATABASE_URL",
                problem: e.problem,
                fix: e.fix,
            })?;
        let mut pg: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| ConfigError::Invalid {
                    var: "DATABASE_URL",
                    problem: e.to_string(),
                    fix: "use the form postgres://user:password@host:5432/dbname",
                })?;
        pg.ssl_mode(tls.negotiation());
        if pg.get_application_name().is_none() {
            // Our sessions are easy to find in pg_stat_activity, next to the walsender.
            pg.application_name(APPLICATION_NAME);
        }
        if pg.get_user().is_none() {
            return Err(ConfigError::Invalid {
                var: "DATABASE_URL",
                problem: "no user in the URL".into(),
                fix: "name the role: postgres://hubspot_sidecar:PASSWORD@host:5432/dbname",
            });
        }
        Ok(DatabaseConfig { pg, tls })
    }
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    /// DATABASE_URL, parsed.
    pub database: DatabaseConfig,
    /// SIDECAR_SLOT: the logical replication slot, created if missing.
    pub slot: String,
    /// SIDECAR_PUBLICATION: the publication the slot streams.
    pub publication: String,
    /// SIDECAR_LISTEN: address of the HTTP server.
    pub listen: String,
    /// SIDECAR_PUBLIC_URL, without a trailing slash: base of the OAuth redirect URI.
    pub public_url: String,
    /// SIDECAR_ADMIN_TOKEN: bearer token required on `/api/*`.
    pub admin_token: String,
    /// SIDECAR_SECRET_KEY, decoded: encrypts tokens at rest and signs OAuth state.
    pub secret_key: [u8; 32],
    /// SIDECAR_SECRET_KEY_PREVIOUS, decoded: keys being rotated out.
    pub secret_key_previous: Vec<[u8; 32]>,
    /// HubSpot API, OAuth app and activity settings.
    pub hubspot: HubSpotConfig,
    /// SIDECAR_FAIL_AFTER: time with no successful call before a portal enters `failed`.
    pub fail_after: Duration,
    /// SIDECAR_FAILED_RETENTION: age at which a failed integration's outbox rows are deleted.
    pub failed_retention: Duration,
    /// SMTP_URL: SMTP server for failure notifications; unset, nothing is mailed.
    pub smtp_url: Option<String>,
    /// SMTP_FROM: sender of notification e-mails (a default `no-reply` address when unset).
    pub smtp_from: Option<String>,
    /// LOG_FORMAT: JSON or plain-text log lines.
    pub log_format: LogFormat,
    /// SIDECAR_STREAM_MAX_MESSAGE_MB, in bytes: the largest row change or
    /// logical message the stream reads (one is buffered whole).
    pub stream_max_message: usize,
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

/// HubSpot settings of the validated configuration (the `HUBSPOT_*` variables).
#[derive(Clone, Debug)]
pub struct HubSpotConfig {
    /// HUBSPOT_API_BASE, without a trailing slash: REST base URL.
    pub api_base: String,
    /// HUBSPOT_AUTH_BASE, without a trailing slash: where the browser authorizes.
    pub auth_base: String,
    /// HUBSPOT_API_VERSION: a date version such as `2026-03`, or `v3` for the legacy paths.
    pub api_version: String,
    /// HUBSPOT_CLIENT_ID: client id of the OAuth app.
    pub client_id: Option<String>,
    /// HUBSPOT_CLIENT_SECRET: client secret of the OAuth app.
    pub client_secret: Option<String>,
    /// HUBSPOT_APP_ID: numeric app id, needed by `timeline-v3`.
    pub app_id: Option<String>,
    /// HUBSPOT_DEVELOPER_API_KEY: creates the `timeline-v3` event templates.
    pub developer_api_key: Option<String>,
    /// HUBSPOT_ACTIVITY_API: which API delivers timeline activities.
    pub activity_api: ActivityApi,
    /// HUBSPOT_APP_EVENT_PREFIX: prefix of App Event type names.
    pub app_event_prefix: String,
    /// HUBSPOT_RATE_LIMIT: requests per rolling 10 s per portal.
    pub rate_limit: u32,
}

/// Which HubSpot API delivers timeline activities (HUBSPOT_ACTIVITY_API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivityApi {
    /// `app-events` (default): App Events.
    AppEvents,
    /// `timeline-v3`: legacy timeline v3 templates and events.
    TimelineV3,
}

/// Format of log lines (LOG_FORMAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `json` (default): one JSON object per line.
    Json,
    /// `text`: human-readable lines.
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
    ) -> Result<Config, ConfigError> {
        Ok(Config {
            database: DatabaseConfig::from_url(database_url)?,
            slot: slot.to_string(),
            publication: "hubspot_sidecar".into(),
            listen: "127.0.0.1:0".into(),
            public_url: "http://localhost:9187".into(),
            admin_token: admin_token.to_string(),
            secret_key,
            secret_key_previous: Vec::new(),
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
            stream_max_message: DEFAULT_STREAM_MAX_MESSAGE_MB * MIB,
        })
    }

    /// Checks what fields set after `local` (tests, the demo) or parsed by
    /// `RunArgs::validate` must agree on; the service calls it before it
    /// touches the database, so that a bad combination never migrates or
    /// creates a slot first.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_api_version(&self.hubspot.api_version)?;
        self.hubspot.activity_sink()?;
        Ok(())
    }
}

/// How timeline events reach HubSpot, validated (HUBSPOT_ACTIVITY_API).
#[derive(Clone, PartialEq, Eq)]
pub enum ActivitySinkConfig {
    /// App Events, with the event type name prefix.
    AppEvents {
        /// HUBSPOT_APP_EVENT_PREFIX.
        prefix: String,
    },
    /// Legacy timeline v3 templates and events.
    TimelineV3 {
        /// HUBSPOT_APP_ID, numeric.
        app_id: String,
        /// HUBSPOT_DEVELOPER_API_KEY.
        developer_api_key: String,
    },
}

impl std::fmt::Debug for ActivitySinkConfig {
    // Hand-written so that the developer API key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActivitySinkConfig::AppEvents { prefix } => {
                f.debug_struct("AppEvents").field("prefix", prefix).finish()
            }
            ActivitySinkConfig::TimelineV3 { app_id, .. } => f
                .debug_struct("TimelineV3")
                .field("app_id", app_id)
                .finish_non_exhaustive(),
        }
    }
}

impl HubSpotConfig {
    /// The activity API settings, or the variable that is missing or wrong.
    pub fn activity_sink(&self) -> Result<ActivitySinkConfig, ConfigError> {
        match self.activity_api {
            ActivityApi::AppEvents => Ok(ActivitySinkConfig::AppEvents {
                prefix: self.app_event_prefix.clone(),
            }),
            ActivityApi::TimelineV3 => {
                let app_id = self
                    .app_id
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .ok_or(ConfigError::Missing {
                        var: "HUBSPOT_APP_ID",
                        fix: "HUBSPOT_ACTIVITY_API=timeline-v3 needs the numeric id of the public app that owns \
                              the timeline event templates (developer account → Apps → the app → App ID)",
                    })?;
                if !app_id.chars().all(|c| c.is_ascii_digit()) {
                    return Err(ConfigError::Invalid {
                        var: "HUBSPOT_APP_ID",
                        problem: format!("{app_id:?} is not a number"),
                        fix: "use the app's numeric App ID, e.g. 1234567",
                    });
                }
                let key = self
                    .developer_api_key
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .ok_or(ConfigError::Missing {
                        var: "HUBSPOT_DEVELOPER_API_KEY",
                        fix: "HUBSPOT_ACTIVITY_API=timeline-v3 needs the developer account's API key \
                              (developer account → Keys → Developer API key); it only creates the event templates",
                    })?;
                Ok(ActivitySinkConfig::TimelineV3 {
                    app_id: app_id.to_string(),
                    developer_api_key: key.to_string(),
                })
            }
        }
    }
}

impl RunArgs {
    /// Checks every value and builds the [`Config`]; the error names the variable and the fix.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let database_url = self.database_url.ok_or(ConfigError::Missing {
            var: "DATABASE_URL",
            fix: "set it to the primary's URL, e.g. postgres://hubspot_sidecar:PASSWORD@db:5432/meltingspot",
        })?;
        let database = DatabaseConfig::from_url(&database_url)?;
        let admin_token = self.admin_token.filter(|t| !t.is_empty()).ok_or(ConfigError::Missing {
            var: "SIDECAR_ADMIN_TOKEN",
            fix: "set it to a long random string, e.g. `openssl rand -hex 32`; the web app sends it as a bearer token",
        })?;
        check_admin_token(&admin_token)?;
        let secret_key = parse_secret_key(self.secret_key.as_deref())?;
        let secret_key_previous = self
            .secret_key_previous
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| parse_key("SIDECAR_SECRET_KEY_PREVIOUS", Some(k)))
            .collect::<Result<Vec<_>, _>>()?;
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
        if !(16..=1024).contains(&self.stream_max_message_mb) {
            return Err(ConfigError::Invalid {
                var: "SIDECAR_STREAM_MAX_MESSAGE_MB",
                problem: format!("{} is outside 16..=1024", self.stream_max_message_mb),
                fix: "keep the default 128, or raise it with the pod's memory limit (about twice the value)",
            });
        }
        let cfg = Config {
            database,
            slot: self.slot,
            publication: self.publication,
            listen: self.listen,
            public_url: self.public_url.trim_end_matches('/').to_string(),
            admin_token,
            secret_key,
            secret_key_previous,
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
            stream_max_message: self.stream_max_message_mb * MIB,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

/// The shortest admin token accepted: 32 characters (`openssl rand -hex 16`).
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// Admin tokens written in this repository's examples: published, so never keys.
const EXAMPLE_ADMIN_TOKENS: [&str; 3] = [
    "CHANGE-ME-openssl-rand-hex-32",
    "dev-admin-token",
    "test-admin-token",
];

/// The admin token opens every Spot: refuse one short enough to guess, or
/// one copied from an example.
fn check_admin_token(token: &str) -> Result<(), ConfigError> {
    let fix = "generate one: `openssl rand -hex 32` (64 characters)";
    if EXAMPLE_ADMIN_TOKENS
        .iter()
        .any(|e| e.eq_ignore_ascii_case(token.trim()))
        || token.contains("CHANGE-ME")
    {
        return Err(ConfigError::Invalid {
            var: "SIDECAR_ADMIN_TOKEN",
            problem: "it is an example from the repository, known to anyone".into(),
            fix,
        });
    }
    if token.chars().count() < MIN_ADMIN_TOKEN_LEN {
        return Err(ConfigError::Invalid {
            var: "SIDECAR_ADMIN_TOKEN",
            problem: format!(
                "{} characters; at least {MIN_ADMIN_TOKEN_LEN} are needed",
                token.chars().count()
            ),
            fix,
        });
    }
    Ok(())
}

/// What HUBSPOT_API_VERSION may be; names every entry of `KNOWN_VERSIONS`.
const VERSION_FIX: &str = "use 2026-03 or 2026-09 (date-versioned paths), or v3 (legacy paths): \
                           the versions that exist for every API the sidecar calls";

fn check_api_version(version: &str) -> Result<(), ConfigError> {
    if KNOWN_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            var: "HUBSPOT_API_VERSION",
            problem: format!("{version:?} is not a version of every API the sidecar calls"),
            fix: VERSION_FIX,
        })
    }
}

/// Decodes SIDECAR_SECRET_KEY: 32 bytes as 64 hex digits or base64.
pub fn parse_secret_key(value: Option<&str>) -> Result<[u8; 32], ConfigError> {
    parse_key("SIDECAR_SECRET_KEY", value)
}

/// A 32-byte key in hex or base64, for `var`.
fn parse_key(var: &'static str, value: Option<&str>) -> Result<[u8; 32], ConfigError> {
    use base64::Engine;
    const FIX: &str = "set it to 32 random bytes as hex or base64, e.g. `openssl rand -hex 32`";
    let raw = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(ConfigError::Missing { var, fix: FIX })?;
    let bytes = if raw.len() == 64 && raw.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(raw).ok()
    } else {
        base64::engine::general_purpose::STANDARD.decode(raw).ok()
    };
    let bytes = bytes.ok_or_else(|| ConfigError::Invalid {
        var,
        problem: "neither hex nor base64".into(),
        fix: FIX,
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| ConfigError::Invalid {
        var,
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
    fn a_short_or_example_admin_token_is_refused_naming_the_variable() {
        let key = "ab".repeat(32);
        for (token, problem) in [
            ("x", "1 characters; at least 32"),
            ("CHANGE-ME-openssl-rand-hex-32", "an example"),
            ("dev-admin-token", "an example"),
        ] {
            let mut a = args(&["--admin-token", token, "--secret-key", &key]);
            a.database_url = Some("postgres://u@h/d".into());
            let err = a.validate().expect_err("refused").to_string();
            assert!(err.contains("SIDECAR_ADMIN_TOKEN"), "{err}");
            assert!(err.contains(problem), "{err}");
            assert!(err.contains("openssl rand -hex 32"), "{err}");
        }
        let mut a = args(&["--admin-token", &"7f".repeat(16), "--secret-key", &key]);
        a.database_url = Some("postgres://u@h/d".into());
        assert!(a.validate().is_ok());
    }

    #[test]
    fn short_secret_key_is_refused_with_its_length() {
        let err = parse_secret_key(Some("abcd")).unwrap_err().to_string();
        assert!(err.contains("SIDECAR_SECRET_KEY"), "{err}");
        assert!(err.contains("3 bytes instead of 32"), "{err}");
        assert!(parse_secret_key(Some(&"0f".repeat(32))).is_ok());
    }

    #[test]
    fn timeline_v3_config_names_the_missing_variables() {
        let mut cfg = Config::local("postgres://x@h/d", "s", "http://h", "t", [0; 32])
            .expect("valid URL")
            .hubspot;
        cfg.activity_api = ActivityApi::TimelineV3;
        let err = cfg.activity_sink().expect_err("no app id").to_string();
        assert!(err.contains("HUBSPOT_APP_ID"), "{err}");
        cfg.app_id = Some("4242".into());
        let err = cfg.activity_sink().expect_err("no key").to_string();
        assert!(err.contains("HUBSPOT_DEVELOPER_API_KEY"), "{err}");
        cfg.developer_api_key = Some("secret-dev-key".into());
        let sink = cfg.activity_sink().expect("complete");
        assert!(
            matches!(sink, ActivitySinkConfig::TimelineV3 { ref app_id, .. } if app_id == "4242")
        );
        assert!(!format!("{sink:?}").contains("secret-dev-key"));
        cfg.activity_api = ActivityApi::AppEvents;
        cfg.app_event_prefix = "pfx_".into();
        assert!(matches!(
            cfg.activity_sink().expect("app events"),
            ActivitySinkConfig::AppEvents { ref prefix } if prefix == "pfx_"
        ));
    }

    #[test]
    fn only_versions_of_every_api_are_accepted() {
        for v in KNOWN_VERSIONS {
            check_api_version(v).expect("known");
            assert!(VERSION_FIX.contains(v), "the fix names {v}");
        }
        for v in ["2025-09", "2027-01", "v4", "latest"] {
            let err = check_api_version(v).expect_err(v).to_string();
            assert!(err.starts_with("HUBSPOT_API_VERSION is invalid"), "{err}");
            assert!(err.contains("2026-09"), "{err}");
        }
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
