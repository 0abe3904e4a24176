//! The statements delivery rounds share. A burst over a thousand Spots runs
//! a thousand rounds at once, and each used to read its own rows with its
//! own statements: the primary ran some ten statements per Spot, and the
//! rounds queued for it (measured: p99 0.48-0.94 s for a burst whose calls
//! take 0.15 s). Here each round still asks for only its own rows, but one
//! statement answers every round that asked while the previous statement
//! of its kind ran, as Postgres's own group commit does for WAL flushes.
//!
//! Every answer comes from a statement that started after the ask: a round
//! sees what it would have seen alone. A fence check is as fresh as a check
//! of its own (G4), a take is as exclusive, and a lone round waits for no
//! window to fill.
//!
//! Written here, not taken from a crate: the dataloader crates gather asks
//! over a delay (a tax on the lone round) and cache answers (a fence check
//! must never be answered from a cache); this needs neither.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::warn;

use prometheus::IntCounter;

use crate::leader::LeaderLock;
use crate::metrics::Metrics;
use crate::store::{
    self, ContactState, Db, DbError, Marker, MemberRecord, QueuedActivity, RoundDone,
};

/// Statements of one kind running at once: a burst's asks are answered by a
/// few statements in parallel, well within the pool, and a slow statement
/// does not hold up every round behind it.
const STATEMENTS_IN_FLIGHT: usize = 4;
/// Asks one statement answers at most, so that a statement (and the rows it
/// locks or returns) stays small whatever the burst.
const ASKS_PER_STATEMENT: usize = 128;

type Answers<A> = Pin<Box<dyn Future<Output = Result<Vec<A>, DbError>> + Send>>;
type Statement<Q, A> = Box<dyn Fn(Db, Vec<Q>) -> Answers<A> + Send + Sync>;
type Reply<A> = oneshot::Sender<Result<A, Arc<DbError>>>;

/// Asks of one kind, answered together: `statement` gets the asks and
/// returns one answer per ask, in their order.
pub(super) struct Coalesced<Q, A> {
    db: Db,
    /// Counts asks and statements of this kind.
    asks: IntCounter,
    statements: IntCounter,
    statement: Statement<Q, A>,
    pending: Mutex<Pending<Q, A>>,
}

struct Pending<Q, A> {
    asks: Vec<(Q, Reply<A>)>,
    /// Tasks answering asks of this kind: at most STATEMENTS_IN_FLIGHT.
    answering: usize,
}

