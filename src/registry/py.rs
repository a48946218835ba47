//! `IdRegistryCore`: the registry's storage operations over a cache's stores, each bulk
//! operation one round trip (one MGET or one pipeline per 10,000 keys). The `resolve`
//! workflow is the Python subclass `tenuto.IdRegistry`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySet, PyString, PyTuple};

use super::{
    field_of, iso8601_utc, Field, Layout, MemoryRecord, MemoryRecords, RecordFormat, Table, CHUNK,
};
use crate::cache::py::{CacheBinding, PyCache};
use crate::cache::redis::{RedisStore, StoreError};
use crate::runtime::{self, py::spawn_for_asyncio, py::Ready};

/// A record as read: JSON bytes from Redis, or (from memory) the ID it names.
enum Raw {
    Bytes(Vec<u8>),
    Names(Arc<str>),
}

type Reads = Vec<Option<Raw>>;

/// What an operation reads: `(table, id)` pairs.
type Wanted = Vec<(Table, String)>;

/// One record to write: where, the ID (or reason) it names, its JSON, its TTL.
struct RecordWrite {
    table: Table,
    id: String,
    names: String,
    record: Vec<u8>,
    ttl: u64,
}

/// A SET as Redis gets it: key, value, TTL in seconds.
type WireSet = (String, Vec<u8>, u64);

#[derive(Default)]
struct Writes {
    sets: Vec<RecordWrite>,
    deletes: Vec<(Table, String)>,
}

#[derive(Default)]
struct Counters {
    validated: AtomicU64,
    missing: AtomicU64,
    unknown: AtomicU64,
    marked_validated: AtomicU64,
    marked_missing: AtomicU64,
    fetches: AtomicU64,
    ids_fetched: AtomicU64,
    errors: AtomicU64,
}

fn bump(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

fn read_counter(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

struct Registry {
    cache: Arc<CacheBinding>,
    layout: Layout,
    validated_ttl: u64,
    missing_ttl: u64,
    /// Where records live without Redis (or while it is down).
    memory: MemoryRecords,
    counters: Counters,
    /// Redis refused a write (full, read-only): records it has not got are looked for in
    /// memory, where the refused writes were kept.
    writes_refused: std::sync::atomic::AtomicBool,
}

/// IDs must be non-empty str; checked before anything is read or written.
fn id_of<'a>(what: &str, obj: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    let s = obj
        .cast::<PyString>()
        .map_err(|_| {
            PyTypeError::new_err(format!("{what} IDs must be str, not {}", type_name(obj)))
        })?
        .to_str()?;
    if s.is_empty() {
        return Err(PyValueError::new_err(format!(
            "{what} IDs must not be empty"
        )));
    }
    Ok(s)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}

/// IDs as given: their text for keys, and the str objects themselves for the answers
/// (handing the caller's own str back is cheaper than making new ones).
struct Ids {
    text: Vec<String>,
    objects: Vec<Py<PyString>>,
}

impl std::ops::Deref for Ids {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.text
    }
}

fn ids_of(what: &str, ids: &Bound<'_, PyAny>) -> PyResult<Ids> {
    if ids.cast::<PyString>().is_ok() {
        return Err(PyTypeError::new_err(format!(
            "expected an iterable of {what} IDs, not a single str"
        )));
    }
    let (mut text, mut objects) = (Vec::new(), Vec::new());
    for id in ids.try_iter()? {
        let id = id?;
        text.push(id_of(what, &id)?.to_owned());
        objects.push(id.cast_into::<PyString>()?.unbind());
    }
    Ok(Ids { text, objects })
}

fn pairs_of(pairs: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
    let items = match pairs.cast::<PyDict>() {
        Ok(d) => d.items().into_any(),
        Err(_) => pairs.clone(),
    };
    items
        .try_iter()?
        .map(|item| {
            let item = item?;
            let (src, dst): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
                item.extract().map_err(|_| {
                    PyTypeError::new_err("pairs must be a mapping {src: dst} or (src, dst) tuples")
                })?;
            Ok((
                id_of("source", &src)?.to_owned(),
                id_of("target", &dst)?.to_owned(),
            ))
        })
        .collect()
}

