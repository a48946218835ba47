//! The bidirectional ID registry's pure parts: key names, record JSON in the host app's
//! format, and reading a field back out of a stored record.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::codec::write_json_str;

#[cfg(feature = "python")]
pub mod py;

/// Bulk operations split inputs into chunks of this many keys (one round trip each).
pub const CHUNK: usize = 10_000;

/// The registry's three kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `validated:{src}` → dst
    Validated,
    /// `reverse:{dst}` → src
    Reverse,
    /// `missing:{src}` → reason
    Missing,
}

/// How records are written. Both are read whatever is chosen, so a deployment can mix
/// processes writing either (a record is told apart by its first byte).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RecordFormat {
    /// A JSON object (the wire format other languages read).
    #[default]
    Json,
    /// A pickled plain dict, as host apps that `pickle.dumps` their records store them.
    /// Written and read in Rust as data only: no Python object is ever unpickled, so a
    /// record cannot run code.
    Pickle,
}

/// How the registry names its keys, below the cache namespace.
#[derive(Debug, Clone)]
pub struct Layout {
    pub name: String,
    pub source_field: String,
    pub target_field: String,
    pub format: RecordFormat,
}

impl Layout {
    pub fn key(&self, table: Table, id: &str) -> String {
        match table {
            Table::Validated => self.validated_key(id),
            Table::Reverse => self.reverse_key(id),
            Table::Missing => self.missing_key(id),
        }
    }

    pub fn validated_key(&self, src: &str) -> String {
        format!("{}:validated:{src}", self.name)
    }

    pub fn reverse_key(&self, dst: &str) -> String {
        format!("{}:reverse:{dst}", self.name)
    }

    pub fn missing_key(&self, src: &str) -> String {
        format!("{}:missing:{src}", self.name)
    }

    /// `{source_field: src, target_field: dst, "validated_at": at}`, stored under both
    /// `validated:{src}` and `reverse:{dst}`, in the layout's format.
    pub fn validated_record(&self, src: &str, dst: &str, at: &str) -> Vec<u8> {
        match self.format {
            RecordFormat::Json => self.validated_json(src, dst, at).into_bytes(),
            RecordFormat::Pickle => pickled(&[
                (&self.source_field, src),
                (&self.target_field, dst),
                ("validated_at", at),
            ]),
        }
    }

    /// `{source_field: src, "marked_at": at, "reason": reason}`, in the layout's format.
    pub fn missing_record(&self, src: &str, at: &str, reason: &str) -> Vec<u8> {
        match self.format {
            RecordFormat::Json => self.missing_json(src, at, reason).into_bytes(),
            RecordFormat::Pickle => pickled(&[
                (&self.source_field, src),
                ("marked_at", at),
                ("reason", reason),
            ]),
        }
    }

    fn validated_json(&self, src: &str, dst: &str, at: &str) -> String {
        let mut out = String::with_capacity(96 + src.len() + dst.len());
        out.push('{');
        push_field(&mut out, &self.source_field, src);
        out.push(',');
        push_field(&mut out, &self.target_field, dst);
        out.push(',');
        push_field(&mut out, "validated_at", at);
        out.push('}');
        out
    }

    fn missing_json(&self, src: &str, at: &str, reason: &str) -> String {
        let mut out = String::with_capacity(96 + src.len() + reason.len());
        out.push('{');
        push_field(&mut out, &self.source_field, src);
        out.push(',');
        push_field(&mut out, "marked_at", at);
        out.push(',');
        push_field(&mut out, "reason", reason);
        out.push('}');
        out
    }
}

/// A record a re-mapping left behind: `(table, id)` is removed only while its record still
/// names `names` in `field` (another writer may have reused it meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    pub table: Table,
    pub id: String,
    pub field: String,
    pub names: String,
}

impl Layout {
    /// The other half of an old pair a write replaced. Writing `validated:s → d2` over
    /// `validated:s → d1` leaves `reverse:d1 → s`; writing `reverse:d → s2` over
    /// `reverse:d → s1` leaves `validated:s1 → d`. `previous` is what the write replaced.
    pub fn superseded(
        &self,
        table: Table,
        id: &str,
        names: &str,
        previous: &str,
    ) -> Option<Superseded> {
        let (other, field) = match table {
            Table::Validated => (Table::Reverse, &self.source_field),
            Table::Reverse => (Table::Validated, &self.target_field),
            Table::Missing => return None,
        };
        (previous != names).then(|| Superseded {
            table: other,
            id: previous.to_owned(),
            field: field.clone(),
            names: id.to_owned(),
        })
    }