impl<Q: Clone + Send + 'static, A: Send + 'static> Coalesced<Q, A> {
    /// `kind` is one of `metrics::SHARED_KINDS`.
    fn new(db: Db, metrics: &Metrics, kind: &str, statement: Statement<Q, A>) -> Arc<Self> {
        Arc::new(Coalesced {
            db,
            asks: metrics.delivery_shared_asks.with_label_values(&[kind]),
            statements: metrics
                .delivery_shared_statements
                .with_label_values(&[kind]),
            statement,
            pending: Mutex::new(Pending {
                asks: Vec::new(),
                answering: 0,
            }),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending<Q, A>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer to `ask`, from a statement that starts after this call.
    pub(super) async fn ask(self: &Arc<Self>, ask: Q) -> Result<A, DbError> {
        let (reply, answer) = oneshot::channel();
        self.asks.inc();
        let start = {
            let mut pending = self.pending();
            pending.asks.push((ask, reply));
            let start = pending.answering < STATEMENTS_IN_FLIGHT;
            if start {
                pending.answering += 1;
            }
            start
        };
        // A task, not this caller: the caller's round must not wait for
        // the asks of other rounds that arrive after its own.
        if start {
            tokio::spawn(self.clone().answer());
        }
        match answer.await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(DbError::Shared(e)),
            Err(_) => Err(DbError::Unavailable(
                "the shared statement's task ended without an answer".into(),
            )),
        }
    }

    /// Answers asks until none is left.
    async fn answer(self: Arc<Self>) {
        // Counts this task out should it panic, so that the next ask starts
        // another.
        let mut answering = Answering(&self, true);
        loop {
            let asks: Vec<(Q, Reply<A>)> = {
                let mut pending = self.pending();
                if pending.asks.is_empty() {
                    // Under the lock the asks are pushed under: an ask
                    // either came before (and is taken) or sees this task
                    // counted out (and starts one). Never stranded.
                    pending.answering = pending.answering.saturating_sub(1);
                    answering.1 = false;
                    return;
                }
                let n = pending.asks.len().min(ASKS_PER_STATEMENT);
                pending.asks.drain(..n).collect()
            };
            let (asks, replies): (Vec<Q>, Vec<Reply<A>>) = asks.into_iter().unzip();
            let n = asks.len();
            self.statements.inc();
            let answered = if n > 1 {
                // Kept for a retry one by one (below).
                let alone = asks.clone();
                match (self.statement)(self.db.clone(), asks).await {
                    // The server refused the statement: maybe for one ask's
                    // rows (a constraint, a value). Each ask then runs alone,
                    // so that one round's bad rows fail only that round, as
                    // before rounds shared statements (G8). A connection or
                    // pool failure is everyone's and is not retried here.
                    Err(DbError::Postgres(e)) if e.as_db_error().is_some() => {
                        warn!(error = %e, asks = n, "a shared statement failed; its asks run one by one");
                        let mut one_by_one = Vec::with_capacity(n);
                        for ask in alone {
                            one_by_one.push(self.one(ask).await);
                        }
                        one_by_one
                    }
                    answered => spread(answered, n),
                }
            } else {
                spread((self.statement)(self.db.clone(), asks).await, n)
            };
            for (reply, answer) in replies.into_iter().zip(answered) {
                let _ = reply.send(answer);
            }
        }
    }

    /// One ask, alone in its statement.
    async fn one(&self, ask: Q) -> Result<A, Arc<DbError>> {
        self.statements.inc();
        spread((self.statement)(self.db.clone(), vec![ask]).await, 1)
            .pop()
            .unwrap_or_else(|| Err(Arc::new(DbError::Unavailable("no answer".into()))))
    }
}

/// One result per ask from a statement's result: its answers, or its error
/// for every ask.
fn spread<A>(answered: Result<Vec<A>, DbError>, n: usize) -> Vec<Result<A, Arc<DbError>>> {
    match answered {
        Ok(answers) if answers.len() == n => answers.into_iter().map(Ok).collect(),
        Ok(answers) => {
            let e = Arc::new(DbError::Unavailable(format!(
                "a shared statement answered {} of {n} asks",
                answers.len()
            )));
            (0..n).map(|_| Err(e.clone())).collect()
        }
        Err(e) => {
            let e = Arc::new(e);
            (0..n).map(|_| Err(e.clone())).collect()
        }
    }
}

/// Counts an answering task out if it ends by a panic (while the flag is
/// set), and fails the asks waiting (their rounds retry), so that none
/// waits for a task that is gone; its normal end counts itself out under
/// the asks' lock.
struct Answering<'a, Q, A>(&'a Coalesced<Q, A>, bool);

impl<Q, A> Drop for Answering<'_, Q, A> {
    fn drop(&mut self) {
        if self.1 {
            let mut pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.answering = pending.answering.saturating_sub(1);
            pending.asks.clear();
        }
    }
}

/// A fence to check: `(spot_id, portal_id, activation)`.
pub(super) type FenceKey = (i64, i64, i64);

/// The contact-map keys of one round on one portal.
#[derive(Clone)]
pub(super) struct ContactKeys {
    pub(super) portal_id: i64,
    /// `(spot_id, member_id)`.
    pub(super) keys: Vec<(i64, i64)>,
}

/// A take's rows, and how many due rows another transaction held.
type Taken = (Vec<Marker>, usize);
/// What the contact map knows, by `(spot_id, member_id)`.
pub(super) type ContactStates = HashMap<(i64, i64), ContactState>;

