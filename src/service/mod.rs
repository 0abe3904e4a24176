//! `hubspot-sidecar run`: wires the stages together.
//!
//! replication (Source) -> translate -> store::hand_off (outbox + checkpoint in
//! one transaction) -> ack the slot (`capture`); deliver::supervise drains the
//! outbox; http serves the admin API, metrics and health; `lag` samples the
//! lag gauges. This file holds the start and each leadership term.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{info, Instrument};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::deliver::mailer::Mailer;
use crate::deliver::{self, DeliverContext, Fences};
use crate::health::Health;
use crate::http::{self, AppState};
use crate::hubspot::oauth::OAuthApp;
use crate::hubspot::ratelimit::Limiters;
use crate::hubspot::timeline::ActivitySink;
use crate::hubspot::HubSpotClient;
use crate::integrations::Integrations;
use crate::internal_events as events;
use crate::leader;
use crate::metrics::Metrics;
use crate::replication::ConnParams;
use crate::store::{self, secrets::Sealer, Db};
use crate::translate::MarkerKey;

mod capture;
mod lag;

use capture::Capture;
use lag::sample_lag;

/// Handles a running sidecar exposes (tests and the demo use them); sent
/// once the HTTP server listens.
#[derive(Clone)]
pub struct Running {
    /// The instance's Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Flags behind the health endpoints: migrations applied, replication streaming.
    pub health: Arc<Health>,
    /// Address the HTTP server actually bound (SIDECAR_LISTEN may ask for port 0).
    pub listen_addr: std::net::SocketAddr,
}

impl Running {
    /// Leading, migrated and streaming: what `/readyz` answers 200 for
    /// (less the database round trip). `Running` is handed out as soon as
    /// the HTTP server listens, before the leadership and the migrations.
    pub fn ready(&self) -> bool {
        let h = &self.health;
        h.leader.load(Ordering::Relaxed)
            && h.migrated.load(Ordering::Relaxed)
            && h.streaming.load(Ordering::Relaxed)
    }
}

/// Runs until `shutdown` turns true; then finishes the in-flight hand-off,
/// acknowledges it and returns.
pub async fn run(
    cfg: Config,
    shutdown: watch::Receiver<bool>,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    // Everything that can be checked without the database is checked first.
    cfg.check()?;
    let sink = ActivitySink::new(cfg.hubspot.activity_sink()?);
    let params = ConnParams::from_config(&cfg.database)?;
    let db = Db::new(&cfg.database)?;
    // The stream's hand-offs never queue behind delivery for a connection.
    let stream_db = Db::with_size(&cfg.database, 2)?;
    let metrics = Arc::new(Metrics::new());
    crate::replication::slot::ResyncCause::zero_counters(&metrics);
    let health = Arc::new(Health::default());
    let ring = Arc::new(crate::store::secrets::KeyRing::new(
        &cfg.secret_key,
        &cfg.secret_key_previous,
    ));
    let sealer = Sealer::new(ring.clone());
    let wake = crate::deliver::Wake::default();
    let limiters = Limiters::new(cfg.hubspot.rate_limit);
    let fences = Fences::default();
    let markers = MarkerKey::with_previous(&cfg.secret_key, &cfg.secret_key_previous);
    let hubspot = HubSpotClient::new(
        &cfg.hubspot.api_base,
        &cfg.hubspot.api_version,
        metrics.clone(),
    );

    let oauth = match (&cfg.hubspot.client_id, &cfg.hubspot.client_secret) {
        (Some(id), Some(secret)) => Some(OAuthApp {
            client_id: id.clone(),
            client_secret: secret.clone(),
            redirect_uri: format!("{}/oauth/hubspot/callback", cfg.public_url),
            start_uri: format!("{}/oauth/hubspot/start", cfg.public_url),
            auth_base: cfg.hubspot.auth_base.clone(),
        }),
        _ => None,
    };
    let notify = Arc::new(Notify::new());
    let webhook_events = Arc::new(Notify::new());

    // Everything below stops on `stop`: the caller's shutdown, or this
    // replica losing its leadership.
    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let (mut shutdown, stop_tx) = (shutdown.clone(), stop_tx.clone());
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            let _ = stop_tx.send(true);
        });
    }

    // The HTTP server comes first: /healthz answers while the replica waits
    // for a primary or for the leadership, and /readyz says it is not ready.
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("SIDECAR_LISTEN={}: cannot listen there", cfg.listen))?;
    let listen_addr = listener.local_addr()?;
    let app = http::router(AppState {
        db: db.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        admin_token: cfg.admin_token.as_str().into(),
        signing: ring.signing(),
        public_url: cfg.public_url.as_str().into(),
        slot: cfg.slot.as_str().into(),
        integrations: Integrations {
            db: db.clone(),
            sealer: sealer.clone(),
            hubspot: hubspot.clone(),
            oauth: oauth.clone(),
            limiters: limiters.clone(),
            fences: fences.clone(),
            markers: markers.clone(),
            wake: wake.clone(),
        },
        webhook_secret: cfg.hubspot.client_secret.as_deref().map(Into::into),
        webhook_events: webhook_events.clone(),
        throttle: Default::default(),
        health_db: Db::with_size(&cfg.database, 1)?,
    });
    let http_task = tokio::spawn(http::server::serve(
        listener,
        app,
        metrics.clone(),
        stop.clone(),
    ));
    info!(%listen_addr, "HTTP listening");
    if let Some(tx) = started {
        let _ = tx.send(Running {
            metrics: metrics.clone(),
            health: health.clone(),
            listen_addr,
        });
    }

    let shared = Shared {
        cfg: &cfg,
        db: db.clone(),
        stream_db,
        params,
        metrics: metrics.clone(),
        health: health.clone(),
        sealer,
        wake,
        limiters,
        fences,
        markers,
        hubspot,
        oauth,
        sink,
        notify,
        webhook_events,
    };
    // A replica leads for a term; when it loses the leadership (its lock
    // session failed, e.g. the database restarted) it stands by and tries again.
    let result = loop {
        match shared.lead_once(stop.clone()).await {
            Ok(Term::Stopped) => break Ok(()),
            Ok(Term::LeadershipLost) => continue,
            Err(e) => break Err(e),
        }
    };
    let _ = stop_tx.send(true);
    let _ = http_task.await;
    info!("stopped");
    result
}

