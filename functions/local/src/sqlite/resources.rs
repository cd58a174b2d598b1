//! The resources: versions with their `superseded` time, the compartment index and the
//! Provenance target index, read page by page for exports.

use super::{CURRENT_AT, SqliteStore, db_err};
use async_trait::async_trait;
use bytes::Bytes;
use export_core::error::{StoreError, StoreResult};
use export_core::fhir::reference;
use export_core::fhir::time::{Instant, from_micros, to_micros};
use export_core::item_thread;
use export_core::ports::{
    Cursor, NewResource, Page, PatientScope, ReadScope, ResourceId, ResourceStore, ResourceVersion,
    StoredResource,
};
use export_core::provenance;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// A rid is `type number << TYPE_SHIFT` plus the version's place in its type: each type's rows
/// are one contiguous range of the table, so reading a type is a sequential scan of that range
/// instead of one random page read per row (rows are ~650 bytes, six types share a page when
/// loaded patient by patient). A type holds up to 2^40 versions.
const TYPE_SHIFT: u32 = 40;

/// Row ids per partition of a type: a type with more rows is read as several consecutive rid
/// ranges, one work item each, so one big type (Observation is half of a Synthea store) runs on
/// every core. A partition is a fixed stride from the type's first rid, not a share of its
/// current size, so the ranges planned for an export never move as rows are added; the last one
/// runs to the end of the type. 2^17 rows are ~85 MB of Synthea NDJSON.
pub(super) const ROWS_PER_PARTITION: i64 = 1 << 17;
/// At most this many partitions per type (the last one takes the rest).
const MOST_PARTITIONS: i64 = 256;

/// The rid range `[lo, hi)` of partition `partition` of `partitions` of type number `num`.
fn partition_rids(
    num: i64,
    partition: u32,
    partitions: u32,
    rows_per_partition: i64,
) -> (i64, i64) {
    let (start, end) = rid_range(num);
    let lo = start
        .saturating_add(rows_per_partition.saturating_mul(partition as i64))
        .min(end);
    let hi = match partition + 1 >= partitions {
        true => end,
        false => lo.saturating_add(rows_per_partition).min(end),
    };
    (lo, hi)
}

/// The rids of type number `num`: `[start, end)`.
fn rid_range(num: i64) -> (i64, i64) {
    (num << TYPE_SHIFT, (num + 1) << TYPE_SHIFT)
}

/// The number of a type, if the store has ever held it.
fn type_number(conn: &Connection, resource_type: &str) -> StoreResult<Option<i64>> {
    conn.prepare_cached("SELECT num FROM resource_types WHERE type = ?1")
        .map_err(db_err)?
        .query_row([resource_type], |r| r.get(0))
        .optional()
        .map_err(db_err)
}

