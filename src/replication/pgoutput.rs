//! Decoder for the pgoutput logical replication protocol (version 1).
//!
//! Written by hand because pgwire-replication deliberately forwards Relation,
//! Insert, Update, Delete, Truncate, Type and Origin messages as raw bytes, and
//! no maintained crate decodes pgoutput independently of a particular client.
//! Every read is bounds-checked: arbitrary input yields a typed error, never a
//! panic (see the property tests below, which CI runs on every build).

use std::fmt;

use bytes::Bytes;

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
// `LogicalMessage` is pgoutput's own name for the 'M' message.
#[allow(clippy::enum_variant_names)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: Tuple,
    },
    Update {
        relation_id: u32,
        /// The old key ('K') or full old row ('O'), when the replica identity sends one.
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation_id: u32,
        old: OldTuple,
    },
    Truncate {
        options: u8,
        relation_ids: Vec<u32>,
    },
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: u64,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: u64,
    pub end_lsn: u64,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Which old image an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity key columns ('K').
    Key,
    /// The whole old row ('O'), REPLICA IDENTITY FULL.
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OldTuple {
    pub kind: OldKind,
    pub tuple: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value that the server did not send ('u'). It means
    /// "same as before", never NULL.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tuple(pub Vec<Value>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput: message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("pgoutput: empty message")]
    Empty,
    #[error("pgoutput: unknown message type {0:#04x}")]
    UnknownMessage(u8),
    #[error("pgoutput: unknown tuple value kind {0:#04x}")]
    UnknownValueKind(u8),
    #[error("pgoutput: unexpected tuple marker {0:#04x} in {1}")]
    UnexpectedMarker(u8, &'static str),
    #[error("pgoutput: {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("pgoutput: negative length {0}")]
    NegativeLength(i32),
    #[error("pgoutput: {0} trailing bytes after message")]
    TrailingBytes(usize),
}

/// Decode one pgoutput message (the payload of an XLogData frame).
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8("message type").map_err(|_| DecodeError::Empty)?;
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.u64("begin lsn")?,
            commit_time: r.i64("begin time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("commit end lsn")?,
            commit_time: r.i64("commit time")?,
        }),
        b'O' => Message::Origin {
            commit_lsn: r.u64("origin lsn")?,
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let n = usize::try_from(n).map_err(|_| DecodeError::NegativeLength(n.into()))?;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                columns.push(RelationColumn {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("type modifier")?,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            id: r.u32("type id")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation_id = r.u32("relation id")?;
            r.expect(b'N', "insert")?;
            Message::Insert {
                relation_id,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let mut old = None;
            let mut marker = r.u8("update marker")?;
            if marker == b'K' || marker == b'O' {
                let kind = if marker == b'K' {
                    OldKind::Key
                } else {
                    OldKind::Full
                };
                old = Some(OldTuple {
                    kind,
                    tuple: r.tuple()?,
                });
                marker = r.u8("update new marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker(marker, "update"));
            }
            Message::Update {
                relation_id,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let kind = match r.u8("delete marker")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                other => return Err(DecodeError::UnexpectedMarker(other, "delete")),
            };
            Message::Delete {
                relation_id,
                old: OldTuple {
                    kind,
                    tuple: r.tuple()?,
                },
            }
        }
        b'T' => {
            let n = r.u32("truncate count")? as usize;
            let options = r.u8("truncate options")?;
            // Each id takes 4 bytes: refuse counts the buffer cannot hold before allocating.
            if n > r.remaining() / 4 {
                return Err(DecodeError::Truncated("truncate relation ids"));
            }
            let mut relation_ids = Vec::with_capacity(n);
            for _ in 0..n {
                relation_ids.push(r.u32("truncate relation id")?);
            }
            Message::Truncate {
                options,
                relation_ids,
            }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.u64("message lsn")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.i32("message length")?;
            let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength(len))?;
            let content = Bytes::copy_from_slice(r.take(len, "message content")?);
            Message::LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            }
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingBytes(r.remaining()));
    }
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::InvalidUtf8(what))?;
        self.pos += end + 1;
        Ok(s.to_owned())
    }

    fn expect(&mut self, marker: u8, ctx: &'static str) -> Result<(), DecodeError> {
        let got = self.u8("tuple marker")?;
        if got == marker {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedMarker(got, ctx))
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("tuple column count")?;
        let n = usize::try_from(n).map_err(|_| DecodeError::NegativeLength(n.into()))?;
        let mut values = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let v = match self.u8("tuple value kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("value length")?;
                    let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength(len))?;
                    let bytes = Bytes::copy_from_slice(self.take(len, "value bytes")?);
                    if kind == b't' {
                        Value::Text(bytes)
                    } else {
                        Value::Binary(bytes)
                    }
                }
                other => return Err(DecodeError::UnknownValueKind(other)),
            };
            values.push(v);
        }
        Ok(Tuple(values))
    }
}

