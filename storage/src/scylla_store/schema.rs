//! The CQL schema: versioned files under `storage/cql/`, the keyspace's
//! replication, and [`migrate`], which brings a keyspace up to date.
//!
//! A keyspace records the versions applied to it in `schema_migrations`.
//! `qun serve --storage scylla` only checks that record and refuses to start
//! on a schema it does not match; `qun migrate` is the one thing that
//! changes a schema, so an operator decides when DDL runs on a cluster.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use scylla::client::session::Session;

use super::statements::id64;
use super::{exec_err, pager_err, prepare_err, row_err};
use crate::StorageError;
use crate::records::MessageRecord;

/// One versioned schema file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Applied in ascending order, each once.
    pub version: i32,
    /// Short name, recorded with the version.
    pub name: &'static str,
    /// The CQL, with `{ks}` for the keyspace.
    pub cql: &'static str,
}

/// Every schema version, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        cql: include_str!("../../cql/0001_initial.cql"),
    },
    Migration {
        version: 2,
        name: "reach",
        cql: include_str!("../../cql/0002_reach.cql"),
    },
    Migration {
        version: 3,
        name: "moderation",
        cql: include_str!("../../cql/0003_moderation.cql"),
    },
    Migration {
        version: 4,
        name: "faq",
        cql: include_str!("../../cql/0004_faq.cql"),
    },
    Migration {
        version: 5,
        name: "auto_replies",
        cql: include_str!("../../cql/0005_auto_replies.cql"),
    },
    Migration {
        version: 6,
        name: "join_requests",
        cql: include_str!("../../cql/0006_join_requests.cql"),
    },
    Migration {
        version: 7,
        name: "buyer_tags",
        cql: include_str!("../../cql/0007_buyer_tags.cql"),
    },
    Migration {
        version: 8,
        name: "schedules",
        cql: include_str!("../../cql/0008_schedules.cql"),
    },
    Migration {
        version: 9,
        name: "customer_service",
        cql: include_str!("../../cql/0009_customer_service.cql"),
    },
    Migration {
        version: 10,
        name: "replies",
        cql: include_str!("../../cql/0010_replies.cql"),
    },
];

/// The version that adds the reply index (`replies`), which `migrate`
/// fills from the messages of a keyspace made before it.
const REPLY_INDEX: i32 = 10;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = 10;

/// How the keyspace is replicated, as `qun migrate --replication` takes it.
///
/// - `simple:N`: `SimpleStrategy` with N copies, for one development node
///   (`simple:1`) or a single-datacenter test cluster.
/// - `DC:N[,DC:N…]`: `NetworkTopologyStrategy` with N copies in each named
///   datacenter, for production (use 3 per datacenter with `LOCAL_QUORUM`).
///
/// ```
/// use qun_storage::scylla_store::Replication;
/// let r: Replication = "eu-west:3,ap-east:3".parse().unwrap();
/// assert_eq!(
///     r.to_cql(),
///     "{'class': 'NetworkTopologyStrategy', 'eu-west': 3, 'ap-east': 3}"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` with this replication factor.
    Simple {
        /// Copies of each row.
        factor: u32,
    },
    /// `NetworkTopologyStrategy`: (datacenter, copies there).
    NetworkTopology {
        /// Per-datacenter factors, in the order given.
        factors: Vec<(String, u32)>,
    },
}

impl Replication {
    /// The CQL replication map.
    pub fn to_cql(&self) -> String {
        match self {
            Replication::Simple { factor } => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}")
            }
            Replication::NetworkTopology { factors } => {
                let mut s = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, n) in factors {
                    s.push_str(&format!(", '{dc}': {n}"));
                }
                s.push('}');
                s
            }
        }
    }
}

impl FromStr for Replication {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let factor = |n: &str| -> Result<u32, String> {
            match n.trim().parse::<u32>() {
                Ok(n) if (1..=9).contains(&n) => Ok(n),
                _ => Err(format!("replication factor {n:?} must be 1..=9")),
            }
        };
        let s = s.trim();
        if let Some(n) = s.strip_prefix("simple:") {
            return Ok(Replication::Simple { factor: factor(n)? });
        }
        let mut factors = Vec::new();
        for part in s.split(',') {
            let Some((dc, n)) = part.split_once(':') else {
                return Err(format!(
                    "replication {s:?}: expected simple:N or DC:N[,DC:N…], e.g. dc1:3"
                ));
            };
            let dc = dc.trim();
            let valid = !dc.is_empty()
                && dc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !valid {
                return Err(format!("datacenter name {dc:?} is not valid"));
            }
            factors.push((dc.to_string(), factor(n)?));
        }
        Ok(Replication::NetworkTopology { factors })
    }
}