/// The next free rid of a type, numbering the type first if it is new.
fn next_rid(conn: &Connection, resource_type: &str) -> StoreResult<i64> {
    let num = match type_number(conn, resource_type)? {
        Some(num) => num,
        None => {
            let num: i64 = conn
                .query_row(
                    "SELECT COALESCE(MAX(num), 0) + 1 FROM resource_types",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            conn.execute(
                "INSERT INTO resource_types (type, num) VALUES (?1, ?2)",
                params![resource_type, num],
            )
            .map_err(db_err)?;
            num
        }
    };
    let (start, end) = rid_range(num);
    conn.prepare_cached(
        "SELECT COALESCE(MAX(rid) + 1, ?1) FROM resources WHERE rid >= ?1 AND rid < ?2",
    )
    .map_err(db_err)?
    .query_row([start, end], |r| r.get(0))
    .map_err(db_err)
}

impl SqliteStore {
    /// Writes a batch of resources in one transaction (used by `load`, `--sample` and the port).
    pub fn put_resources_blocking(&self, resources: Vec<NewResource>) -> StoreResult<()> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_err)?;
            {
                let mut next_rids: std::collections::HashMap<String, i64> = Default::default();
                let mut current = tx
                    .prepare_cached("SELECT rid, version, deleted, lu FROM resources WHERE type = ?1 AND id = ?2 AND superseded IS NULL")
                    .map_err(db_err)?;
                let mut stored_version = tx.prepare_cached("SELECT body FROM resources WHERE rid = ?1").map_err(db_err)?;
                let mut supersede = tx.prepare_cached("UPDATE resources SET superseded = ?2 WHERE rid = ?1").map_err(db_err)?;
                let mut insert = tx
                    .prepare_cached("INSERT INTO resources (rid, type, id, version, lu, body, deleted) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
                    .map_err(db_err)?;
                let mut member = tx
                    .prepare_cached("INSERT OR IGNORE INTO membership (patient, type, rid) VALUES (?1, ?2, ?3)")
                    .map_err(db_err)?;
                let mut provenance_target = tx
                    .prepare_cached("INSERT OR IGNORE INTO provenance_targets (target, id) VALUES (?1, ?2)")
                    .map_err(db_err)?;
                // A deletion stays in the compartments of the version it deletes.
                let mut inherit = tx
                    .prepare_cached("INSERT OR IGNORE INTO membership (patient, type, rid) SELECT patient, type, ?2 FROM membership WHERE rid = ?1")
                    .map_err(db_err)?;
                for mut resource in resources {
                    let lu = to_micros(resource.last_updated);
                    let previous: Option<(i64, i64, bool, i64)> = current
                        .query_row(params![resource.resource_type, resource.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                        .optional()
                        .map_err(db_err)?;
                    // Deleting what does not exist (or is already deleted) changes nothing.
                    if resource.deleted && previous.is_none_or(|(_, _, gone, _)| gone) {
                        continue;
                    }
                    // Nor does the current version's content again (the same line loaded twice).
                    if let Some((rid, _, false, previous_lu)) = previous
                        && !resource.deleted
                        && previous_lu == lu
                    {
                        let body: String = stored_version.query_row([rid], |r| r.get(0)).map_err(db_err)?;
                        let patients = patients_of_row(&tx, rid)?;
                        let stored = NewResource {
                            resource_type: resource.resource_type.clone(),
                            id: resource.id.clone(),
                            last_updated: resource.last_updated,
                            json: serde_json::from_str(&body)?,
                            patients,
                            deleted: false,
                        };
                        if stored.content_digest()? == resource.content_digest()? {
                            continue;
                        }
                    }
                    let version = previous.map_or(1, |(_, v, _, _)| v + 1);
                    if let Some((rid, _, _, _)) = previous {
                        supersede.execute(params![rid, lu]).map_err(db_err)?;
                    }
                    if let Some(meta) = resource.json.get_mut("meta").and_then(Value::as_object_mut) {
                        meta.insert("versionId".into(), Value::String(version.to_string()));
                    }
                    if resource.resource_type == "Provenance" && !resource.deleted {
                        for target in provenance::targets(&resource.json) {
                            provenance_target.execute(params![target, resource.id]).map_err(db_err)?;
                        }
                    }
                    let body = serde_json::to_string(&resource.json)?;
                    let rid = match next_rids.get_mut(&resource.resource_type) {
                        Some(next) => next,
                        None => next_rids.entry(resource.resource_type.clone()).or_insert(next_rid(&tx, &resource.resource_type)?),
                    };
                    let rid = std::mem::replace(rid, *rid + 1);
                    insert.execute(params![rid, resource.resource_type, resource.id, version, lu, body, resource.deleted]).map_err(db_err)?;
                    if let (true, Some((previous_rid, _, _, _))) = (resource.deleted, previous) {
                        inherit.execute(params![previous_rid, rid]).map_err(db_err)?;
                    }
                    for patient in &resource.patients {
                        member.execute(params![patient, resource.resource_type, rid]).map_err(db_err)?;
                    }
                }
            }
            tx.commit().map_err(db_err)
        })
    }

    /// Fills the Provenance target index of a store created before it existed.
    pub(super) fn index_old_provenance(conn: &Connection) -> StoreResult<()> {
        let indexed: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM provenance_targets)",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if indexed {
            return Ok(());
        }
        let mut select = conn
            .prepare("SELECT id, body FROM resources WHERE type = 'Provenance' AND deleted = 0")
            .map_err(db_err)?;
        let mut rows = select.query([]).map_err(db_err)?;
        let mut insert = conn
            .prepare("INSERT OR IGNORE INTO provenance_targets (target, id) VALUES (?1, ?2)")
            .map_err(db_err)?;
        while let Some(row) = rows.next().map_err(db_err)? {
            let id: String = row.get(0).map_err(db_err)?;
            let body: String = row.get(1).map_err(db_err)?;
            let json: Value = serde_json::from_str(&body)?;
            for target in provenance::targets(&json) {
                insert.execute(params![target, id]).map_err(db_err)?;
            }
        }
        Ok(())
    }

    /// Renumbers the rows of a store written before rids were grouped by type (or by an older
    /// binary since), so every type is one range again. Runs once, at open, in one transaction.
    pub(super) fn cluster_old_rows(conn: &Connection) -> StoreResult<()> {
        let old_rows: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM resources WHERE rid < (1 << 40))",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if !old_rows {
            return Ok(());
        }
        let tx = conn.unchecked_transaction().map_err(db_err)?;
        let new_types: Vec<String> = tx
            .prepare("SELECT DISTINCT type FROM resources WHERE type NOT IN (SELECT type FROM resource_types) ORDER BY type")
            .map_err(db_err)?
            .query_map([], |r| r.get(0))
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        for resource_type in new_types {
            tx.execute(
                "INSERT INTO resource_types (type, num) SELECT ?1, COALESCE(MAX(num), 0) + 1 FROM resource_types",
                [resource_type],
            )
            .map_err(db_err)?;
        }
        tx.execute_batch(
            "CREATE TEMP TABLE rid_map (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);
             INSERT INTO rid_map (old, new)
               SELECT r.rid, COALESCE((SELECT MAX(x.rid) FROM resources x WHERE x.rid >= (t.num << 40) AND x.rid < ((t.num + 1) << 40)), t.num << 40)
                 + row_number() OVER (PARTITION BY r.type ORDER BY r.rid)
               FROM resources r JOIN resource_types t ON t.type = r.type WHERE r.rid < (1 << 40);
             UPDATE resources SET rid = (SELECT new FROM rid_map WHERE old = resources.rid) WHERE rid < (1 << 40);
             UPDATE membership SET rid = (SELECT new FROM rid_map WHERE old = membership.rid) WHERE rid < (1 << 40);
             DROP TABLE rid_map;",
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Number of current resources per type.
    pub fn counts(&self) -> StoreResult<Vec<(String, u64)>> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare("SELECT type, COUNT(*) FROM resources WHERE superseded IS NULL AND deleted = 0 GROUP BY type ORDER BY type")
                .map_err(db_err)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))).map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
    }

    /// `(rid, lastUpdated, body)` of the live version of `type/id` current at `as_of`. The
    /// (type, id) index is forced: on its own SQLite picks the lastUpdated index and scans the type.
    fn version_at(
        conn: &Connection,
        resource_type: &str,
        id: &str,
        as_of: i64,
    ) -> StoreResult<Option<(i64, i64, String)>> {
        let sql = format!(
            "SELECT rid, lu, body FROM resources INDEXED BY resources_by_id WHERE type = :type AND id = :id AND lu <= :as_of AND deleted = 0 AND {CURRENT_AT}"
        );
        conn.prepare_cached(&sql)
            .map_err(db_err)?
            .query_row(
                rusqlite::named_params! {":type": resource_type, ":id": id, ":as_of": as_of},
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db_err)
    }
}

