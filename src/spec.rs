//! Parsing a job spec at the edge: JSON in, a validated [`NewJob`] out, or a message that tells
//! the caller what to change (a 422).

use std::sync::OnceLock;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::clock::Micros;
use crate::dispatch::{route, RouteHints};
use crate::flow::{self, Concurrency, Rate, TaskFlow};
use crate::job::{JobId, Kind, NewJob, Parent};
use crate::schema;
use crate::task::Registry;

/// The fields a job spec may have.
pub const SPEC_FIELDS: &[&str] = &[
    "task",
    "kind",
    "args",
    "priority",
    "max_attempts",
    "timeout_ms",
    "delay_ms",
    "run_at",
    "idempotency_key",
    "isolate",
    "tenant",
    "concurrency",
    "rate",
    "callback_url",
    "depends_on",
    "run_on_parent_failure",
];

/// The most parents one job may name.
pub const MAX_PARENTS: usize = 1000;

pub const MAX_DELAY_MS: u64 = 366 * 24 * 3600 * 1000;
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// The JSON Schema of a spec's fields (unknown fields are checked separately, to name them all).
pub fn spec_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "task": {"type": "string", "minLength": 1, "maxLength": 200},
            "kind": {"type": "string", "enum": ["io", "cpu"]},
            "args": {"type": "object"},
            "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
            "timeout_ms": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS},
            "delay_ms": {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_MS},
            "run_at": {"type": "string", "minLength": 1, "maxLength": 64},
            "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 255},
            "isolate": {"type": "boolean"},
            "tenant": {"type": "string", "minLength": 1, "maxLength": flow::MAX_NAME_CHARS},
            "concurrency": {
                "type": "object",
                "properties": {
                    "key": {"type": "string", "minLength": 1, "maxLength": flow::MAX_NAME_CHARS},
                    "limit": {"type": "integer", "minimum": 1, "maximum": flow::MAX_LIMIT}
                },
                "required": ["key", "limit"],
                "additionalProperties": false
            },
            "rate": {
                "type": "object",
                "properties": {
                    "key": {"type": "string", "minLength": 1, "maxLength": flow::MAX_NAME_CHARS},
                    "per_second": {"type": "number", "exclusiveMinimum": 0,
                                   "maximum": flow::MAX_PER_SECOND},
                    "burst": {"type": "integer", "minimum": 1, "maximum": flow::MAX_BURST}
                },
                "required": ["key", "per_second"],
                "additionalProperties": false
            },
            "callback_url": {"type": "string", "minLength": 1, "maxLength": 2048},
            "depends_on": {
                "type": "array", "maxItems": MAX_PARENTS,
                "items": {"type": "string", "minLength": 1, "maxLength": 64}
            },
            "run_on_parent_failure": {"type": "boolean"}
        },
        "required": ["task"]
    })
}