impl fmt::Display for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Replication::Simple { factor } => write!(f, "simple:{factor}"),
            Replication::NetworkTopology { factors } => {
                let parts: Vec<String> = factors.iter().map(|(d, n)| format!("{d}:{n}")).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Checks a keyspace name: lowercase letters, digits and `_`, starting with
/// a letter, at most 48 characters (CQL folds unquoted names to lowercase;
/// refusing upper case avoids two spellings of one keyspace).
///
/// # Errors
/// [`StorageError::Schema`] saying what is wrong with the name.
pub fn check_keyspace_name(ks: &str) -> Result<(), StorageError> {
    let ok = (1..=48).contains(&ks.len())
        && ks.starts_with(|c: char| c.is_ascii_lowercase())
        && ks
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Schema(format!(
            "keyspace name {ks:?} must be 1-48 lowercase letters, digits or _, starting with a letter"
        )))
    }
}

/// The statements of a schema file for keyspace `ks`: comments removed,
/// split at `;`, `{ks}` replaced.
pub fn render(cql: &str, ks: &str) -> Vec<String> {
    let text: String = cql
        .lines()
        .map(|line| match line.find("--") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("{ks}", ks))
        .collect()
}

/// `CREATE KEYSPACE IF NOT EXISTS`.
pub fn create_keyspace(ks: &str, replication: &Replication) -> String {
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {} AND durable_writes = true",
        replication.to_cql()
    )
}

fn create_migrations_table(ks: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations \
         (version int PRIMARY KEY, name text, applied_at_ms bigint)"
    )
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// The version before.
    pub from: i32,
    /// The version after ([`SCHEMA_VERSION`]).
    pub to: i32,
    /// Versions applied now, ascending.
    pub applied: Vec<i32>,
}

/// The schema version recorded in keyspace `ks`; `None` when the keyspace
/// or its `schema_migrations` table does not exist.
///
/// # Errors
/// [`StorageError::Unavailable`], [`StorageError::Timeout`] or
/// [`StorageError::Backend`] when the cluster cannot be asked.
pub async fn schema_version(session: &Session, ks: &str) -> Result<Option<i32>, StorageError> {
    use futures_util::TryStreamExt as _;
    let tables: Vec<(String,)> = session
        .query_iter(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (ks,),
        )
        .await
        .map_err(|e| pager_err("read schema", e))?
        .rows_stream::<(String,)>()
        .map_err(|e| StorageError::backend("read schema", e))?
        .try_collect()
        .await
        .map_err(|e| row_err("read schema", e))?;
    if !tables.iter().any(|(t,)| t == "schema_migrations") {
        return Ok(None);
    }
    let versions: Vec<(i32,)> = session
        .query_iter(format!("SELECT version FROM {ks}.schema_migrations"), ())
        .await
        .map_err(|e| pager_err("read schema", e))?
        .rows_stream::<(i32,)>()
        .map_err(|e| StorageError::backend("read schema", e))?
        .try_collect()
        .await
        .map_err(|e| row_err("read schema", e))?;
    Ok(Some(versions.iter().map(|(v,)| *v).max().unwrap_or(0)))
}

/// Refuses a keyspace whose schema is not the one this build uses, saying
/// what to do.
///
/// # Errors
/// [`StorageError::Schema`] when the keyspace is missing, behind or ahead;
/// the errors of [`schema_version`].
pub async fn check(session: &Session, ks: &str) -> Result<(), StorageError> {
    match schema_version(session, ks).await? {
        Some(SCHEMA_VERSION) => Ok(()),
        None => Err(StorageError::Schema(format!(
            "keyspace {ks} has no Qun schema; create it with `qun migrate --storage scylla`"
        ))),
        Some(v) if v < SCHEMA_VERSION => Err(StorageError::Schema(format!(
            "keyspace {ks} is at schema version {v}, this server needs {SCHEMA_VERSION}; \
             run `qun migrate --storage scylla`"
        ))),
        Some(v) => Err(StorageError::Schema(format!(
            "keyspace {ks} is at schema version {v}, newer than this server's {SCHEMA_VERSION}; \
             upgrade the server"
        ))),
    }
}

/// Creates keyspace `ks` (when missing) with `replication`, then applies
/// every schema version it lacks, in order. Safe to run again: every
/// statement is `IF NOT EXISTS`, and a version is recorded only after all
/// its statements succeeded. An existing keyspace keeps its replication
/// (change it with `ALTER KEYSPACE`, then run a repair).
///
/// Run it from one place at a time; the driver waits for schema agreement
/// after each statement.
///
/// # Errors
/// [`StorageError::Schema`] for a bad keyspace name or a schema newer than
/// this build; cluster errors as for [`schema_version`].
pub async fn migrate(
    session: &Session,
    ks: &str,
    replication: &Replication,
) -> Result<MigrateReport, StorageError> {
    check_keyspace_name(ks)?;
    let ddl = |cql: String| async move {
        session
            .query_unpaged(cql, ())
            .await
            .map_err(|e| exec_err("migrate", e))
    };
    ddl(create_keyspace(ks, replication)).await?;
    let from = schema_version(session, ks).await?.unwrap_or(0);
    if from > SCHEMA_VERSION {
        return Err(StorageError::Schema(format!(
            "keyspace {ks} is at schema version {from}, newer than this build's {SCHEMA_VERSION}"
        )));
    }
    ddl(create_migrations_table(ks)).await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        for statement in render(m.cql, ks) {
            ddl(statement).await?;
        }
        if m.version == REPLY_INDEX && from > 0 {
            // A keyspace made before the index has replies it lacks. Filled
            // before the version is recorded: a migration cut short fills
            // it again (the rows are the same).
            index_replies(session, ks).await?;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_migrations (version, name, applied_at_ms) VALUES (?, ?, ?)"
                ),
                (m.version, m.name, now),
            )
            .await
            .map_err(|e| exec_err("migrate", e))?;
        tracing::info!(
            keyspace = ks,
            version = m.version,
            name = m.name,
            "schema version applied"
        );
        applied.push(m.version);
    }
    Ok(MigrateReport {
        from,
        to: SCHEMA_VERSION,
        applied,
    })
}