/// The live version of `type/id` current at `as_of` (microseconds), with the patients whose
/// compartments hold it.
fn resource_version(
    conn: &Connection,
    resource_type: &str,
    id: &str,
    as_of: i64,
) -> StoreResult<Option<ResourceVersion>> {
    let Some((rid, lu, body)) = SqliteStore::version_at(conn, resource_type, id, as_of)? else {
        return Ok(None);
    };
    Ok(Some(ResourceVersion {
        json: Bytes::from(body),
        last_updated: from_micros(lu),
        patients: patients_of_row(conn, rid)?,
    }))
}

/// The patients whose compartments hold the stored version `rid`.
fn patients_of_row(conn: &Connection, rid: i64) -> StoreResult<Vec<String>> {
    conn.prepare_cached("SELECT patient FROM membership WHERE rid = ?1")
        .map_err(db_err)?
        .query_map([rid], |r| r.get::<_, String>(0))
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)
}

/// Reads a page over one type ordered by `(lu, rid)`, optionally only compartment members of
/// any existing Patient.
fn page_by_time(
    conn: &Connection,
    scope: &ReadScope,
    cursor: Option<&str>,
    limit: usize,
    any_patient: bool,
    live: Option<&HashSet<String>>,
    rows_per_partition: i64,
) -> StoreResult<Page> {
    let Some(num) = type_number(conn, &scope.resource_type)? else {
        return Ok(Page::default());
    };
    let rids = partition_rids(num, scope.partition, scope.partitions, rows_per_partition);
    if scope.since.is_none() {
        return page_by_rid(conn, scope, rids, cursor, limit, any_patient, live);
    }
    let (after_lu, after_rid) = match cursor {
        Some(c) => parse_pair(c)?,
        None => (i64::MIN, i64::MIN),
    };
    // One lower bound on `lu` lets the (type, lu) index start at the cursor instead of
    // rescanning the type from its beginning for every page.
    let from_lu = scope
        .since
        .map_or(i64::MIN, |t| to_micros(t) + 1)
        .max(after_lu);
    let compartment = compartment_condition(any_patient);
    let sql = format!(
        "SELECT r.rid, r.id, r.lu, r.body FROM resources r WHERE r.type = :type AND r.lu >= :from_lu AND r.lu <= :until \
         AND (r.lu > :after_lu OR r.rid > :after_rid) AND r.rid >= :lo AND r.rid < :hi \
         AND (r.superseded IS NULL OR r.superseded > :as_of) AND r.deleted = :deleted {compartment} \
         ORDER BY r.lu, r.rid LIMIT :limit"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(db_err)?;
    let mut rows = stmt
        .query(rusqlite::named_params! {
            ":type": scope.resource_type,
            ":from_lu": from_lu,
            ":until": to_micros(scope.until),
            ":as_of": to_micros(scope.as_of),
            ":after_lu": after_lu,
            ":after_rid": after_rid,
            ":lo": rids.0,
            ":hi": rids.1,
            ":limit": limit as i64,
            ":deleted": scope.deleted,
        })
        .map_err(db_err)?;
    let mut page = Page::default();
    let mut bodies = PageBodies::new(limit);
    while let Some(row) = rows.next().map_err(db_err)? {
        let rid: i64 = row.get(0).map_err(db_err)?;
        let lu: i64 = row.get(2).map_err(db_err)?;
        page.resources.push(StoredResource {
            id: bodies.take_id(row.get_ref(1).map_err(db_err)?)?,
            json: bodies.take(row.get_ref(3).map_err(db_err)?)?,
        });
        page.cursors.push(format!("{lu}:{rid}").into());
    }
    page.more = page.resources.len() == limit;
    page.next = page.resume_after();
    Ok(page)
}

/// With `any_patient`, the condition that a row is in the compartment of an existing Patient.
fn compartment_condition(any_patient: bool) -> &'static str {
    if any_patient {
        "AND EXISTS (SELECT 1 FROM membership m CROSS JOIN resources p INDEXED BY resources_by_id ON p.type = 'Patient' AND p.id = m.patient \
         WHERE m.rid = r.rid AND p.lu <= :as_of AND p.deleted = 0 AND (p.superseded IS NULL OR p.superseded > :as_of))"
    } else {
        ""
    }
}