impl fmt::Display for OldKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OldKind::Key => "key",
            OldKind::Full => "full",
        })
    }
}

/// Encoders used by tests to build well-formed messages.
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    pub fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    pub fn tuple(out: &mut Vec<u8>, t: &Tuple) {
        out.extend_from_slice(&(t.0.len() as i16).to_be_bytes());
        for v in &t.0 {
            match v {
                Value::Null => out.push(b'n'),
                Value::UnchangedToast => out.push(b'u'),
                Value::Text(b) | Value::Binary(b) => {
                    out.push(if matches!(v, Value::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    pub fn message(m: &Message) -> Vec<u8> {
        let mut o = Vec::new();
        match m {
            Message::Begin(b) => {
                o.push(b'B');
                o.extend_from_slice(&b.final_lsn.to_be_bytes());
                o.extend_from_slice(&b.commit_time.to_be_bytes());
                o.extend_from_slice(&b.xid.to_be_bytes());
            }
            Message::Commit(c) => {
                o.push(b'C');
                o.push(c.flags);
                o.extend_from_slice(&c.commit_lsn.to_be_bytes());
                o.extend_from_slice(&c.end_lsn.to_be_bytes());
                o.extend_from_slice(&c.commit_time.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                o.push(b'O');
                o.extend_from_slice(&commit_lsn.to_be_bytes());
                cstr(&mut o, name);
            }
            Message::Relation(r) => {
                o.push(b'R');
                o.extend_from_slice(&r.id.to_be_bytes());
                cstr(&mut o, &r.namespace);
                cstr(&mut o, &r.name);
                o.push(r.replica_identity);
                o.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
                for c in &r.columns {
                    o.push(c.flags);
                    cstr(&mut o, &c.name);
                    o.extend_from_slice(&c.type_oid.to_be_bytes());
                    o.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                id,
                namespace,
                name,
            } => {
                o.push(b'Y');
                o.extend_from_slice(&id.to_be_bytes());
                cstr(&mut o, namespace);
                cstr(&mut o, name);
            }
            Message::Insert { relation_id, new } => {
                o.push(b'I');
                o.extend_from_slice(&relation_id.to_be_bytes());
                o.push(b'N');
                tuple(&mut o, new);
            }
            Message::Update {
                relation_id,
                old,
                new,
            } => {
                o.push(b'U');
                o.extend_from_slice(&relation_id.to_be_bytes());
                if let Some(old) = old {
                    o.push(if old.kind == OldKind::Key { b'K' } else { b'O' });
                    tuple(&mut o, &old.tuple);
                }
                o.push(b'N');
                tuple(&mut o, new);
            }
            Message::Delete { relation_id, old } => {
                o.push(b'D');
                o.extend_from_slice(&relation_id.to_be_bytes());
                o.push(if old.kind == OldKind::Key { b'K' } else { b'O' });
                tuple(&mut o, &old.tuple);
            }
            Message::Truncate {
                options,
                relation_ids,
            } => {
                o.push(b'T');
                o.extend_from_slice(&(relation_ids.len() as u32).to_be_bytes());
                o.push(*options);
                for id in relation_ids {
                    o.extend_from_slice(&id.to_be_bytes());
                }
            }
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                o.push(b'M');
                o.push(u8::from(*transactional));
                o.extend_from_slice(&lsn.to_be_bytes());
                cstr(&mut o, prefix);
                o.extend_from_slice(&(content.len() as i32).to_be_bytes());
                o.extend_from_slice(content);
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = super::Value> {
        prop_oneof![
            Just(super::Value::Null),
            Just(super::Value::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|v| super::Value::Text(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|v| super::Value::Binary(Bytes::from(v))),
        ]
    }

    fn tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(value(), 0..12).prop_map(Tuple)
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z_][a-z0-9_]{0,20}"
    }

    fn message() -> impl Strategy<Value = Message> {
        fn old() -> impl Strategy<Value = OldTuple> {
            (
                prop_oneof![Just(OldKind::Key), Just(OldKind::Full)],
                tuple(),
            )
                .prop_map(|(kind, tuple)| OldTuple { kind, tuple })
        }
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                Message::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time
                })
            ),
            (any::<u64>(), name())
                .prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            (
                any::<u32>(),
                name(),
                name(),
                any::<u8>(),
                proptest::collection::vec((any::<u8>(), name(), any::<u32>(), any::<i32>()), 0..10)
            )
                .prop_map(|(id, namespace, name, replica_identity, cols)| {
                    Message::Relation(Relation {
                        id,
                        namespace,
                        name,
                        replica_identity,
                        columns: cols
                            .into_iter()
                            .map(|(flags, name, type_oid, type_modifier)| RelationColumn {
                                flags,
                                name,
                                type_oid,
                                type_modifier,
                            })
                            .collect(),
                    })
                }),
            (any::<u32>(), name(), name()).prop_map(|(id, namespace, name)| Message::Type {
                id,
                namespace,
                name
            }),
            (any::<u32>(), tuple())
                .prop_map(|(relation_id, new)| Message::Insert { relation_id, new }),
            (any::<u32>(), proptest::option::of(old()), tuple()).prop_map(
                |(relation_id, old, new)| Message::Update {
                    relation_id,
                    old,
                    new
                }
            ),
            (any::<u32>(), old())
                .prop_map(|(relation_id, old)| Message::Delete { relation_id, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..8)).prop_map(
                |(options, relation_ids)| Message::Truncate {
                    options,
                    relation_ids
                }
            ),
            (
                any::<bool>(),
                any::<u64>(),
                name(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(transactional, lsn, prefix, content)| {
                    Message::LogicalMessage {
                        transactional,
                        lsn,
                        prefix,
                        content: Bytes::from(content),
                    }
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic: they decode or give a typed error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        /// Well-formed messages with a valid type byte but mutated tails never panic either.
        #[test]
        fn mutated_messages_never_panic(m in message(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
            let mut bytes = encode::message(&m);
            let cut = cut % (bytes.len() + 1);
            let _ = decode(&bytes[..cut]);
            if !bytes.is_empty() {
                let i = flip.0 % bytes.len();
                bytes[i] ^= flip.1;
                let _ = decode(&bytes);
            }
        }

        /// Everything the encoder writes decodes back to the same message.
        #[test]
        fn roundtrip(m in message()) {
            let bytes = encode::message(&m);
            prop_assert_eq!(decode(&bytes), Ok(m.clone()));
            // A strict prefix is always a truncation error, never a different message.
            if bytes.len() > 1 {
                prop_assert!(decode(&bytes[..bytes.len() - 1]).is_err());
            }
        }
    }

    #[test]
    fn unchanged_toast_is_not_null() {
        let m = Message::Update {
            relation_id: 7,
            old: None,
            new: Tuple(vec![
                Value::Text(Bytes::from_static(b"1")),
                Value::UnchangedToast,
                Value::Null,
            ]),
        };
        let decoded = decode(&encode::message(&m)).expect("decodes");
        let Message::Update { new, .. } = decoded else {
            panic!("not an update")
        };
        assert_eq!(new.0[1], Value::UnchangedToast);
        assert_eq!(new.0[2], Value::Null);
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let mut b = vec![b'T'];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b.push(0);
        assert_eq!(
            decode(&b),
            Err(DecodeError::Truncated("truncate relation ids"))
        );
    }
}