/// The statements rounds share, one of each kind.
pub struct Shared {
    /// Due property rows, taken: `(spot_id, limit)` -> rows and how many were held.
    pub(super) take: Arc<Coalesced<(i64, i64), Taken>>,
    /// Due timeline events: `(spot_id, limit)` -> events.
    pub(super) activities: Arc<Coalesced<(i64, i64), Vec<QueuedActivity>>>,
    /// The members' current values, by member id.
    pub(super) members: Arc<Coalesced<Vec<i64>, Vec<MemberRecord>>>,
    /// What the contact map knows of the members, on the round's portal.
    pub(super) contacts: Arc<Coalesced<ContactKeys, ContactStates>>,
    /// Whether a call's activation is current and this replica still leads.
    pub(super) fences: Arc<Coalesced<FenceKey, bool>>,
    /// A round's completions stored, in one transaction with those of the
    /// rounds ending meanwhile: whether its fence was still current.
    pub(super) complete: Arc<Coalesced<RoundDone, bool>>,
    /// A worker's first success (or its first after failures) stops the
    /// failure clock of its `(spot_id, activation)`.
    pub(super) successes: Arc<Coalesced<(i64, i64), ()>>,
}

impl Shared {
    /// The shared statements on `db`; fence checks also need `leader`'s lock held.
    pub fn new(db: &Db, metrics: &Metrics, leader: Option<LeaderLock>) -> Shared {
        Shared {
            take: Coalesced::new(
                db.clone(),
                metrics,
                "take",
                Box::new(|db, asks| {
                    Box::pin(
                        async move { store::take_due_markers(&*db.client().await?, &asks).await },
                    )
                }),
            ),
            activities: Coalesced::new(
                db.clone(),
                metrics,
                "activities",
                Box::new(|db, asks| {
                    Box::pin(
                        async move { store::due_activities(&*db.client().await?, &asks).await },
                    )
                }),
            ),
            members: Coalesced::new(
                db.clone(),
                metrics,
                "members",
                Box::new(|db, asks| Box::pin(members(db, asks))),
            ),
            contacts: Coalesced::new(
                db.clone(),
                metrics,
                "contacts",
                Box::new(|db, asks| Box::pin(contacts(db, asks))),
            ),
            fences: Coalesced::new(
                db.clone(),
                metrics,
                "fence",
                Box::new(move |db, asks| {
                    let lock = leader.map(|l| (l.pid, l.class, l.key));
                    Box::pin(async move {
                        store::current_fences(&*db.client().await?, &asks, lock).await
                    })
                }),
            ),
            complete: Coalesced::new(
                db.clone(),
                metrics,
                "complete",
                Box::new(|db, asks| {
                    Box::pin(async move { store::complete(&mut *db.client().await?, &asks).await })
                }),
            ),
            successes: Coalesced::new(
                db.clone(),
                metrics,
                "success",
                Box::new(|db, asks| {
                    Box::pin(async move {
                        let n = asks.len();
                        store::record_successes(&*db.client().await?, &asks).await?;
                        Ok(vec![(); n])
                    })
                }),
            ),
        }
    }
}

/// One read of every member asked for, handed back to each ask.
async fn members(db: Db, asks: Vec<Vec<i64>>) -> Result<Vec<Vec<MemberRecord>>, DbError> {
    let mut ids: Vec<i64> = asks.iter().flatten().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let records = store::member_records(&*db.client().await?, &ids).await?;
    let by_id: HashMap<i64, MemberRecord> = records.into_iter().map(|r| (r.member_id, r)).collect();
    Ok(asks
        .iter()
        .map(|ids| ids.iter().filter_map(|id| by_id.get(id).cloned()).collect())
        .collect())
}