/// Above this many live Patients a Patient-level read checks each row in SQL instead of holding
/// their ids in memory (~60 bytes each).
const LIVE_PATIENTS_HELD: usize = 200_000;

/// The ids of the Patients live at a transaction time. Every page of a Patient-level export
/// asks "is this row in a live Patient's compartment?"; with the set at hand a page costs one
/// range read of its rows' memberships instead of two index probes per row (membership, then the
/// Patient's versions). The set is valid while no Patient version is added: a new version (an
/// update or deletion) takes a new, higher rid, so the newest Patient rid is part of its key.
pub(super) struct LivePatients {
    as_of: i64,
    newest_rid: i64,
    /// `None`: more than [`LIVE_PATIENTS_HELD`].
    ids: Option<Arc<HashSet<String>>>,
}

/// The live Patients at `as_of` from `cache`, read again if a Patient version was added since.
fn live_patients(
    conn: &Connection,
    cache: &Mutex<Option<LivePatients>>,
    as_of: i64,
) -> StoreResult<Option<Arc<HashSet<String>>>> {
    let Some(num) = type_number(conn, "Patient")? else {
        return Ok(Some(Arc::default()));
    };
    let (start, end) = rid_range(num);
    let newest_rid: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(rid), 0) FROM resources WHERE rid >= ?1 AND rid < ?2")
        .map_err(db_err)?
        .query_row([start, end], |r| r.get(0))
        .map_err(db_err)?;
    if let Some(held) = &*cache.lock().expect("live patients")
        && (held.as_of, held.newest_rid) == (as_of, newest_rid)
    {
        return Ok(held.ids.clone());
    }
    let sql = format!(
        "SELECT id FROM resources WHERE rid >= :start AND rid < :end AND lu <= :as_of AND deleted = 0 AND {CURRENT_AT} LIMIT :most"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(db_err)?;
    let rows = stmt
        .query_map(
            rusqlite::named_params! {":start": start, ":end": end, ":as_of": as_of, ":most": LIVE_PATIENTS_HELD as i64 + 1},
            |r| r.get::<_, String>(0),
        )
        .map_err(db_err)?;
    // Counted as rows, not ids: two live versions of one Patient (lastUpdated out of order) must
    // not make a list cut at the limit look complete.
    let rows: Vec<String> = rows.collect::<Result<_, _>>().map_err(db_err)?;
    let ids = (rows.len() <= LIVE_PATIENTS_HELD).then(|| Arc::new(rows.into_iter().collect()));
    *cache.lock().expect("live patients") = Some(LivePatients {
        as_of,
        newest_rid,
        ids: ids.clone(),
    });
    Ok(ids)
}