    /// The ID a stored record of `table` names (its target for validated records, its
    /// source for reverse ones), if it is readable.
    pub fn names_in(&self, table: Table, record: &[u8]) -> Option<String> {
        let field = match table {
            Table::Validated => &self.target_field,
            Table::Reverse => &self.source_field,
            Table::Missing => return None,
        };
        match field_of(record, field) {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A plain dict of strings, pickled (protocol 3: every Python 3 reads it).
fn pickled(fields: &[(&str, &str)]) -> Vec<u8> {
    let dict = fields
        .iter()
        .map(|(k, v)| {
            (
                serde_pickle::HashableValue::String((*k).to_owned()),
                serde_pickle::Value::String((*v).to_owned()),
            )
        })
        .collect();
    serde_pickle::value_to_vec(
        &serde_pickle::Value::Dict(dict),
        serde_pickle::SerOptions::new(),
    )
    .unwrap_or_default()
}

fn push_field(out: &mut String, name: &str, value: &str) {
    write_json_str(out, name, false);
    out.push(':');
    write_json_str(out, value, false);
}

/// One record kept in process memory: the ID (or reason) it names, already extracted.
#[derive(Debug, Clone)]
pub struct MemoryRecord {
    pub names: Arc<str>,
    pub expires_at: i64,
}

type RecordTable = HashMap<String, MemoryRecord, foldhash::fast::RandomState>;

/// The registry's records when there is no Redis (or it is down): three hash maps behind
/// one lock, taken once per bulk operation. A bulk check of 1,000 IDs is then 1,000
/// hash lookups; moka, with its per-read bookkeeping, cost about 3× that.
/// Bounded: when full, expired records go first, then arbitrary ones (the upstream is
/// the source of truth; a forgotten mapping is fetched again).
pub struct MemoryRecords {
    tables: RwLock<[RecordTable; 3]>,
    max_entries: usize,
}

fn slot(table: Table) -> usize {
    match table {
        Table::Validated => 0,
        Table::Reverse => 1,
        Table::Missing => 2,
    }
}

impl MemoryRecords {
    pub fn new(max_entries: usize) -> Self {
        Self {
            tables: RwLock::new(Default::default()),
            max_entries: max_entries.max(1),
        }
    }

    /// What each `(table, id)` names, if recorded and not expired at `now`.
    pub fn get_many(&self, wanted: &[(Table, &str)], now: i64) -> Vec<Option<Arc<str>>> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        wanted
            .iter()
            .map(|(table, id)| {
                tables[slot(*table)]
                    .get(*id)
                    .filter(|r| r.expires_at >= now)
                    .map(|r| Arc::clone(&r.names))
            })
            .collect()
    }

    /// Applies deletes, then sets; a set that re-maps an ID also drops the other half of
    /// the pair it replaced (see `Layout::superseded`), as the Redis write does.
    pub fn write(
        &self,
        sets: Vec<(Table, String, MemoryRecord)>,
        deletes: &[(Table, String)],
        now: i64,
    ) {
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        for (table, id) in deletes {
            tables[slot(*table)].remove(id);
        }
        for (table, id, record) in &sets {
            let other = match table {
                Table::Validated => Table::Reverse,
                Table::Reverse => Table::Validated,
                Table::Missing => continue,
            };
            let Some(previous) = tables[slot(*table)].get(id).map(|r| Arc::clone(&r.names)) else {
                continue;
            };
            let stale = *previous != *record.names
                && tables[slot(other)]
                    .get(&*previous)
                    .is_some_and(|r| *r.names == **id);
            if stale {
                tables[slot(other)].remove(&*previous);
            }
        }
        let incoming = sets.len();
        let len: usize = tables.iter().map(|t| t.len()).sum();
        if len + incoming > self.max_entries {
            for table in tables.iter_mut() {
                table.retain(|_, r| r.expires_at >= now);
            }
            let mut excess = (tables.iter().map(|t| t.len()).sum::<usize>() + incoming)
                .saturating_sub(self.max_entries * 9 / 10);
            for table in tables.iter_mut() {
                let doomed: Vec<String> = table.keys().take(excess).cloned().collect();
                excess -= doomed.len();
                for id in doomed {
                    table.remove(&id);
                }
            }
        }
        for (table, id, record) in sets {
            tables[slot(table)].insert(id, record);
        }
    }

    pub fn len(&self) -> usize {
        self.tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|t| t.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a stored record says about one field.
#[derive(Debug, PartialEq, Eq)]
pub enum Field {
    Str(String),
    /// The record is fine but the field is absent or not a string.
    Absent,
    /// Not a JSON object at all: read as unknown, counted as an error.
    Corrupt,
}

pub fn field_of(record: &[u8], field: &str) -> Field {
    // Pickle protocol 2+ starts with the PROTO opcode; JSON never does.
    if record.first() == Some(&0x80) {
        return pickled_field(record, field);
    }
    match serde_json::from_slice::<Value>(record) {
        Ok(Value::Object(map)) => match map.get(field) {
            Some(Value::String(s)) => Field::Str(s.clone()),
            _ => Field::Absent,
        },
        _ => Field::Corrupt,
    }
}

/// A field of a pickled dict, read as data: globals (classes, functions) are refused, so
/// nothing a record holds can run.
fn pickled_field(record: &[u8], field: &str) -> Field {
    use serde_pickle::{HashableValue, Value as Pickled};
    match serde_pickle::value_from_slice(record, serde_pickle::DeOptions::new()) {
        Ok(Pickled::Dict(map)) => match map.get(&HashableValue::String(field.to_owned())) {
            Some(Pickled::String(s)) => Field::Str(s.clone()),
            _ => Field::Absent,
        },
        _ => Field::Corrupt,
    }
}

/// `datetime.fromtimestamp(secs, timezone.utc).isoformat()` for whole seconds, e.g.
/// `2026-11-21T11:40:37+00:00`.
pub fn iso8601_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            name: "reccobeat".into(),
            source_field: "spotify_id".into(),
            target_field: "reccobeat_id".into(),
            format: RecordFormat::Json,
        }
    }

    #[test]
    fn pickled_records_both_ways() {
        let l = Layout {
            format: RecordFormat::Pickle,
            ..layout()
        };
        let rec = l.validated_record("s1", "r1", "2026-01-01T00:00:00.123456+00:00");
        assert_eq!(rec[0], 0x80, "a pickle");
        assert_eq!(field_of(&rec, "reccobeat_id"), Field::Str("r1".into()));
        assert_eq!(field_of(&rec, "spotify_id"), Field::Str("s1".into()));
        // pickle.dumps({"spotify_id": "s", "reccobeat_id": "r"}, protocol=4)
        let host: &[u8] = b"\x80\x04\x95)\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\nspotify_id\x94\x8c\x01s\x94\x8c\x0creccobeat_id\x94\x8c\x01r\x94u.";
        assert_eq!(field_of(host, "reccobeat_id"), Field::Str("r".into()));
        // pickle.dumps(os.system) names a global: refused, never resolved.
        let global: &[u8] = b"\x80\x04\x95\x14\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.";
        assert_eq!(field_of(global, "x"), Field::Corrupt);
        assert_eq!(field_of(b"\x80\x04garbage", "x"), Field::Corrupt);
    }

    #[test]
    fn keys_and_records_in_the_host_format() {
        let l = layout();
        assert_eq!(l.validated_key("s1"), "reccobeat:validated:s1");
        assert_eq!(l.reverse_key("r1"), "reccobeat:reverse:r1");
        assert_eq!(l.missing_key("s1"), "reccobeat:missing:s1");
        let rec = l.validated_record("s1", "r\"1", "2026-01-01T00:00:00+00:00");
        assert_eq!(
            rec,
            br#"{"spotify_id":"s1","reccobeat_id":"r\"1","validated_at":"2026-01-01T00:00:00+00:00"}"#
        );
        assert_eq!(field_of(&rec, "reccobeat_id"), Field::Str("r\"1".into()));
        assert_eq!(field_of(&rec, "nope"), Field::Absent);
        assert_eq!(field_of(b"[1]", "x"), Field::Corrupt);
        assert_eq!(field_of(b"\xff", "x"), Field::Corrupt);
        let missing = l.missing_record("s1", "t", "not found");
        assert_eq!(
            missing,
            br#"{"spotify_id":"s1","marked_at":"t","reason":"not found"}"#
        );
    }

    #[test]
    fn memory_records_expire_and_stay_bounded() {
        let store = MemoryRecords::new(100);
        let rec = |names: &str, expires_at| MemoryRecord {
            names: Arc::from(names),
            expires_at,
        };
        store.write(vec![(Table::Validated, "s1".into(), rec("r1", 10))], &[], 0);
        store.write(vec![(Table::Missing, "s2".into(), rec("gone", 5))], &[], 0);
        let wanted = [
            (Table::Validated, "s1"),
            (Table::Missing, "s2"),
            (Table::Reverse, "r1"),
        ];
        let got = store.get_many(&wanted, 5);
        assert_eq!(got[0].as_deref(), Some("r1"));
        assert_eq!(got[1].as_deref(), Some("gone"), "expiry is inclusive");
        assert_eq!(got[2], None);
        assert_eq!(store.get_many(&wanted, 6)[1], None, "expired");
        store.write(Vec::new(), &[(Table::Validated, "s1".into())], 6);
        assert_eq!(store.get_many(&wanted, 6)[0], None, "deleted");
        let many = (0..500)
            .map(|i| (Table::Missing, format!("m{i}"), rec("x", 100)))
            .collect();
        store.write(many, &[], 6);
        assert!(store.len() <= 100 + 500 && !store.is_empty());
        store.write(vec![(Table::Missing, "last".into(), rec("x", 100))], &[], 6);
        assert!(store.len() <= 100, "bounded: {}", store.len());
        assert!(
            store.get_many(&[(Table::Missing, "last")], 6)[0].is_some(),
            "the newest stays"
        );
    }

    #[test]
    fn remapping_drops_the_superseded_half_in_memory() {
        let store = MemoryRecords::new(100);
        let pair = |src: &str, dst: &str| {
            let rec = |names: &str| MemoryRecord {
                names: Arc::from(names),
                expires_at: 100,
            };
            vec![
                (Table::Validated, src.to_owned(), rec(dst)),
                (Table::Reverse, dst.to_owned(), rec(src)),
            ]
        };
        store.write(pair("s", "d1"), &[], 0);
        store.write(pair("s", "d2"), &[], 0);
        let got = store.get_many(&[(Table::Reverse, "d1"), (Table::Reverse, "d2")], 0);
        assert_eq!(got[0], None, "reverse:d1 no longer names s");
        assert_eq!(got[1].as_deref(), Some("s"));
        // d2 taken over by another source: validated:s no longer points at it.
        store.write(pair("t", "d2"), &[], 0);
        let got = store.get_many(&[(Table::Validated, "s"), (Table::Validated, "t")], 0);
        assert_eq!(got[0], None);
        assert_eq!(got[1].as_deref(), Some("d2"));
    }

    #[test]
    fn superseded_names_the_other_half_of_the_old_pair() {
        let layout = layout();
        assert_eq!(
            layout.superseded(Table::Validated, "s", "d2", "d1"),
            Some(Superseded {
                table: Table::Reverse,
                id: "d1".into(),
                field: "spotify_id".into(),
                names: "s".into(),
            })
        );
        assert_eq!(layout.superseded(Table::Validated, "s", "d1", "d1"), None);
        assert_eq!(
            layout
                .superseded(Table::Reverse, "d", "s2", "s1")
                .map(|s| (s.table, s.id, s.field)),
            Some((Table::Validated, "s1".into(), "reccobeat_id".into()))
        );
        let record = layout.validated_record("s", "d", "now");
        assert_eq!(
            layout.names_in(Table::Validated, &record).as_deref(),
            Some("d")
        );
        assert_eq!(
            layout.names_in(Table::Reverse, &record).as_deref(),
            Some("s")
        );
        assert_eq!(layout.names_in(Table::Validated, b"not json"), None);
    }

    #[test]
    fn iso8601_matches_python() {
        // datetime.fromtimestamp(t, timezone.utc).isoformat() for these t:
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(iso8601_utc(951_782_400), "2000-02-29T00:00:00+00:00");
        assert_eq!(iso8601_utc(1_700_000_000), "2023-11-14T22:13:20+00:00");
        assert_eq!(iso8601_utc(4_102_444_799), "2099-12-31T23:59:59+00:00");
        assert_eq!(iso8601_utc(-1), "1969-12-31T23:59:59+00:00");
    }
}