impl Registry {
    fn now(&self, py: Python<'_>) -> PyResult<i64> {
        self.cache.clock.now_secs(py)
    }

    /// The target (or source) a record names, counting unreadable records as errors.
    fn field(&self, raw: &Raw, field: &str) -> Option<String> {
        let found = match raw {
            Raw::Bytes(bytes) => field_of(bytes, field),
            Raw::Names(names) => return Some(names.to_string()),
        };
        match found {
            Field::Str(s) => Some(s),
            Field::Absent | Field::Corrupt => {
                bump(&self.counters.errors, 1);
                None
            }
        }
    }

    fn is_record(&self, raw: &Raw) -> bool {
        match raw {
            Raw::Names(_) => true,
            Raw::Bytes(_) => self.field(raw, &self.layout.source_field).is_some(),
        }
    }

    fn memory_reads(&self, py: Python<'_>, wanted: &Wanted) -> PyResult<Reads> {
        let now = self.now(py)?;
        let refs: Vec<(Table, &str)> = wanted.iter().map(|(t, id)| (*t, id.as_str())).collect();
        Ok(self
            .memory
            .get_many(&refs, now)
            .into_iter()
            .map(|n| n.map(Raw::Names))
            .collect())
    }

    fn finish_reads(
        &self,
        py: Python<'_>,
        wanted: &Wanted,
        result: Result<Vec<Option<Vec<u8>>>, StoreError>,
    ) -> PyResult<Reads> {
        match result {
            Ok(values) => {
                let mut reads: Reads = values.into_iter().map(|v| v.map(Raw::Bytes)).collect();
                if self.writes_refused.load(Ordering::Relaxed) && reads.iter().any(Option::is_none)
                {
                    let kept = self.memory_reads(py, wanted)?;
                    for (read, kept) in reads.iter_mut().zip(kept) {
                        if read.is_none() {
                            *read = kept;
                        }
                    }
                }
                Ok(reads)
            }
            Err(err) => {
                self.cache.absorb(err)?;
                self.memory_reads(py, wanted)
            }
        }
    }

    fn memory_writes(&self, py: Python<'_>, writes: &Writes) -> PyResult<()> {
        let now = self.now(py)?;
        let sets = writes
            .sets
            .iter()
            .map(|w| {
                let record = MemoryRecord {
                    names: Arc::from(w.names.as_str()),
                    expires_at: now + w.ttl as i64,
                };
                (w.table, w.id.clone(), record)
            })
            .collect();
        self.memory.write(sets, &writes.deletes, now);
        Ok(())
    }

    fn finish_writes(
        &self,
        py: Python<'_>,
        writes: &Writes,
        result: Option<Result<(), StoreError>>,
    ) -> PyResult<()> {
        match result {
            // Written to Redis: forget memory copies from an outage, so they cannot come
            // back as stale answers in a later one.
            Some(Ok(())) => {
                let mut forget = writes.deletes.clone();
                forget.extend(writes.sets.iter().map(|w| (w.table, w.id.clone())));
                self.memory.write(Vec::new(), &forget, self.now(py)?);
                Ok(())
            }
            Some(Err(err)) => {
                if matches!(err, StoreError::Command(_)) {
                    self.writes_refused.store(true, Ordering::Relaxed);
                }
                self.cache.absorb(err)?;
                self.memory_writes(py, writes)
            }
            None => self.memory_writes(py, writes),
        }
    }

    fn redis_keys(&self, wanted: &Wanted) -> Vec<String> {
        wanted
            .iter()
            .map(|(t, id)| self.cache.redis_key(&self.layout.key(*t, id)))
            .collect()
    }

    fn wire(&self, writes: &Writes) -> (Vec<WireSet>, Vec<String>) {
        let sets = writes
            .sets
            .iter()
            .map(|w| {
                (
                    self.cache.redis_key(&self.layout.key(w.table, &w.id)),
                    w.record.clone(),
                    w.ttl,
                )
            })
            .collect();
        (sets, self.redis_keys(&writes.deletes))
    }