/// Reads a page over one partition of a type (no `_since`) in rid order: its range of the
/// table, `[start, end)`, sequentially. The cursor is the last rid read. With `live` (the live Patients),
/// only rows in one of their compartments are kept; `next` still moves past the others.
fn page_by_rid(
    conn: &Connection,
    scope: &ReadScope,
    (start, end): (i64, i64),
    cursor: Option<&str>,
    limit: usize,
    any_patient: bool,
    live: Option<&HashSet<String>>,
) -> StoreResult<Page> {
    let after = match cursor {
        Some(c) => c
            .parse::<i64>()
            .map_err(|_| StoreError::new(format!("bad cursor '{c}'")))?,
        None => start - 1,
    };
    // With the live set in hand the compartment is checked per page below, not per row here.
    let sql = format!(
        "SELECT r.rid, r.id, r.body FROM resources r WHERE r.rid > :after AND r.rid < :end AND r.lu <= :until \
         AND (r.superseded IS NULL OR r.superseded > :as_of) AND r.deleted = :deleted {} \
         ORDER BY r.rid LIMIT :limit",
        compartment_condition(any_patient && live.is_none())
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(db_err)?;
    let mut rows = stmt
        .query(rusqlite::named_params! {
            ":after": after,
            ":end": end,
            ":until": to_micros(scope.until),
            ":as_of": to_micros(scope.as_of),
            ":limit": limit as i64,
            ":deleted": scope.deleted,
        })
        .map_err(db_err)?;
    let mut read = Vec::with_capacity(limit.min(4096));
    let mut bodies = PageBodies::new(limit);
    while let Some(row) = rows.next().map_err(db_err)? {
        let rid: i64 = row.get(0).map_err(db_err)?;
        let id = bodies.take_id(row.get_ref(1).map_err(db_err)?)?;
        read.push((rid, id, bodies.take(row.get_ref(2).map_err(db_err)?)?));
    }
    let mut page = Page {
        more: read.len() == limit,
        next: read.last().map(|(rid, _, _)| rid.to_string()),
        ..Page::default()
    };
    let in_live_compartment = match (any_patient, live, read.first(), read.last()) {
        (true, Some(live), Some((first, ..)), Some((last, ..))) => {
            Some(rids_with_a_patient_in(conn, *first, *last, live)?)
        }
        _ => None,
    };
    for (rid, id, body) in read {
        if in_live_compartment
            .as_ref()
            .is_some_and(|kept| kept.binary_search(&rid).is_err())
        {
            continue;
        }
        page.resources.push(StoredResource { id, json: body });
        page.cursors.push(Cursor::Row(rid));
    }
    Ok(page)
}

/// The bodies of one page, copied out of SQLite into one shared buffer: one allocation per page
/// instead of a `String` per row (allocating and freeing them was ~10% of a system export).
/// Bodies are stored as valid UTF-8 JSON, so they are not validated again on the way out.
struct PageBodies(bytes::BytesMut);

impl PageBodies {
    fn new(rows: usize) -> Self {
        PageBodies(bytes::BytesMut::with_capacity(rows.min(4096) * 768))
    }

    fn take(&mut self, body: rusqlite::types::ValueRef<'_>) -> StoreResult<Bytes> {
        self.0.extend_from_slice(body.as_bytes().map_err(db_err)?);
        Ok(self.0.split().freeze())
    }

    /// An id, copied into the same buffer.
    fn take_id(&mut self, id: rusqlite::types::ValueRef<'_>) -> StoreResult<ResourceId> {
        self.0
            .extend_from_slice(id.as_str().map_err(db_err)?.as_bytes());
        ResourceId::from_utf8(self.0.split().freeze()).map_err(db_err)
    }
}

/// The rids in `[first, last]`, ascending, with a compartment membership of a patient in `live`:
/// one range read of the (rid, patient) index.
fn rids_with_a_patient_in(
    conn: &Connection,
    first: i64,
    last: i64,
    live: &HashSet<String>,
) -> StoreResult<Vec<i64>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT rid, patient FROM membership WHERE rid >= ?1 AND rid <= ?2 ORDER BY rid",
        )
        .map_err(db_err)?;
    let mut rows = stmt.query([first, last]).map_err(db_err)?;
    let mut kept: Vec<i64> = Vec::new();
    while let Some(row) = rows.next().map_err(db_err)? {
        let rid: i64 = row.get(0).map_err(db_err)?;
        if kept.last() == Some(&rid) {
            continue;
        }
        let patient = row.get_ref(1).map_err(db_err)?.as_str().map_err(db_err)?;
        if live.contains(patient) {
            kept.push(rid);
        }
    }
    Ok(kept)
}