/// Writes the reply index entry (`replies`) of every reply in the
/// keyspace's `messages`, reading the whole table once, and returns how
/// many replies it indexed. Logs progress every million messages.
///
/// # Errors
/// [`StorageError::Corrupt`] when a message does not decode; cluster errors
/// as for [`schema_version`].
pub(crate) async fn index_replies(session: &Session, ks: &str) -> Result<u64, StorageError> {
    use futures_util::TryStreamExt as _;
    const OP: &str = "index replies";
    let insert = session
        .prepare(format!(
            "INSERT INTO {ks}.replies (group_id, quoted_seq, reply_seq) VALUES (?, ?, ?)"
        ))
        .await
        .map_err(|e| prepare_err(OP, e))?;
    tracing::info!(keyspace = ks, "indexing replies by the message they quote");
    let mut rows = session
        .query_iter(format!("SELECT record FROM {ks}.messages"), ())
        .await
        .map_err(|e| pager_err(OP, e))?
        .rows_stream::<(Vec<u8>,)>()
        .map_err(|e| StorageError::backend(OP, e))?;
    let (mut read, mut indexed) = (0u64, 0u64);
    while let Some((record,)) = rows.try_next().await.map_err(|e| row_err(OP, e))? {
        read += 1;
        if read.is_multiple_of(1_000_000) {
            tracing::info!(keyspace = ks, read, indexed, "indexing replies");
        }
        let m: MessageRecord = prost::Message::decode(&record[..])
            .map_err(|e| StorageError::corrupt("messages", e.to_string()))?;
        if m.reply_to == 0 {
            continue;
        }
        let values = (
            id64("group id", m.group_id)?,
            id64("seq", m.reply_to)?,
            id64("seq", m.seq)?,
        );
        session
            .execute_unpaged(&insert, values)
            .await
            .map_err(|e| exec_err(OP, e))?;
        indexed += 1;
    }
    tracing::info!(keyspace = ks, read, indexed, "replies indexed");
    Ok(indexed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scylla_store::statements::Write;

    #[test]
    fn replication_parses_and_renders() {
        assert_eq!(
            "simple:1".parse::<Replication>().unwrap().to_cql(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        let r: Replication = "dc1:3, dc2:2".parse().unwrap();
        assert_eq!(
            r,
            Replication::NetworkTopology {
                factors: vec![("dc1".into(), 3), ("dc2".into(), 2)]
            }
        );
        assert_eq!(r.to_string(), "dc1:3,dc2:2");
        for bad in [
            "", "simple:0", "simple:x", "dc1", "dc1:3,:2", "dc'1:3", "dc1:10",
        ] {
            assert!(bad.parse::<Replication>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn keyspace_names() {
        for ok in ["qun", "qun_test_1", "a"] {
            check_keyspace_name(ok).unwrap();
        }
        for bad in ["", "Qun", "1qun", "qun-x", "qun;drop", &"q".repeat(49)] {
            assert!(check_keyspace_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_schema_renders_into_idempotent_statements_for_every_table_written() {
        let statements: Vec<String> = MIGRATIONS
            .iter()
            .flat_map(|m| render(m.cql, "qun_x"))
            .collect();
        assert!(statements.len() >= 10, "{statements:#?}");
        for s in &statements {
            assert!(s.starts_with("CREATE TABLE IF NOT EXISTS qun_x."), "{s}");
            assert!(!s.contains("{ks}") && !s.contains("--"), "{s}");
        }
        for w in Write::ALL {
            let table = format!("qun_x.{} (", w.table());
            assert!(
                statements.iter().any(|s| s.contains(&table)),
                "no table for {w:?}"
            );
        }
        // Cassandra 4 compatibility: no ScyllaDB-only options.
        for s in &statements {
            for scylla_only in [
                "tablets",
                "IncrementalCompaction",
                "cdc",
                "synchronous_updates",
            ] {
                assert!(!s.contains(scylla_only), "{s}");
            }
        }
    }

    #[test]
    fn versions_ascend_and_end_at_the_current_one() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(versions.last(), Some(&SCHEMA_VERSION));
    }

    #[test]
    fn keyspace_ddl() {
        assert_eq!(
            create_keyspace("qun", &Replication::Simple { factor: 1 }),
            "CREATE KEYSPACE IF NOT EXISTS qun WITH replication = \
             {'class': 'SimpleStrategy', 'replication_factor': 1} AND durable_writes = true"
        );
    }
}