    fn validated_writes(&self, py: Python<'_>, pairs: &[(String, String)]) -> PyResult<Writes> {
        let at = iso8601_utc(self.now(py)?);
        let mut writes = Writes::default();
        for (src, dst) in pairs {
            let record = self.layout.validated_record(src, dst, &at);
            let ttl = self.validated_ttl;
            writes.sets.push(RecordWrite {
                table: Table::Validated,
                id: src.clone(),
                names: dst.clone(),
                record: record.clone(),
                ttl,
            });
            writes.sets.push(RecordWrite {
                table: Table::Reverse,
                id: dst.clone(),
                names: src.clone(),
                record,
                ttl,
            });
            writes.deletes.push((Table::Missing, src.clone()));
        }
        Ok(writes)
    }

    fn missing_writes(&self, py: Python<'_>, ids: &[String], reason: &str) -> PyResult<Writes> {
        let at = iso8601_utc(self.now(py)?);
        let mut writes = Writes::default();
        for src in ids {
            let record = self.layout.missing_record(src, &at, reason);
            writes.sets.push(RecordWrite {
                table: Table::Missing,
                id: src.clone(),
                names: reason.to_owned(),
                record,
                ttl: self.missing_ttl,
            });
        }
        Ok(writes)
    }
}

fn wanted(table: Table, ids: &[String]) -> Wanted {
    ids.iter().map(|id| (table, id.clone())).collect()
}

async fn mget_chunked(
    redis: Arc<RedisStore>,
    keys: Vec<String>,
) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(CHUNK) {
        out.extend(redis.mget(chunk.to_vec()).await?);
    }
    Ok(out)
}

/// Writes records in chunks (one round trip each). A write that re-maps an ID replaced an
/// old pair: its other half is then removed too, only while it still names this ID (one
/// more round trip, only when something was re-mapped).
async fn write_chunked(
    reg: Arc<Registry>,
    redis: Arc<RedisStore>,
    writes: Arc<Writes>,
) -> Result<(), StoreError> {
    let (sets, deletes) = reg.wire(&writes);
    let mut replaced = Vec::with_capacity(sets.len());
    let mut sets = sets.into_iter().peekable();
    let mut deletes = deletes.into_iter().peekable();
    while sets.peek().is_some() || deletes.peek().is_some() {
        let s: Vec<_> = sets.by_ref().take(CHUNK).collect();
        let d: Vec<_> = deletes.by_ref().take(CHUNK).collect();
        replaced.extend(redis.swap_many(s, d).await?);
    }
    for (write, previous) in writes.sets.iter().zip(replaced) {
        let stale = previous
            .and_then(|p| reg.layout.names_in(write.table, &p))
            .and_then(|p| {
                reg.layout
                    .superseded(write.table, &write.id, &write.names, &p)
            });
        if let Some(stale) = stale {
            let key = reg.cache.redis_key(&reg.layout.key(stale.table, &stale.id));
            redis.unlink_if_names(key, stale.field, stale.names).await?;
        }
    }
    Ok(())
}

/// Storage half of `tenuto.IdRegistry` (use that class).
#[pyclass(subclass, frozen, module = "tenuto._core", name = "IdRegistryCore")]
pub struct PyIdRegistry {
    inner: Arc<Registry>,
}

type Finish = Box<dyn for<'py> FnOnce(Python<'py>, &Registry, Reads) -> PyResult<Py<PyAny>> + Send>;

impl PyIdRegistry {
    fn read(&self, py: Python<'_>, keys: Wanted) -> PyResult<Reads> {
        let reg = &self.inner;
        match reg.cache.route()? {
            None => reg.memory_reads(py, &keys),
            Some(redis) => {
                let rkeys = reg.redis_keys(&keys);
                let result = py.detach(|| runtime::block_on(mget_chunked(redis, rkeys)));
                reg.finish_reads(py, &keys, result)
            }
        }
    }