/// Reads a page of the compartments of a listed patient set, patient by patient. A resource in
/// several listed compartments is returned only under the first of those patients.
fn page_by_patient(
    conn: &Connection,
    scope: &ReadScope,
    patients: &[String],
    cursor: Option<&str>,
    limit: usize,
) -> StoreResult<Page> {
    let (mut index, mut after_rid) = match cursor {
        Some(c) => parse_pair(c)?,
        None => (0, i64::MIN),
    };
    // The fourth column lists the row's other compartments that sort before this patient
    // (usually none), read in the same step rather than by a statement per row.
    let sql = "SELECT r.rid, r.id, r.body, \
         (SELECT group_concat(o.patient, char(10)) FROM membership o WHERE o.rid = m.rid AND o.patient < m.patient) \
         FROM membership m JOIN resources r ON r.rid = m.rid \
         WHERE m.patient = :patient AND m.type = :type AND m.rid > :after_rid \
         AND r.lu > :since AND r.lu <= :until AND (r.superseded IS NULL OR r.superseded > :as_of) AND r.deleted = :deleted \
         ORDER BY m.rid LIMIT :limit";
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut page = Page::default();
    let mut bodies = PageBodies::new(limit);
    while (index as usize) < patients.len() && page.resources.len() < limit {
        let patient = &patients[index as usize];
        let mut rows = stmt
            .query(rusqlite::named_params! {
                ":patient": patient,
                ":type": scope.resource_type,
                ":after_rid": after_rid,
                ":since": scope.since.map_or(i64::MIN, to_micros),
                ":until": to_micros(scope.until),
                ":as_of": to_micros(scope.as_of),
                ":limit": (limit - page.resources.len()) as i64,
                ":deleted": scope.deleted,
            })
            .map_err(db_err)?;
        let mut fetched = 0;
        while let Some(row) = rows.next().map_err(db_err)? {
            fetched += 1;
            let rid: i64 = row.get(0).map_err(db_err)?;
            after_rid = rid;
            let earlier: Option<String> = row.get(3).map_err(db_err)?;
            let owned_earlier = earlier.is_some_and(|others| {
                others
                    .split('\n')
                    .any(|other| patients.binary_search_by(|p| p.as_str().cmp(other)).is_ok())
            });
            if !owned_earlier {
                page.resources.push(StoredResource {
                    id: bodies.take_id(row.get_ref(1).map_err(db_err)?)?,
                    json: bodies.take(row.get_ref(2).map_err(db_err)?)?,
                });
                page.cursors.push(format!("{index}:{rid}").into());
            }
        }
        if page.resources.len() < limit && fetched < limit {
            index += 1;
            after_rid = i64::MIN;
        }
    }
    page.more = (index as usize) < patients.len();
    page.next = Some(format!("{index}:{after_rid}"));
    Ok(page)
}

