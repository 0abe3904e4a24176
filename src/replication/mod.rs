//! Replication stage: the slot, the pgoutput stream, and decoding it into
//! committed transactions of typed row changes.
//!
//! pgwire-replication owns the transport and standby feedback; this module owns
//! the slot's lifecycle, the relation cache and the framing of transactions.
//!
//! A transaction is never held whole: each change is handed on as it is
//! decoded (`SourceEvent::Change`), between its `Begin` and `Commit`, so that
//! memory does not grow with the transaction (a million-row UPDATE is one
//! transaction). The consumer folds the changes into small per-Spot work.
//!
//! Why protocol 1 and not v2's `streaming 'on'`: v2 streams a transaction
//! while it is still running, and it may yet abort. Nothing of it can be
//! acted on before its commit (delivery reads the committed rows over SQL),
//! so its changes would have to be kept somewhere until then, which is the
//! very cost streaming is meant to avoid. With protocol 1 the walsender keeps
//! a large transaction on its own disk (`logical_decoding_work_mem`) and sends
//! it once committed; read change by change, that costs this process nothing.

pub mod pgoutput;
pub mod slot;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};

use pgoutput::{Message, OldKind, Relation, Tuple, Value};

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection: {0}")]
    Wire(pgwire_replication::PgWireError),
    #[error(
        "a row change or logical message of {bytes} bytes exceeds SIDECAR_STREAM_MAX_MESSAGE_MB \
         ({limit} bytes): the stream cannot pass it. If it is data the application wrote, raise \
         SIDECAR_STREAM_MAX_MESSAGE_MB (and the pod's memory limit, about twice it); if it is a \
         message nobody should have written, see the runbook (Stream message too large)"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("SQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    #[error("row change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("{0}")]
    Protocol(String),
    #[error("DATABASE_URL: {0}")]
    Url(String),
}

impl From<pgwire_replication::PgWireError> for ReplicationError {
    fn from(e: pgwire_replication::PgWireError) -> Self {
        match e {
            pgwire_replication::PgWireError::MessageTooLarge {
                payload_bytes,
                limit_bytes,
            } => ReplicationError::TooLarge {
                bytes: payload_bytes,
                limit: limit_bytes,
            },
            other => ReplicationError::Wire(other),
        }
    }
}

/// A column value of a decoded row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// The relation has no column of that name.
    Absent,
    Null,
    /// Unchanged TOAST value: the column keeps its previous value.
    Unchanged,
    Text(&'a str),
}

/// A decoded row: values mapped to the column names of the latest Relation message.
#[derive(Debug, Clone)]
pub struct Row {
    relation: Arc<Relation>,
    values: Vec<Value>,
}