/// One read of the contact map for every round asking, each on its portal.
async fn contacts(db: Db, asks: Vec<ContactKeys>) -> Result<Vec<ContactStates>, DbError> {
    let keys: Vec<(i64, i64, i64)> = asks
        .iter()
        .flat_map(|a| a.keys.iter().map(|&(s, m)| (a.portal_id, s, m)))
        .collect();
    let states = store::contact_states(&*db.client().await?, &keys).await?;
    Ok(asks
        .iter()
        .map(|a| {
            a.keys
                .iter()
                .filter_map(|&(s, m)| {
                    states
                        .get(&(a.portal_id, s, m))
                        .map(|state| ((s, m), state.clone()))
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::config::DatabaseConfig;

    /// A pool that is never connected: the statements below do not use it.
    fn db() -> Db {
        let cfg = DatabaseConfig::from_url("postgres://nobody@127.0.0.1:1/none").expect("url");
        Db::new(&cfg).expect("pool")
    }

    /// A statement that answers each ask with (ask, how many statements had
    /// started before it), after a pause so that asks gather meanwhile.
    fn echo(started: Arc<AtomicUsize>) -> Statement<u32, (u32, usize)> {
        Box::new(move |_db, asks| {
            let started = started.clone();
            Box::pin(async move {
                let n = started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(asks.into_iter().map(|a| (a, n)).collect())
            })
        })
    }

    #[tokio::test]
    async fn a_thousand_asks_are_answered_each_its_own_by_few_statements() {
        let metrics = Metrics::new();
        let started = Arc::new(AtomicUsize::new(0));
        let shared = Coalesced::new(db(), &metrics, "take", echo(started.clone()));
        let asks = (0..1000u32).map(|i| {
            let shared = shared.clone();
            tokio::spawn(async move { shared.ask(i).await })
        });
        let answers = futures_util::future::join_all(asks).await;
        for (i, answer) in answers.into_iter().enumerate() {
            let (echoed, _) = answer.expect("task").expect("answer");
            assert_eq!(echoed as usize, i, "an ask got another ask's answer");
        }
        let statements = started.load(Ordering::SeqCst);
        // 1,000 asks at most 128 per statement: at least 8 statements; the
        // first few start before the rest have asked.
        assert!(
            (8..=40).contains(&statements),
            "{statements} statements for 1,000 asks"
        );
        let kind = ["take"];
        assert_eq!(
            metrics.delivery_shared_asks.with_label_values(&kind).get(),
            1000
        );
        assert_eq!(
            metrics
                .delivery_shared_statements
                .with_label_values(&kind)
                .get(),
            statements as u64
        );
    }

    #[tokio::test]
    async fn an_ask_is_answered_by_a_statement_that_started_after_it() {
        let metrics = Metrics::new();
        let started = Arc::new(AtomicUsize::new(0));
        // Statements hold until the gate opens.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (counted, held) = (started.clone(), gate.clone());
        let shared: Arc<Coalesced<u32, (u32, usize)>> = Coalesced::new(
            db(),
            &metrics,
            "fence",
            Box::new(move |_db, asks| {
                let (started, gate) = (counted.clone(), held.clone());
                Box::pin(async move {
                    let n = started.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.expect("gate").forget();
                    Ok(asks.into_iter().map(|a| (a, n)).collect())
                })
            }),
        );
        // Every slot busy with a statement that started before the ask...
        let mut busy = Vec::new();
        for i in 0..STATEMENTS_IN_FLIGHT {
            let asking = shared.clone();
            busy.push(tokio::spawn(async move { asking.ask(i as u32).await }));
            tokio::time::timeout(Duration::from_secs(5), async {
                while started.load(Ordering::SeqCst) <= i {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("a statement starts for each ask while slots are free");
        }
        // ...then the ask: it waits for a slot, and is not answered by them.
        let asking = shared.clone();
        let late = tokio::spawn(async move { asking.ask(99).await });
        tokio::task::yield_now().await;
        gate.add_permits(100);
        let (echoed, n) = late.await.expect("task").expect("answer");
        assert_eq!(echoed, 99);
        assert!(
            n >= STATEMENTS_IN_FLIGHT,
            "answered by statement {n}, which started before the ask"
        );
        for b in busy {
            b.await.expect("task").expect("answer");
        }
    }

    #[tokio::test]
    async fn a_statement_that_panics_fails_its_asks_and_the_next_ask_is_answered() {
        let metrics = Metrics::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let shared: Arc<Coalesced<u32, u32>> = Coalesced::new(
            db(),
            &metrics,
            "complete",
            Box::new(move |_db, asks| {
                let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
                Box::pin(async move {
                    assert!(!first, "the first statement fails");
                    Ok(asks)
                })
            }),
        );
        assert!(shared.ask(1).await.is_err(), "the panicked statement's ask");
        // Every slot counted out again: asks beyond the slots are answered.
        for i in 0..(2 * STATEMENTS_IN_FLIGHT as u32) {
            assert_eq!(shared.ask(i).await.expect("answer"), i);
        }
    }
}