/// What every term of the leadership uses.
struct Shared<'a> {
    cfg: &'a Config,
    db: Db,
    stream_db: Db,
    params: ConnParams,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    sealer: Sealer,
    wake: crate::deliver::Wake,
    limiters: Limiters,
    fences: Fences,
    markers: MarkerKey,
    hubspot: HubSpotClient,
    oauth: Option<OAuthApp>,
    sink: ActivitySink,
    notify: Arc<Notify>,
    /// Notified by the webhook endpoint when it stored events.
    webhook_events: Arc<Notify>,
}

/// How a term of the leadership ended.
enum Term {
    /// Shutdown.
    Stopped,
    /// The lock session failed: another replica may lead now.
    LeadershipLost,
}

impl Shared<'_> {
    /// Waits for a primary and the leadership, then streams and delivers
    /// until shutdown or until the leadership is lost.
    async fn lead_once(&self, stop: watch::Receiver<bool>) -> anyhow::Result<Term> {
        let Shared {
            cfg,
            db,
            stream_db,
            params,
            metrics,
            health,
            sealer,
            wake,
            limiters,
            fences,
            markers,
            hubspot,
            oauth,
            sink,
            notify,
            webhook_events,
        } = self;
        let Some(leadership) =
            leader::lead(&cfg.database, &cfg.slot, health, metrics, stop.clone()).await?
        else {
            return Ok(Term::Stopped);
        };
        let leadership = Arc::new(leadership);
        {
            let mut client = db.client().await.context("connecting to DATABASE_URL")?;
            store::migrate(&mut client)
                .await
                .context("applying hubspot_sync migrations")?;
            health.migrated.store(true, Ordering::Relaxed);
            // A rotation's one pass: every token under the current key.
            match store::secrets::reseal(&client, sealer).await {
                Ok(r) => {
                    metrics
                        .tokens_sealed_with_previous_key
                        .set(r.remaining as i64);
                    metrics.tokens_undecryptable.set(r.undecryptable as i64);
                    if r.resealed > 0 || r.remaining > 0 {
                        info!(
                            resealed = r.resealed,
                            remaining = r.remaining,
                            key_id = %sealer.key_id(),
                            "sealed stored tokens again under the current SIDECAR_SECRET_KEY"
                        );
                    }
                    if r.undecryptable > 0 {
                        tracing::error!(
                            tokens = r.undecryptable,
                            "stored tokens cannot be decrypted with SIDECAR_SECRET_KEY or any \
                             SIDECAR_SECRET_KEY_PREVIOUS: set the old key as previous (runbook: Key rotation)"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-seal stored tokens; the next start tries again")
                }
            }
        }
        // This term's tasks stop on `stop`, or as soon as the leadership is lost.
        let (term_tx, term) = watch::channel(false);
        let watcher = {
            let (leadership, health, metrics) =
                (leadership.clone(), health.clone(), metrics.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let r = leadership.watch(health, metrics, stop).await;
                if let Err(e) = &r {
                    tracing::error!(error = %e, "leadership lost: stopping at once, so that another replica can take over");
                }
                let _ = term_tx.send(true);
                r
            })
        };

        // The lag gauge's source, and whether the stream is reading a backlog.
        let oldest_pending = Arc::new(AtomicI64::new(0));
        let (catching_up, catching_up_rx) = watch::channel(false);
        let deliver_task = tokio::spawn(
            deliver::supervise(
                DeliverContext {
                    db: db.clone(),
                    client: hubspot.clone(),
                    oauth: oauth.clone(),
                    sink: sink.clone(),
                    sealer: sealer.clone(),
                    metrics: metrics.clone(),
                    limiters: limiters.clone(),
                    fences: fences.clone(),
                    shared: Arc::new(deliver::Shared::new(db, metrics, Some(leadership.lock))),
                    markers: markers.clone(),
                    fail_after: cfg.fail_after,
                    failed_retention: cfg.failed_retention,
                    wake: wake.clone(),
                    catching_up: catching_up_rx,
                    notify: notify.clone(),
                    refreshes: Arc::new(tokio::sync::Semaphore::new(deliver::REFRESHES_IN_FLIGHT)),
                },
                term.clone(),
            )
            .instrument(tracing::info_span!("deliver")),
        );

        let mailer_task = match &cfg.smtp_url {
            Some(url) => {
                let mailer = Mailer::new(url, cfg.smtp_from.as_deref())?;
                Some(tokio::spawn(mailer.run(
                    db.clone(),
                    metrics.clone(),
                    notify.clone(),
                    term.clone(),
                )))
            }
            None => None,
        };

        let webhooks_task = tokio::spawn(
            deliver::portal_changes::apply_webhook_events(
                db.clone(),
                metrics.clone(),
                wake.clone(),
                webhook_events.clone(),
                term.clone(),
            )
            .instrument(tracing::info_span!("webhooks")),
        );

        let sampler = tokio::spawn(sample_lag(
            db.clone(),
            cfg.slot.clone(),
            metrics.clone(),
            oldest_pending.clone(),
            term.clone(),
        ));

        let capture = Capture {
            cfg,
            params: params.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            wake: wake.clone(),
            catching_up,
            oldest_pending,
            markers: markers.clone(),
            identity: Default::default(),
        };
        let mut backoff = Backoff::reconnect();
        let mut stop_rx = term.clone();
        loop {
            let attempt = Instant::now();
            match capture.stream(stream_db, term.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    // A stream that ran for a while was healthy: start backing off afresh.
                    if attempt.elapsed() > Duration::from_secs(30) {
                        backoff.reset();
                    }
                    health.streaming.store(false, Ordering::Relaxed);
                    let pause = backoff.next();
                    events::StreamFailed {
                        error: &e,
                        retry_in: pause,
                    }
                    .emit(metrics);
                    tokio::select! {
                        _ = stopped(&mut stop_rx) => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        health.streaming.store(false, Ordering::Relaxed);
        let _ = deliver_task.await;
        if let Some(t) = mailer_task {
            let _ = t.await;
        }
        let _ = sampler.await;
        let _ = webhooks_task.await;
        // The lock is released only now, after the last hand-off and round.
        let lost = watcher.await;
        health.migrated.store(false, Ordering::Relaxed);
        drop(leadership);
        match lost {
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "this replica no longer leads; standing by again");
                Ok(Term::LeadershipLost)
            }
            _ => Ok(Term::Stopped),
        }
    }
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