impl Row {
    pub fn get(&self, column: &str) -> Field<'_> {
        let Some(i) = self.relation.columns.iter().position(|c| c.name == column) else {
            return Field::Absent;
        };
        match self.values.get(i) {
            None => Field::Absent,
            Some(Value::Null) => Field::Null,
            Some(Value::UnchangedToast) => Field::Unchanged,
            // Binary format is never requested, so a value is text; non-UTF-8 is treated as absent.
            Some(Value::Text(b)) | Some(Value::Binary(b)) => std::str::from_utf8(b)
                .map(Field::Text)
                .unwrap_or(Field::Absent),
        }
    }

    pub fn i64(&self, column: &str) -> Option<i64> {
        match self.get(column) {
            Field::Text(s) => s.parse().ok(),
            _ => None,
        }
    }

    pub fn text(&self, column: &str) -> Option<&str> {
        match self.get(column) {
            Field::Text(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

#[derive(Debug, Clone)]
pub struct RowChange {
    pub schema: Arc<str>,
    pub table: Arc<str>,
    pub op: Op,
    /// The new row (Insert, Update).
    pub new: Option<Row>,
    /// The old key or full old row (Update with a changed key or FULL identity, Delete).
    pub old: Option<Row>,
    /// Which old tuple pgoutput sent (key only, or the full row).
    pub old_kind: Option<OldKind>,
    /// The table's replica identity is FULL, as its latest Relation message
    /// says (a DBA may change it while the sidecar runs).
    pub identity_full: bool,
}

impl RowChange {
    /// The whole old row, when pgoutput sent it (REPLICA IDENTITY FULL);
    /// a key-only old tuple says nothing about the other columns.
    pub fn full_old(&self) -> Option<&Row> {
        self.old
            .as_ref()
            .filter(|_| self.old_kind == Some(OldKind::Full))
    }
}

/// An item of a transaction, in stream order.
#[derive(Debug, Clone)]
pub enum TxItem {
    Change(RowChange),
    /// One TRUNCATE statement: the (schema, table) of each relation it emptied.
    Truncate(Vec<(Arc<str>, Arc<str>)>),
    /// A transactional `pg_logical_emit_message`.
    Message {
        prefix: String,
        content: bytes::Bytes,
    },
}

/// What a transaction's Begin says: with protocol 1 it is sent once the
/// transaction has committed, so its commit position and time are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxMeta {
    pub xid: u32,
    pub commit_lsn: u64,
    pub commit_time: DateTime<Utc>,
}

/// A transaction's frame and contents, one piece at a time.
#[derive(Debug, Clone)]
pub enum Decoded {
    Begin(TxMeta),
    Item(TxItem),
    /// The transaction is complete; `end_lsn` is where the next one starts.
    Commit {
        end_lsn: u64,
    },
}

/// Relation cache keyed by OID; every Relation message replaces the entry, so a
/// column added or renamed is picked up before the rows that use it.
#[derive(Default)]
pub struct Assembler {
    relations: HashMap<u32, Arc<Relation>>,
    open: Option<TxMeta>,
}

impl Assembler {
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    fn row(&self, relation_id: u32, tuple: Tuple) -> Result<Row, ReplicationError> {
        let relation = self
            .relations
            .get(&relation_id)
            .cloned()
            .ok_or(ReplicationError::UnknownRelation(relation_id))?;
        Ok(Row {
            relation,
            values: tuple.0,
        })
    }

    fn change(
        &self,
        relation_id: u32,
        op: Op,
        new: Option<Tuple>,
        old: Option<pgoutput::OldTuple>,
    ) -> Result<TxItem, ReplicationError> {
        let relation = self
            .relations
            .get(&relation_id)
            .ok_or(ReplicationError::UnknownRelation(relation_id))?;
        let old_kind = old.as_ref().map(|o| o.kind);
        Ok(TxItem::Change(RowChange {
            schema: relation.namespace.as_str().into(),
            table: relation.name.as_str().into(),
            op,
            new: new.map(|t| self.row(relation_id, t)).transpose()?,
            old: old.map(|o| self.row(relation_id, o.tuple)).transpose()?,
            old_kind,
            identity_full: relation.replica_identity == b'f',
        }))
    }

    /// Feed one decoded message; returns what it means for the open transaction.
    pub fn push(&mut self, msg: Message) -> Result<Option<Decoded>, ReplicationError> {
        let item = match msg {
            Message::Begin(b) => {
                let meta = TxMeta {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_time: pg_time(b.commit_time),
                };
                self.open = Some(meta);
                return Ok(Some(Decoded::Begin(meta)));
            }
            Message::Commit(c) => {
                self.open
                    .take()
                    .ok_or_else(|| ReplicationError::Protocol("Commit without Begin".into()))?;
                return Ok(Some(Decoded::Commit { end_lsn: c.end_lsn }));
            }
            Message::Relation(r) => {
                self.relations.insert(r.id, Arc::new(r));
                return Ok(None);
            }
            Message::Origin { .. } | Message::Type { .. } => return Ok(None),
            Message::Insert { relation_id, new } => {
                self.change(relation_id, Op::Insert, Some(new), None)?
            }
            Message::Update {
                relation_id,
                old,
                new,
            } => self.change(relation_id, Op::Update, Some(new), old)?,
            Message::Delete { relation_id, old } => {
                self.change(relation_id, Op::Delete, None, Some(old))?
            }
            Message::Truncate { relation_ids, .. } => {
                let tables = relation_ids
                    .iter()
                    .map(|id| {
                        let r = self
                            .relations
                            .get(id)
                            .ok_or(ReplicationError::UnknownRelation(*id))?;
                        Ok((r.namespace.as_str().into(), r.name.as_str().into()))
                    })
                    .collect::<Result<_, ReplicationError>>()?;
                TxItem::Truncate(tables)
            }
            Message::LogicalMessage {
                transactional,
                prefix,
                content,
                ..
            } => {
                if !transactional {
                    return Ok(None);
                }
                TxItem::Message { prefix, content }
            }
        };
        if self.open.is_none() {
            return Err(ReplicationError::Protocol(
                "row change outside a transaction".into(),
            ));
        }
        Ok(Some(Decoded::Item(item)))
    }
}

/// Postgres timestamps count microseconds from 2000-01-01 UTC.
pub fn pg_time(micros: i64) -> DateTime<Utc> {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_UNIX_MICROS)).unwrap_or_default()
}