fn parse_pair(cursor: &str) -> StoreResult<(i64, i64)> {
    let bad = || StoreError::new(format!("bad cursor '{cursor}'"));
    let (a, b) = cursor.split_once(':').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

#[async_trait]
impl ResourceStore for SqliteStore {
    async fn resource_types(&self) -> StoreResult<Vec<String>> {
        self.run(|conn| {
            let mut stmt = conn
                // The type registry, each type checked by one probe of its row-id range: a
                // DISTINCT over the resources would read the whole store for a 10-patient Group.
                .prepare(
                    "SELECT type FROM resource_types t WHERE EXISTS (SELECT 1 FROM resources \
                     WHERE rid >= t.num << 40 AND rid < (t.num + 1) << 40) ORDER BY type",
                )
                .map_err(db_err)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    /// One partition per [`ROWS_PER_PARTITION`] row ids a type has used; a listed patient set
    /// is read patient by patient, in one.
    async fn partitions(
        &self,
        resource_type: &str,
        listed_patients: Option<usize>,
    ) -> StoreResult<u32> {
        if listed_patients.is_some() {
            return Ok(1);
        }
        let (resource_type, rows) = (resource_type.to_string(), self.rows_per_partition);
        self.run(move |conn| {
            let Some(num) = type_number(conn, &resource_type)? else {
                return Ok(1);
            };
            let (start, end) = rid_range(num);
            let used: i64 = conn
                .prepare_cached("SELECT COALESCE(MAX(rid) + 1, ?1) - ?1 FROM resources WHERE rid >= ?1 AND rid < ?2")
                .map_err(db_err)?
                .query_row([start, end], |r| r.get(0))
                .map_err(db_err)?;
            Ok((used.max(1) - 1).checked_div(rows).unwrap_or(0).saturating_add(1).clamp(1, MOST_PARTITIONS) as u32)
        })
        .await
    }

    async fn patient_exists(&self, id: &str, as_of: Instant) -> StoreResult<bool> {
        let id = id.to_string();
        self.run(
            move |conn| Ok(Self::version_at(conn, "Patient", &id, to_micros(as_of))?.is_some()),
        )
        .await
    }

    async fn resource_at(
        &self,
        resource_type: &str,
        id: &str,
        as_of: Instant,
    ) -> StoreResult<Option<ResourceVersion>> {
        let (resource_type, id) = (resource_type.to_string(), id.to_string());
        self.run(move |conn| resource_version(conn, &resource_type, &id, to_micros(as_of)))
            .await
    }

    /// All of them in one read transaction on one blocking thread: a Patient-level export checks
    /// the targets of every Provenance (~1M at 1M resources), and one task per target made the
    /// Provenance item take 0.6 s, most of it handing work between threads.
    async fn resources_at(
        &self,
        targets: &[(String, String)],
        as_of: Instant,
    ) -> StoreResult<Vec<Option<ResourceVersion>>> {
        let targets = targets.to_vec();
        self.run(move |conn| {
            let tx = conn.transaction().map_err(db_err)?;
            let versions = targets
                .iter()
                .map(|(resource_type, id)| {
                    resource_version(&tx, resource_type, id, to_micros(as_of))
                })
                .collect::<StoreResult<Vec<_>>>()?;
            tx.finish().map_err(db_err)?;
            Ok(versions)
        })
        .await
    }

    async fn provenance_targeting(&self, targets: &[String]) -> StoreResult<Vec<String>> {
        let targets = targets.to_vec();
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT id FROM provenance_targets WHERE target = ?1")
                .map_err(db_err)?;
            let mut ids = std::collections::BTreeSet::new();
            for target in &targets {
                let rows = stmt
                    .query_map([target], |r| r.get::<_, String>(0))
                    .map_err(db_err)?;
                for id in rows {
                    ids.insert(id.map_err(db_err)?);
                }
            }
            Ok(ids.into_iter().collect())
        })
        .await
    }

    async fn group_members(
        &self,
        group_id: &str,
        as_of: Instant,
    ) -> StoreResult<Option<Vec<String>>> {
        let id = group_id.to_string();
        let body = self
            .run(move |conn| {
                Ok(
                    Self::version_at(conn, "Group", &id, to_micros(as_of))?
                        .map(|(_, _, body)| body),
                )
            })
            .await?;
        let Some(body) = body else { return Ok(None) };
        let group: Value = serde_json::from_str(&body)?;
        let members = reference::group_patient_members(&group);
        Ok(Some(members))
    }

    async fn read_page(
        &self,
        scope: &ReadScope,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page> {
        let scope = scope.clone();
        let cursor = cursor.map(String::from);
        let live_cache = self.live_patients.clone();
        let rows_per_partition = self.rows_per_partition;
        self.run(move |conn| {
            // One read transaction per page: its statements share one snapshot and one WAL read
            // lock instead of taking and dropping it (file locks) for every statement.
            let tx = conn.transaction().map_err(db_err)?;
            let page = match &scope.patients {
                PatientScope::Everything => page_by_time(
                    &tx,
                    &scope,
                    cursor.as_deref(),
                    limit,
                    false,
                    None,
                    rows_per_partition,
                ),
                PatientScope::AllPatients => {
                    // Only a read in rid order uses the set (a `_since` read checks each row in SQL).
                    let live = match scope.since {
                        None => live_patients(&tx, &live_cache, to_micros(scope.as_of))?,
                        Some(_) => None,
                    };
                    page_by_time(
                        &tx,
                        &scope,
                        cursor.as_deref(),
                        limit,
                        true,
                        live.as_deref(),
                        rows_per_partition,
                    )
                }
                PatientScope::Listed(patients) => {
                    page_by_patient(&tx, &scope, patients, cursor.as_deref(), limit)
                }
            }?;
            tx.finish().map_err(db_err)?;
            Ok(page)
        })
        .await
    }

    async fn put_resources(&self, resources: Vec<NewResource>) -> StoreResult<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.put_resources_blocking(resources))
            .await
            .map_err(db_err)?
    }

    /// A page is CPU work (copying rows out of the page cache): on an item's own thread it is
    /// done right there, and reading ahead would only move it to another thread.
    fn reads_on_calling_thread(&self) -> bool {
        item_thread::is_current()
    }
}