    fn aread<'py>(
        &self,
        py: Python<'py>,
        keys: Wanted,
        finish: Finish,
    ) -> PyResult<Bound<'py, PyAny>> {
        let reg = Arc::clone(&self.inner);
        match reg.cache.route()? {
            None => {
                let reads = reg.memory_reads(py, &keys)?;
                let value = finish(py, &reg, reads)?;
                Ok(Bound::new(py, Ready::new(value))?.into_any())
            }
            Some(redis) => {
                let rkeys = reg.redis_keys(&keys);
                spawn_for_asyncio(py, mget_chunked(redis, rkeys), move |py, result| {
                    let reads = reg.finish_reads(py, &keys, result)?;
                    finish(py, &reg, reads)
                })
            }
        }
    }

    fn write(&self, py: Python<'_>, writes: Writes) -> PyResult<()> {
        let reg = &self.inner;
        let writes = Arc::new(writes);
        let result = match reg.cache.route()? {
            Some(redis) => {
                let job = write_chunked(Arc::clone(reg), redis, Arc::clone(&writes));
                Some(py.detach(|| runtime::block_on(job)))
            }
            None => None,
        };
        reg.finish_writes(py, &writes, result)
    }

    fn awrite<'py>(&self, py: Python<'py>, writes: Writes) -> PyResult<Bound<'py, PyAny>> {
        let reg = Arc::clone(&self.inner);
        let writes = Arc::new(writes);
        match reg.cache.route()? {
            Some(redis) => spawn_for_asyncio(
                py,
                write_chunked(Arc::clone(&reg), redis, Arc::clone(&writes)),
                move |py, result| {
                    reg.finish_writes(py, &writes, Some(result))?;
                    Ok(py.None())
                },
            ),
            None => {
                reg.finish_writes(py, &writes, None)?;
                Ok(Bound::new(py, Ready::new(py.None()))?.into_any())
            }
        }
    }
}

/// `(to_check, known_missing)` from the reads of `missing:{id}` keys, input order kept.
fn split_missing(py: Python<'_>, reg: &Registry, ids: &Ids, reads: Reads) -> PyResult<Py<PyAny>> {
    let to_check = PyList::empty(py);
    let known = PyList::empty(py);
    for (id, read) in ids.objects.iter().zip(reads) {
        let id = id.bind(py);
        if read.is_some_and(|r| reg.is_record(&r)) {
            known.append(id)?;
        } else {
            to_check.append(id)?;
        }
    }
    bump(&reg.counters.missing, known.len());
    Ok(PyTuple::new(py, [to_check.into_any(), known.into_any()])?
        .into_any()
        .unbind())
}

/// `{id: other}` for the IDs whose records name `field`.
fn mapping(
    py: Python<'_>,
    reg: &Registry,
    ids: &Ids,
    reads: Reads,
    field: &str,
) -> PyResult<Py<PyAny>> {
    let out = PyDict::new(py);
    for (id, read) in ids.objects.iter().zip(reads) {
        let id = id.bind(py);
        match read.and_then(|r| reg.field(&r, field)) {
            Some(other) => {
                bump(&reg.counters.validated, 1);
                out.set_item(id, other)?;
            }
            None => bump(&reg.counters.unknown, 1),
        }
    }
    Ok(out.into_any().unbind())
}

/// `({src: dst} known, {src} known missing)` from reads of validated keys then missing keys.
fn classify(py: Python<'_>, reg: &Registry, ids: &Ids, mut reads: Reads) -> PyResult<Py<PyAny>> {
    let missing_reads = reads.split_off(ids.len());
    let known = PyDict::new(py);
    let missing = PySet::empty(py)?;
    for ((id, validated), marked) in ids.objects.iter().zip(reads).zip(missing_reads) {
        let id = id.bind(py);
        if let Some(dst) = validated.and_then(|r| reg.field(&r, &reg.layout.target_field)) {
            bump(&reg.counters.validated, 1);
            known.set_item(id, dst)?;
        } else if marked.is_some_and(|r| reg.is_record(&r)) {
            bump(&reg.counters.missing, 1);
            missing.add(id)?;
        } else {
            bump(&reg.counters.unknown, 1);
        }
    }
    Ok(PyTuple::new(py, [known.into_any(), missing.into_any()])?
        .into_any()
        .unbind())
}