/// What the stream hands to the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    /// A piece of a committed transaction, in stream order.
    Tx(Decoded),
    /// A keepalive with nothing open: everything up to `wal_end` has been
    /// sent to us, so it may be acknowledged once no work is in flight.
    Idle { wal_end: u64 },
}

/// Connection parameters taken from DATABASE_URL.
#[derive(Clone, Debug)]
pub struct ConnParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    /// TLS of the replication link, from the same DATABASE_URL parameters as the SQL pool.
    pub tls: crate::tls::TlsSettings,
}

impl ConnParams {
    /// The replication link's parameters, from the same parsed DATABASE_URL
    /// as the SQL pool.
    pub fn from_config(db: &crate::config::DatabaseConfig) -> Result<Self, ReplicationError> {
        let cfg = &db.pg;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "localhost".into(),
        };
        let user = cfg
            .get_user()
            .ok_or_else(|| ReplicationError::Url("no user in the URL".into()))?
            .to_string();
        Ok(ConnParams {
            host,
            port: cfg.get_ports().first().copied().unwrap_or(5432),
            dbname: cfg.get_dbname().unwrap_or(&user).to_string(),
            password: cfg
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
            user,
            tls: db.tls.clone(),
        })
    }
}

/// The slot's stream, decoded into committed transactions.
pub struct Source {
    client: ReplicationClient,
    assembler: Assembler,
    /// The server's clock when it sent the latest message that carries it.
    server_time_micros: i64,
}

impl Source {
    /// Starts streaming from `start_lsn` (the stored checkpoint; the server starts
    /// at its `confirmed_flush_lsn` when that is later).
    pub async fn start(
        params: &ConnParams,
        slot: &str,
        publication: &str,
        start_lsn: u64,
        max_message: usize,
    ) -> Result<Self, ReplicationError> {
        let cfg = ReplicationConfig::new(
            params.host.clone(),
            params.user.clone(),
            params.password.clone(),
            params.dbname.clone(),
            slot.to_string(),
            publication.to_string(),
        )
        .with_port(params.port)
        .with_tls(params.tls.replication())
        .with_start_lsn(Lsn(start_lsn))
        // Acknowledged positions reach the server within a second; well under
        // any sane wal_sender_timeout (doctor checks it).
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_application_name("hubspot-sidecar")
        // One message is buffered whole: without a bound, a role that can emit
        // a logical message of any size could have the pod killed for memory,
        // again at every restart (SIDECAR_STREAM_MAX_MESSAGE_MB).
        .with_max_message_size(max_message)
        // Times in the stream render like those we read over SQL.
        .with_options("-c datestyle=ISO -c timezone=UTC");
        let client = ReplicationClient::connect(cfg).await?;
        Ok(Source {
            client,
            assembler: Assembler::default(),
            server_time_micros: 0,
        })
    }