/// `path.name`, or just `name` at the top of a single spec.
fn field(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// How the spec itself is named in a message.
fn whole(path: &str) -> &str {
    if path.is_empty() {
        "body"
    } else {
        path
    }
}

/// Writes every number with no fractional part (`384.0`) as the integer it is (`384`).
///
/// JSON has one number type, and JSON Schema counts `384.0` as an `integer`, so a client (or a
/// language whose JSON encoder writes floats) may send either; serde_json keeps them apart, and
/// `as_u64` would not read `384.0`. Normalising once here, args included, means the schema check,
/// the fields read below, the idempotency hash and the tasks all see the same value. Numbers
/// past what an i64 or u64 holds stay as they are (and fail any bounded `integer` check).
fn integral_numbers_as_integers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // 2^63 and 2^64: the first values the casts below could not hold exactly.
            const I64_END: f64 = 9_223_372_036_854_775_808.0;
            const U64_END: f64 = 18_446_744_073_709_551_616.0;
            if f.fract() == 0.0 && (-I64_END..I64_END).contains(&f) {
                *value = Value::from(f as i64);
            } else if f.fract() == 0.0 && (0.0..U64_END).contains(&f) {
                *value = Value::from(f as u64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        Value::Object(map) => map.values_mut().for_each(integral_numbers_as_integers),
        _ => {}
    }
}

/// What the server fills in when a spec leaves it out, and what it allows.
#[derive(Clone, Debug)]
pub struct SpecDefaults {
    pub max_attempts: u32,
    /// Cpu jobs naming a blob at least this large run in worker processes.
    pub process_threshold: u64,
    /// Flow control per task, for specs that give none (`[task_flow.<task>]` in the config).
    pub task_flow: std::sync::Arc<std::collections::BTreeMap<String, TaskFlow>>,
    /// The address rules a `callback_url` must pass (those of `http_get`); `None` when the
    /// server has no `--callback-secret`, which refuses every `callback_url`: a callback is
    /// always signed.
    pub callbacks: Option<std::sync::Arc<crate::task::AddressRules>>,
}

/// The sizes of the blobs a submit names, by canonical id, looked up before parsing (a blob
/// that is missing here does not exist).
pub type BlobSizes = std::collections::HashMap<String, u64>;

/// Looks up the blobs the specs name (their tasks' blob arguments), so that parsing can check
/// that each exists and fits its job, and route the job by its size. Unknown tasks and
/// malformed ids are left for parsing to name.
pub async fn blob_sizes(
    store: &dyn crate::store::JobStore,
    registry: &Registry,
    specs: &[&Value],
) -> Result<BlobSizes, crate::store::StoreError> {
    let mut sizes = BlobSizes::new();
    for spec in specs {
        let Some(task) = spec
            .get("task")
            .and_then(Value::as_str)
            .and_then(|t| registry.get(t))
        else {
            continue;
        };
        for arg in task.blob_args() {
            let Some(id) = spec
                .get("args")
                .and_then(|a| a.get(*arg))
                .and_then(Value::as_str)
                .and_then(crate::blob::canonical_id)
            else {
                continue;
            };
            if sizes.contains_key(&id) {
                continue;
            }
            if let Some(meta) = store.get_blob(&id).await? {
                sizes.insert(id, meta.size);
            }
        }
    }
    Ok(sizes)
}

/// Parses one spec. `path` prefixes error messages (`jobs[3]` in a batch, empty for one spec); `header_key` is the
/// `Idempotency-Key` header, if any.
pub fn parse(
    value: &Value,
    path: &str,
    header_key: Option<&str>,
    registry: &Registry,
    defaults: &SpecDefaults,
    blob_sizes: &BlobSizes,
    now: Micros,
) -> Result<NewJob, String> {
    let mut value = value.clone();
    integral_numbers_as_integers(&mut value);
    let value = &value;
    let Some(obj) = value.as_object() else {
        return Err(format!("{}: a job spec must be a JSON object", whole(path)));
    };
    let unknown: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| !SPEC_FIELDS.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "{}: unknown field{} {}; a job spec takes {}",
            whole(path),
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            SPEC_FIELDS.join(", ")
        ));
    }
    static SPEC_SCHEMA: OnceLock<Value> = OnceLock::new();
    let s = SPEC_SCHEMA.get_or_init(spec_schema);
    schema::validate(value, s, s, path)?;

    let name = obj["task"].as_str().unwrap_or_default();
    let task = registry.get(name).ok_or_else(|| {
        format!(
            "{}: unknown task `{name}`; GET /v1/tasks lists them: {}",
            field(path, "task"),
            registry.names().join(", ")
        )
    })?;
    let kind = match obj.get("kind").and_then(Value::as_str) {
        Some(k) => k.parse::<Kind>()?,
        None => task.kinds()[0],
    };
    if !task.kinds().contains(&kind) {
        let kinds: Vec<&str> = task.kinds().iter().map(|k| k.as_str()).collect();
        return Err(format!(
            "{}: task `{name}` cannot run as {}; it runs as {}",
            field(path, "kind"),
            kind.as_str(),
            kinds.join(" or ")
        ));
    }
    let isolate = obj.get("isolate").and_then(Value::as_bool).unwrap_or(false);

    let mut args = obj.get("args").cloned().unwrap_or_else(|| json!({}));
    let args_schema = registry.schema(name).expect("registered with its task");
    schema::validate(&args, args_schema, args_schema, &field(path, "args"))?;
    task.check_args(&args)
        .map_err(|e| format!("{}: {e}", whole(path)))?;
    // Blob ids in their one canonical form (lowercase, hyphenated), so that the same blob is
    // the same string in the job's args, in the store, and on disk.
    let mut named: Vec<(&str, String)> = Vec::new();
    for arg in task.blob_args() {
        let Some(slot) = args.get_mut(*arg) else {
            continue;
        };
        let Some(raw) = slot.as_str() else {
            continue;
        };
        let id = crate::blob::canonical_id(raw).ok_or_else(|| {
            format!(
                "{}: `{raw}` is not a blob id (a UUID from POST /v1/blobs)",
                field(path, &format!("args.{arg}"))
            )
        })?;
        *slot = Value::String(id.clone());
        named.push((arg, id));
    }
    let mut largest_blob = None;
    for (arg, id) in &named {
        let size = *blob_sizes.get(id).ok_or_else(|| {
            format!(
                "{}: no blob has the id `{id}`; upload it to POST /v1/blobs first",
                field(path, &format!("args.{arg}"))
            )
        })?;
        task.check_blob(&args, size)
            .map_err(|e| format!("{}: {e}", whole(path)))?;
        largest_blob = largest_blob.max(Some(size));
    }
    let blobs: Vec<String> = named.into_iter().map(|(_, id)| id).collect();
    // Routed once, here, with everything that decides the lane.
    let hints = RouteHints {
        isolate,
        largest_blob,
        process_threshold: defaults.process_threshold,
    };
    let executor =
        route(task.as_ref(), kind, hints).map_err(|e| format!("{}: {e}", whole(path)))?;

    let delay = obj.get("delay_ms").and_then(Value::as_u64);
    let scheduled_at = match (obj.get("run_at").and_then(Value::as_str), delay) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{}: give either `delay_ms` or `run_at`, not both",
                whole(path)
            ))
        }
        (Some(t), None) => {
            Micros::parse_rfc3339(t).map_err(|e| format!("{}: {e}", field(path, "run_at")))?
        }
        (None, Some(ms)) => now.plus(std::time::Duration::from_millis(ms)),
        (None, None) => now,
    };

    let body_key = obj.get("idempotency_key").and_then(Value::as_str);
    let idempotency_key = match (body_key, header_key) {
        (Some(b), Some(h)) if b != h => {
            return Err(format!(
                "{}: differs from the Idempotency-Key header; send one",
                field(path, "idempotency_key")
            ))
        }
        (Some(k), _) | (None, Some(k)) => Some(k.to_string()),
        (None, None) => None,
    };
    if let Some(k) = &idempotency_key {
        // Characters, as the schema's maxLength counts them, not bytes.
        if k.is_empty() || k.chars().count() > 255 {
            return Err(format!(
                "{}: an idempotency key must be 1 to 255 characters long",
                whole(path)
            ));
        }
    }
    let spec_hash = idempotency_key.as_ref().map(|_| {
        // serde_json's maps are sorted, so this text is the same for the same spec however
        // its keys were ordered. The key itself is left out: body or header, same request.
        let mut canonical = obj.clone();
        canonical.remove("idempotency_key");
        let digest = Sha256::digest(Value::Object(canonical).to_string().as_bytes());
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });

    let (tenant, concurrency, rate) = flow_fields(obj, name, path, defaults)?;
    let callback_url = match obj.get("callback_url").and_then(Value::as_str) {
        None => None,
        Some(raw) => {
            let name = field(path, "callback_url");
            let rules = defaults.callbacks.as_ref().ok_or_else(|| {
                format!(
                    "{name}: this server sends no callbacks: it needs a secret to sign them \
                     (--callback-secret or OFFLOAD_CALLBACK_SECRET)"
                )
            })?;
            Some(rules.check(&name, raw)?.to_string())
        }
    };
    let mut depends_on: Vec<Parent> = Vec::new();
    for raw in obj
        .get("depends_on")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let raw = raw.as_str().unwrap_or_default();
        let parent = match raw.strip_prefix('#') {
            Some(_) if path.is_empty() => {
                return Err(format!(
                    "{}: `{raw}` names a spec of a batch; a single job names stored jobs by \
                     id (submit the graph to POST /v1/jobs/batch)",
                    field(path, "depends_on")
                ));
            }
            Some(n) => n.parse::<usize>().map(Parent::Batch).map_err(|_| {
                format!(
                    "{}: `{raw}` is neither a job id nor `#i`, the i-th spec of this batch",
                    field(path, "depends_on")
                )
            })?,
            None => raw
                .parse::<JobId>()
                .ok()
                .filter(|_| raw.len() == 36)
                .map(Parent::Job)
                .ok_or_else(|| {
                    format!(
                        "{}: `{raw}` is neither a job id nor `#i`, the i-th spec of a batch",
                        field(path, "depends_on")
                    )
                })?,
        };
        if !depends_on.contains(&parent) {
            depends_on.push(parent);
        }
    }
    let run_on_parent_failure = obj
        .get("run_on_parent_failure")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    Ok(NewJob {
        depends_on,
        run_on_parent_failure,
        id: JobId::new(),
        task: name.to_string(),
        kind,
        executor,
        args,
        priority: obj.get("priority").and_then(Value::as_i64).unwrap_or(0) as i32,
        max_attempts: obj
            .get("max_attempts")
            .and_then(Value::as_u64)
            .map(|n| n as u32)
            .unwrap_or(defaults.max_attempts),
        timeout_ms: obj.get("timeout_ms").and_then(Value::as_u64),
        created_at: now,
        scheduled_at,
        idempotency_key,
        spec_hash,
        blobs,
        tenant,
        concurrency,
        rate,
        callback_url,
    })
}