fn ttl_arg(name: &str, seconds: f64) -> PyResult<u64> {
    if !seconds.is_finite() || seconds < 1.0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be at least 1 second, got {seconds}"
        )));
    }
    Ok(seconds.round() as u64)
}

#[pymethods]
impl PyIdRegistry {
    #[new]
    #[pyo3(signature = (
        cache, name = "reccobeat", source_field = "spotify_id", target_field = "reccobeat_id",
        validated_ttl = None, missing_ttl = None, *, record_format = "json"
    ), text_signature = "(cache, name='reccobeat', source_field='spotify_id', target_field='reccobeat_id', validated_ttl=15552000.0, missing_ttl=1209600.0, *, record_format='json')")]
    fn new(
        cache: &Bound<'_, PyCache>,
        name: &str,
        source_field: &str,
        target_field: &str,
        validated_ttl: Option<&Bound<'_, PyAny>>,
        missing_ttl: Option<&Bound<'_, PyAny>>,
        record_format: &str,
    ) -> PyResult<Self> {
        let format = match record_format {
            "json" => RecordFormat::Json,
            "pickle" => RecordFormat::Pickle,
            other => {
                return Err(PyValueError::new_err(format!(
                    "record_format must be \"json\" or \"pickle\", got {other:?}"
                )))
            }
        };
        // Seconds, timedeltas or "180d"; the defaults are 180 and 14 days.
        let days = |name: &str, value: Option<&Bound<'_, PyAny>>, default_days: f64| match value {
            Some(v) if !v.is_none() => crate::cache::py::seconds_arg(name, v),
            _ => Ok(default_days * 86_400.0),
        };
        let validated_ttl = days("validated_ttl", validated_ttl, 180.0)?;
        let missing_ttl = days("missing_ttl", missing_ttl, 14.0)?;
        for (what, value) in [
            ("name", name),
            ("source_field", source_field),
            ("target_field", target_field),
        ] {
            if value.is_empty() {
                return Err(PyValueError::new_err(format!("{what} must not be empty")));
            }
        }
        if source_field == target_field
            || ["validated_at", "marked_at", "reason"].contains(&target_field)
        {
            return Err(PyValueError::new_err("source_field and target_field must differ from each other and from the record's own fields"));
        }
        Ok(Self {
            inner: Arc::new(Registry {
                cache: Arc::clone(&cache.get().binding),
                layout: Layout {
                    name: name.to_owned(),
                    source_field: source_field.to_owned(),
                    target_field: target_field.to_owned(),
                    format,
                },
                validated_ttl: ttl_arg("validated_ttl", validated_ttl)?,
                missing_ttl: ttl_arg("missing_ttl", missing_ttl)?,
                memory: MemoryRecords::new(
                    cache
                        .get()
                        .binding
                        .engine
                        .memory
                        .capacity()
                        .min(usize::MAX as u64) as usize,
                ),
                counters: Counters::default(),
                writes_refused: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.inner.layout.name
    }

    /// Records `src ↔ dst` in both directions (one pipeline) and clears a missing mark.
    fn mark_validated(
        &self,
        py: Python<'_>,
        src: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let pair = vec![(
            id_of("source", src)?.to_owned(),
            id_of("target", dst)?.to_owned(),
        )];
        let writes = self.inner.validated_writes(py, &pair)?;
        self.write(py, writes)?;
        bump(&self.inner.counters.marked_validated, 1);
        Ok(())
    }

    /// Marks `src` as known to be missing upstream (for `missing_ttl`).
    #[pyo3(signature = (src, reason = None))]
    fn mark_missing(
        &self,
        py: Python<'_>,
        src: &Bound<'_, PyAny>,
        reason: Option<&str>,
    ) -> PyResult<()> {
        let ids = vec![id_of("source", src)?.to_owned()];
        let writes = self
            .inner
            .missing_writes(py, &ids, reason.unwrap_or("not found"))?;
        self.write(py, writes)?;
        bump(&self.inner.counters.marked_missing, 1);
        Ok(())
    }

    /// The target ID recorded for `src`, or None.
    fn get(&self, py: Python<'_>, src: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        let reg = &self.inner;
        let reads = self.read(
            py,
            vec![(Table::Validated, id_of("source", src)?.to_owned())],
        )?;
        let found = reads
            .into_iter()
            .next()
            .flatten()
            .and_then(|r| reg.field(&r, &reg.layout.target_field));
        bump(
            if found.is_some() {
                &reg.counters.validated
            } else {
                &reg.counters.unknown
            },
            1,
        );
        Ok(found)
    }

    /// The source ID recorded for target `dst`, or None.
    fn reverse(&self, py: Python<'_>, dst: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        let reg = &self.inner;
        let reads = self.read(py, vec![(Table::Reverse, id_of("target", dst)?.to_owned())])?;
        let found = reads
            .into_iter()
            .next()
            .flatten()
            .and_then(|r| reg.field(&r, &reg.layout.source_field));
        bump(
            if found.is_some() {
                &reg.counters.validated
            } else {
                &reg.counters.unknown
            },
            1,
        );
        Ok(found)
    }

    fn is_missing(&self, py: Python<'_>, src: &Bound<'_, PyAny>) -> PyResult<bool> {
        let reg = &self.inner;
        let reads = self.read(py, vec![(Table::Missing, id_of("source", src)?.to_owned())])?;
        let missing = reads
            .into_iter()
            .next()
            .flatten()
            .is_some_and(|r| reg.is_record(&r));
        bump(
            if missing {
                &reg.counters.missing
            } else {
                &reg.counters.unknown
            },
            1,
        );
        Ok(missing)
    }

    /// Forgets everything about `src`: its mapping (both directions) and missing mark.
    fn forget(&self, py: Python<'_>, src: &Bound<'_, PyAny>) -> PyResult<()> {
        let reg = &self.inner;
        let src = id_of("source", src)?.to_owned();
        let reads = self.read(py, vec![(Table::Validated, src.clone())])?;
        let dst = reads
            .into_iter()
            .next()
            .flatten()
            .and_then(|r| reg.field(&r, &reg.layout.target_field));
        let mut writes = Writes::default();
        writes.deletes.push((Table::Validated, src.clone()));
        writes.deletes.push((Table::Missing, src.clone()));
        if let Some(dst) = dst {
            writes.deletes.push((Table::Reverse, dst));
        }
        self.write(py, writes)
    }

    /// `(to_check, known_missing)`: `ids` split by their missing marks, order and
    /// duplicates kept. One round trip.
    fn bulk_check_missing(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.bulk_read(py, Table::Missing, ids)
    }

    fn abulk_check_missing<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.abulk_read(py, Table::Missing, ids)
    }

    /// `{src: dst}` for the known IDs among `ids`. One round trip.
    fn bulk_get(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.bulk_read(py, Table::Validated, ids)
    }

    fn abulk_get<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.abulk_read(py, Table::Validated, ids)
    }

    /// `{dst: src}` for the known target IDs among `dsts`. One round trip.
    fn bulk_reverse(&self, py: Python<'_>, dsts: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.bulk_read(py, Table::Reverse, dsts)
    }

    fn abulk_reverse<'py>(
        &self,
        py: Python<'py>,
        dsts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.abulk_read(py, Table::Reverse, dsts)
    }

    /// Records every `(src, dst)` pair (a mapping or an iterable of pairs). One pipeline.
    fn bulk_mark_validated(&self, py: Python<'_>, pairs: &Bound<'_, PyAny>) -> PyResult<()> {
        let pairs = pairs_of(pairs)?;
        let writes = self.inner.validated_writes(py, &pairs)?;
        self.write(py, writes)?;
        bump(&self.inner.counters.marked_validated, pairs.len());
        Ok(())
    }

    fn abulk_mark_validated<'py>(
        &self,
        py: Python<'py>,
        pairs: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let pairs = pairs_of(pairs)?;
        let writes = self.inner.validated_writes(py, &pairs)?;
        bump(&self.inner.counters.marked_validated, pairs.len());
        self.awrite(py, writes)
    }

    /// Marks every ID as missing. One pipeline.
    #[pyo3(signature = (ids, reason = None))]
    fn bulk_mark_missing(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        reason: Option<&str>,
    ) -> PyResult<()> {
        let ids = ids_of("source", ids)?;
        let writes = self
            .inner
            .missing_writes(py, &ids, reason.unwrap_or("not found"))?;
        self.write(py, writes)?;
        bump(&self.inner.counters.marked_missing, ids.len());
        Ok(())
    }

    #[pyo3(signature = (ids, reason = None))]
    fn abulk_mark_missing<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        reason: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = ids_of("source", ids)?;
        let writes = self
            .inner
            .missing_writes(py, &ids, reason.unwrap_or("not found"))?;
        bump(&self.inner.counters.marked_missing, ids.len());
        self.awrite(py, writes)
    }

    /// `({src: dst}, {known missing src})` for `ids`, from one round trip.
    fn _classify(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let ids = ids_of("source", ids)?;
        let reads = self.read(py, self.classify_keys(&ids))?;
        classify(py, &self.inner, &ids, reads)
    }

    fn _aclassify<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = ids_of("source", ids)?;
        let keys = self.classify_keys(&ids);
        self.aread(
            py,
            keys,
            Box::new(move |py, reg, reads| classify(py, reg, &ids, reads)),
        )
    }

    /// Counts one fetch of `ids` IDs (and whether it failed), for `stats()`.
    #[pyo3(signature = (ids, failed = false))]
    fn _count_fetch(&self, ids: usize, failed: bool) {
        let c = &self.inner.counters;
        bump(&c.fetches, 1);
        bump(&c.ids_fetched, ids);
        if failed {
            bump(&c.errors, 1);
        }
    }

    /// Lookups by outcome, marks written, fetches, IDs fetched, errors.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.inner.counters;
        let d = PyDict::new(py);
        d.set_item("name", &self.inner.layout.name)?;
        d.set_item("validated", read_counter(&c.validated))?;
        d.set_item("missing", read_counter(&c.missing))?;
        d.set_item("unknown", read_counter(&c.unknown))?;
        d.set_item("marked_validated", read_counter(&c.marked_validated))?;
        d.set_item("marked_missing", read_counter(&c.marked_missing))?;
        d.set_item("fetches", read_counter(&c.fetches))?;
        d.set_item("ids_fetched", read_counter(&c.ids_fetched))?;
        d.set_item("errors", read_counter(&c.errors))?;
        Ok(d)
    }
}