    /// The next piece of a committed transaction, or an idle keepalive.
    /// Cancel-safe: the assembler keeps its place between calls.
    pub async fn next(&mut self) -> Result<Option<SourceEvent>, ReplicationError> {
        loop {
            let Some(ev) = self.client.recv().await? else {
                return Ok(None);
            };
            let msg = match ev {
                ReplicationEvent::KeepAlive {
                    wal_end,
                    server_time_micros,
                    ..
                } => {
                    self.server_time_micros = server_time_micros;
                    if !self.assembler.in_transaction() {
                        return Ok(Some(SourceEvent::Idle { wal_end: wal_end.0 }));
                    }
                    continue;
                }
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => Message::Begin(pgoutput::Begin {
                    final_lsn: final_lsn.0,
                    commit_time: commit_time_micros,
                    xid,
                }),
                ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                } => Message::Commit(pgoutput::Commit {
                    flags: 0,
                    commit_lsn: lsn.0,
                    end_lsn: end_lsn.0,
                    commit_time: commit_time_micros,
                }),
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => Message::LogicalMessage {
                    transactional,
                    lsn: lsn.0,
                    prefix,
                    content,
                },
                ReplicationEvent::XLogData {
                    data,
                    server_time_micros,
                    ..
                } => {
                    self.server_time_micros = server_time_micros;
                    pgoutput::decode(&data)?
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
            };
            if let Some(d) = self.assembler.push(msg)? {
                return Ok(Some(SourceEvent::Tx(d)));
            }
        }
    }

    /// How far behind the server the stream is reading: the server's clock
    /// when it sent the latest change or keepalive, minus `commit_time`. Both
    /// times are the server's, so a clock skew with this host does not count.
    /// Begin and Commit carry no server time (pgwire-replication parses them
    /// apart), so right after a quiet spell the estimate is low, never high.
    pub fn behind(&self, commit_time: DateTime<Utc>) -> Duration {
        (pg_time(self.server_time_micros) - commit_time)
            .to_std()
            .unwrap_or_default()
    }

    /// Everything up to `lsn` is durable on our side; the slot may release it.
    pub fn ack(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn(lsn));
    }

    pub async fn shutdown(mut self) {
        let _ = self.client.shutdown().await;
    }
}

pub fn lsn_to_string(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use pgoutput::RelationColumn;

    fn rel() -> Message {
        Message::Relation(Relation {
            id: 1,
            namespace: "public".into(),
            name: "members".into(),
            replica_identity: b'd',
            columns: ["id", "bio", "headline"]
                .iter()
                .map(|n| RelationColumn {
                    flags: u8::from(*n == "id"),
                    name: n.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    #[test]
    fn frames_a_transaction_and_keeps_toast_unchanged() {
        let mut a = Assembler::default();
        let begin = a
            .push(Message::Begin(pgoutput::Begin {
                final_lsn: 10,
                commit_time: 0,
                xid: 5,
            }))
            .unwrap();
        assert!(matches!(
            begin,
            Some(Decoded::Begin(TxMeta {
                xid: 5,
                commit_lsn: 10,
                ..
            }))
        ));
        assert!(a.push(rel()).unwrap().is_none());
        let item = a
            .push(Message::Update {
                relation_id: 1,
                old: None,
                new: Tuple(vec![
                    Value::Text(Bytes::from_static(b"42")),
                    Value::UnchangedToast,
                    Value::Text(Bytes::from_static(b"hi")),
                ]),
            })
            .unwrap();
        let end = a
            .push(Message::Commit(pgoutput::Commit {
                flags: 0,
                commit_lsn: 10,
                end_lsn: 20,
                commit_time: 0,
            }))
            .unwrap();
        assert!(matches!(end, Some(Decoded::Commit { end_lsn: 20 })));
        assert!(!a.in_transaction());
        let Some(Decoded::Item(TxItem::Change(c))) = &item else {
            panic!()
        };
        let new = c.new.as_ref().unwrap();
        assert_eq!(new.i64("id"), Some(42));
        assert_eq!(new.get("bio"), Field::Unchanged);
        assert_eq!(new.get("headline"), Field::Text("hi"));
        assert_eq!(new.get("nope"), Field::Absent);
    }

    #[test]
    fn change_before_relation_is_an_error() {
        let mut a = Assembler::default();
        a.push(Message::Begin(pgoutput::Begin {
            final_lsn: 1,
            commit_time: 0,
            xid: 1,
        }))
        .unwrap();
        let err = a
            .push(Message::Insert {
                relation_id: 9,
                new: Tuple(vec![]),
            })
            .unwrap_err();
        assert!(matches!(err, ReplicationError::UnknownRelation(9)));
    }

    #[test]
    fn lsn_text_roundtrip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(lsn_to_string(0x16_B374_D848), "16/B374D848");
    }
}