/// Checks a batch's `"#i"` references: each names another spec of the batch, and no chain of
/// them leads back to where it started (a cycle would wait for ever). Answers the message of a
/// 422.
pub fn check_batch_parents(jobs: &[NewJob]) -> Result<(), String> {
    for (i, job) in jobs.iter().enumerate() {
        for p in &job.depends_on {
            match *p {
                Parent::Batch(j) if j == i => {
                    return Err(format!("jobs[{i}].depends_on: `#{j}` is the spec itself"))
                }
                Parent::Batch(j) if j >= jobs.len() => {
                    return Err(format!(
                        "jobs[{i}].depends_on: `#{j}` names no spec; the batch has {}",
                        jobs.len()
                    ))
                }
                _ => {}
            }
        }
    }
    // Kahn's algorithm: a spec is placed once every spec it names is; what cannot be placed
    // is on a cycle or waits for one.
    let mut left: Vec<usize> = jobs
        .iter()
        .map(|j| {
            j.depends_on
                .iter()
                .filter(|p| matches!(p, Parent::Batch(_)))
                .count()
        })
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (i, job) in jobs.iter().enumerate() {
        for p in &job.depends_on {
            if let Parent::Batch(j) = *p {
                children[j].push(i);
            }
        }
    }
    let mut ready: Vec<usize> = (0..jobs.len()).filter(|&i| left[i] == 0).collect();
    let mut placed = 0;
    while let Some(i) = ready.pop() {
        placed += 1;
        for &c in &children[i] {
            left[c] -= 1;
            if left[c] == 0 {
                ready.push(c);
            }
        }
    }
    if placed < jobs.len() {
        let stuck: Vec<String> = (0..jobs.len())
            .filter(|&i| left[i] > 0)
            .map(|i| format!("#{i}"))
            .collect();
        return Err(format!(
            "jobs: the `depends_on` of {} make a cycle (or wait for one); a job can only wait \
             for jobs that do not wait for it",
            stuck.join(", ")
        ));
    }
    Ok(())
}