/// The answer of a bulk read of `table`: missing marks split the IDs; mappings map them.
fn answer(
    py: Python<'_>,
    reg: &Registry,
    table: Table,
    ids: &Ids,
    reads: Reads,
) -> PyResult<Py<PyAny>> {
    match table {
        Table::Missing => split_missing(py, reg, ids, reads),
        Table::Validated => mapping(py, reg, ids, reads, &reg.layout.target_field),
        Table::Reverse => mapping(py, reg, ids, reads, &reg.layout.source_field),
    }
}

fn id_kind(table: Table) -> &'static str {
    if table == Table::Reverse {
        "target"
    } else {
        "source"
    }
}

impl PyIdRegistry {
    fn bulk_read(
        &self,
        py: Python<'_>,
        table: Table,
        ids: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let ids = ids_of(id_kind(table), ids)?;
        let reads = self.read(py, wanted(table, &ids))?;
        answer(py, &self.inner, table, &ids, reads)
    }

    fn abulk_read<'py>(
        &self,
        py: Python<'py>,
        table: Table,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = ids_of(id_kind(table), ids)?;
        let keys = wanted(table, &ids);
        self.aread(
            py,
            keys,
            Box::new(move |py, reg, reads| answer(py, reg, table, &ids, reads)),
        )
    }

    fn classify_keys(&self, ids: &[String]) -> Wanted {
        let mut keys = wanted(Table::Validated, ids);
        keys.extend(wanted(Table::Missing, ids));
        keys
    }
}