/// A spec's tenant, concurrency key and rate (the task's config defaults where the spec
/// gives none). The schema has checked their types and bounds; what it cannot say is said
/// here.
#[allow(clippy::type_complexity)]
fn flow_fields(
    obj: &serde_json::Map<String, Value>,
    task: &str,
    path: &str,
    defaults: &SpecDefaults,
) -> Result<(Option<String>, Option<Concurrency>, Option<Rate>), String> {
    let text = |v: &Value, name: &str| -> Result<String, String> {
        let s = v.as_str().unwrap_or_default();
        // Characters, as the schema's maxLength counts them, and no control characters: a
        // key is shown in metrics labels and logs.
        if s.chars().any(char::is_control) {
            return Err(format!(
                "{}: must not hold control characters",
                field(path, name)
            ));
        }
        Ok(s.to_string())
    };
    let tenant = obj.get("tenant").map(|t| text(t, "tenant")).transpose()?;
    let task_flow = defaults.task_flow.get(task);
    let concurrency = match obj.get("concurrency") {
        Some(c) => Some(Concurrency {
            key: text(&c["key"], "concurrency.key")?,
            limit: c["limit"].as_u64().unwrap_or(1) as u32,
        }),
        None => task_flow.and_then(|f| f.concurrency_for(task)),
    };
    let rate = match obj.get("rate") {
        Some(r) => {
            let rate = Rate {
                key: text(&r["key"], "rate.key")?,
                per_second: r["per_second"].as_f64().unwrap_or(0.0),
                burst: r.get("burst").and_then(Value::as_u64).unwrap_or(1) as u32,
            };
            flow::check_rate(rate.per_second, rate.burst)
                .map_err(|e| format!("{}: {e}", field(path, "rate")))?;
            Some(rate)
        }
        None => task_flow.and_then(|f| f.rate_for(task)),
    };
    Ok((tenant, concurrency, rate))
}
