//! Schedules: a cron expression, read in a time zone, that makes a job at each of its ticks.
//!
//! - this file: the schedule as stored ([`Schedule`]), its [`Timetable`] (the cron expression
//!   by `croner`, the time zone by `jiff` from the system's tz database), which due ticks a
//!   wake-up fires ([`pick`], the `catch_up` policy), and a `POST /v1/schedules` body parsed
//!   into a schedule (the 422s live here).
//! - [`ticker`]: the task that wakes at the next due tick and fires it, exactly once across
//!   every server on one database.
//!
//! **Exactly once per tick.** A tick's job carries the idempotency key
//! `schedule:<name>:<tick µs>` ([`tick_key`]) and is stored in the same transaction that moves
//! the schedule's `next_run` on, guarded by the `next_run` the ticker read
//! ([`crate::store::Fire`]): two servers firing the same tick race for one row, and the loser
//! changes nothing; a key already stored (a restart between the commit and the answer) is not
//! stored again.
//!
//! **Time zones and DST.** Ticks are computed on the wall clock of the schedule's time zone
//! (default UTC) and stored as instants. Where a wall-clock time does not exist (spring
//! forward), a fixed-time schedule (`30 2 * * *`) fires at the first moment after the gap that
//! day and an interval schedule (`*/15 * * * *`) skips the ticks in the gap; where a time
//! happens twice (fall back), a fixed-time schedule fires once, at the first, and an interval
//! schedule fires in both passes (croner's rules, after Vixie cron and OCPS).

pub mod ticker;

use std::str::FromStr;
use std::time::Duration;

use croner::parser::{CronParser, Seconds};
use croner::Cron;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::clock::Micros;
use crate::spec::{self, BlobSizes, SpecDefaults};
use crate::task::Registry;

/// The fields a `POST /v1/schedules` body may have.
pub const SCHEDULE_FIELDS: &[&str] = &["name", "cron", "timezone", "job", "catch_up"];
/// The longest schedule name.
pub const NAME_MAX: usize = 100;
/// Most jobs one wake-up makes for one schedule under `catch_up: all` (the newest missed
/// ticks; older ones are skipped).
pub const MAX_CATCH_UP: usize = 1000;
/// How many upcoming ticks `GET /v1/schedules/{name}` shows.
pub const NEXT_RUNS: usize = 5;
/// How many of its latest jobs `GET /v1/schedules/{name}` shows.
pub const RECENT_JOBS: u32 = 10;

/// What a wake-up does with ticks that were missed: due for longer than the grace
/// (`--schedule-grace-ms`), because every server was down or stalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Skip them; go on at the next tick.
    None,
    /// One job for all of them (for the latest).
    One,
    /// One job for each (at most [`MAX_CATCH_UP`]).
    All,
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::One => "one",
            CatchUp::All => "all",
        }
    }
}

impl FromStr for CatchUp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CatchUp::None),
            "one" => Ok(CatchUp::One),
            "all" => Ok(CatchUp::All),
            other => Err(format!("catch_up: `{other}` is not one of none, one, all")),
        }
    }
}

/// A schedule as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub name: String,
    /// The cron expression as given (validated).
    pub cron: String,
    /// The IANA name of the time zone its cron expression is read in.
    pub timezone: String,
    /// The job spec each tick submits, as given (validated when created, parsed again at each
    /// tick, so a tick sees the catalogue as it is then).
    pub job: Value,
    pub catch_up: CatchUp,
    pub paused: bool,
    /// The next tick due. While paused it keeps its old value; a resume sets it to the first
    /// tick after the resume (the ticks of the pause are not caught up).
    pub next_run: Micros,
    /// The latest tick a job was made for.
    pub last_tick: Option<Micros>,
    /// Why the latest wake-up made no job (its spec no longer valid); cleared by the next job.
    pub last_error: Option<String>,
    pub created_at: Micros,
    pub updated_at: Micros,
}

impl Schedule {
    pub fn timetable(&self) -> Result<Timetable, String> {
        Timetable::new(&self.cron, &self.timezone)
    }
}

/// The idempotency key of the job a schedule makes for one tick: unique per schedule and tick.
pub fn tick_key(name: &str, tick: Micros) -> String {
    format!("schedule:{name}:{}", tick.0)
}

/// The range of idempotency keys of a schedule's jobs: `[from, to)` in byte order. Names
/// hold no `:`, so no other schedule's keys fall in it; ticks are 16-digit microsecond counts
/// (2001 to 2286), so byte order is tick order.
pub fn key_range(name: &str) -> (String, String) {
    (format!("schedule:{name}:"), format!("schedule:{name};"))
}

/// A cron expression in a time zone: when its ticks fall.
#[derive(Clone, Debug)]
pub struct Timetable {
    cron: Cron,
    tz: TimeZone,
}

/// Ticks are whole seconds: the instant `t` rounded down to one.
fn second_of(t: Micros) -> Micros {
    Micros(t.0.div_euclid(1_000_000) * 1_000_000)
}

impl Timetable {
    pub fn new(cron: &str, timezone: &str) -> Result<Self, String> {
        Ok(Timetable {
            cron: parse_cron(cron)?,
            tz: parse_timezone(timezone)?,
        })
    }

    fn zoned(&self, t: Micros) -> Option<Zoned> {
        Some(
            Timestamp::from_microsecond(second_of(t).0)
                .ok()?
                .to_zoned(self.tz.clone()),
        )
    }

    /// The first tick strictly after `t`; `None` if there is none (before the year 5000).
    pub fn next_after(&self, t: Micros) -> Option<Micros> {
        let z = self
            .cron
            .find_next_occurrence(&self.zoned(t)?, false)
            .ok()?;
        Some(Micros(z.timestamp().as_microsecond()))
    }

    /// The next `n` ticks after `t`.
    pub fn upcoming(&self, t: Micros, n: usize) -> Vec<Micros> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    out.push(next);
                    at = next;
                }
                None => break,
            }
        }
        out
    }

    /// The ticks from `from` to `now`, both included, newest first, at most `max` of them.
    pub fn due(&self, from: Micros, now: Micros, max: usize) -> Vec<Micros> {
        let mut out = Vec::new();
        let Some(mut at) = self.zoned(now) else {
            return out;
        };
        let mut inclusive = true;
        while out.len() < max {
            let Ok(tick) = self.cron.find_previous_occurrence(&at, inclusive) else {
                break;
            };
            let t = Micros(tick.timestamp().as_microsecond());
            if t < from {
                break;
            }
            out.push(t);
            at = tick;
            inclusive = false;
        }
        out
    }
}

/// Five fields (minute, hour, day of month, month, day of week), six with seconds first, or
/// a nickname such as `@hourly`.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    let nickname = fields == 1 && expr.trim().starts_with('@');
    if !(nickname || fields == 5 || fields == 6) {
        return Err(format!(
            "cron: `{expr}` has {fields} fields; give five (minute hour day-of-month month \
             day-of-week), or six with seconds first (`* * * * * *` is every second)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("cron: `{expr}` is not a cron expression: {e}"))
}

/// An IANA time zone name (`Europe/Berlin`), looked up in the system's tz database; `UTC`
/// needs none.
pub fn parse_timezone(name: &str) -> Result<TimeZone, String> {
    if name.eq_ignore_ascii_case("utc") {
        return Ok(TimeZone::UTC);
    }
    let unknown = || {
        format!(
            "timezone: `{name}` is not a time zone this server knows; give an IANA name such \
             as `Europe/Berlin` or `America/New_York`, or `UTC`"
        )
    };
    if name.is_empty() || name.len() > 100 {
        return Err(unknown());
    }
    jiff::tz::db().get(name).map_err(|_| unknown())
}

/// Which of the due ticks (`due`, newest first) a wake-up at `now` makes jobs for, oldest
/// first. A tick due for no longer than `grace` is on time and always fired; the others
/// were missed and follow `catch_up`.
pub fn pick(due: &[Micros], now: Micros, grace: Duration, catch_up: CatchUp) -> Vec<Micros> {
    let on_time_from = now.minus(grace);
    let (on_time, missed): (Vec<Micros>, Vec<Micros>) =
        due.iter().partition(|t| **t >= on_time_from);
    let mut out = match catch_up {
        CatchUp::All => due.to_vec(),
        CatchUp::None => on_time,
        CatchUp::One => on_time.into_iter().chain(missed.first().copied()).collect(),
    };
    out.sort_unstable();
    out
}

/// Parses a `POST /v1/schedules` body into a new schedule, whose first tick is the first
/// after `now`. The job spec is checked as `POST /v1/jobs` would check it (`blob_sizes`: the
/// blobs it names, looked up first).
pub fn parse_request(
    body: &Map<String, Value>,
    registry: &Registry,
    defaults: SpecDefaults,
    blob_sizes: &BlobSizes,
    now: Micros,
) -> Result<Schedule, String> {
    let unknown: Vec<String> = body
        .keys()
        .filter(|k| !SCHEDULE_FIELDS.contains(&k.as_str()))
        .map(|k| format!("`{k}`"))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "unknown field{} {}; a schedule takes {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown.join(", "),
            SCHEDULE_FIELDS.join(", ")
        ));
    }
    let text = |field: &str| -> Result<Option<&str>, String> {
        match body.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("{field}: must be a string")),
        }
    };

    let name = text("name")?.ok_or("name: required: the schedule's name")?;
    let valid_name = !name.is_empty()
        && name.len() <= NAME_MAX
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid_name {
        return Err(format!(
            "name: `{name}` must be 1 to {NAME_MAX} letters, digits, `-`, `_` or `.`, starting \
             with a letter or digit"
        ));
    }

    let cron = text("cron")?.ok_or("cron: required: e.g. `*/5 * * * *`")?;
    if cron.chars().count() > 200 {
        return Err("cron: longer than 200 characters".into());
    }
    let timezone = text("timezone")?.unwrap_or("UTC");
    let tz = parse_timezone(timezone)?;
    let timetable = Timetable {
        cron: parse_cron(cron)?,
        tz: tz.clone(),
    };
    let next_run = timetable
        .next_after(now)
        .ok_or_else(|| format!("cron: `{cron}` never matches a date from now on"))?;

    let catch_up = match text("catch_up")? {
        Some(c) => c.parse()?,
        None => CatchUp::None,
    };

    let job = body
        .get("job")
        .ok_or("job: required: a job spec, as POST /v1/jobs takes it")?;
    let Some(spec_obj) = job.as_object() else {
        return Err("job: must be a job spec object, as POST /v1/jobs takes it".into());
    };
    for (field, why) in [
        (
            "idempotency_key",
            "each tick's job gets its own key, `schedule:<name>:<tick µs>`",
        ),
        (
            "run_at",
            "each tick's job runs at its tick (`delay_ms` may follow it)",
        ),
        (
            "depends_on",
            "a tick's job starts a run of its own; it cannot wait for stored jobs",
        ),
        ("run_on_parent_failure", "a tick's job has no parents"),
    ] {
        if spec_obj.contains_key(field) {
            return Err(format!("job.{field}: not allowed in a schedule: {why}"));
        }
    }
    spec::parse(job, "job", None, registry, &defaults, blob_sizes, now)?;

    Ok(Schedule {
        name: name.to_string(),
        cron: cron.trim().to_string(),
        timezone: tz.iana_name().unwrap_or(timezone).to_string(),
        job: job.clone(),
        catch_up,
        paused: false,
        next_run,
        last_tick: None,
        last_error: None,
        created_at: now,
        updated_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Micros {
        Micros::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn every_second_and_every_five_minutes() {
        let t = Timetable::new("* * * * * *", "UTC").unwrap();
        let now = at("2026-03-01T10:00:00.300Z");
        assert_eq!(t.next_after(now), Some(at("2026-03-01T10:00:01Z")));
        assert_eq!(
            t.due(at("2026-03-01T09:59:58Z"), now, 10),
            vec![
                at("2026-03-01T10:00:00Z"),
                at("2026-03-01T09:59:59Z"),
                at("2026-03-01T09:59:58Z")
            ]
        );
        assert_eq!(t.due(at("2026-03-01T09:00:00Z"), now, 4).len(), 4);
        let t = Timetable::new("*/5 * * * *", "UTC").unwrap();
        assert_eq!(
            t.upcoming(at("2026-03-01T10:02:00Z"), 2),
            vec![at("2026-03-01T10:05:00Z"), at("2026-03-01T10:10:00Z")]
        );
    }

    #[test]
    fn a_time_zone_moves_the_ticks() {
        let t = Timetable::new("0 9 * * *", "Europe/Berlin").unwrap();
        // Winter: UTC+1.
        assert_eq!(
            t.next_after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-10T08:00:00Z"))
        );
        // Summer: UTC+2.
        assert_eq!(
            t.next_after(at("2026-07-10T00:00:00Z")),
            Some(at("2026-07-10T07:00:00Z"))
        );
    }

    #[test]
    fn a_fixed_time_in_the_spring_gap_fires_once_after_it() {
        // Europe/Berlin skips 02:00-03:00 on 2026-03-29.
        let t = Timetable::new("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            t.next_after(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-29T01:00:00Z")),
            "03:00 CEST, the first moment after the gap"
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        assert!(parse_cron("* * * *").is_err());
        assert!(parse_cron("* * * * * * *").is_err());
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("@hourly").is_ok());
        assert!(parse_timezone("Mars/Olympus").is_err());
        assert!(parse_timezone("../../etc/passwd").is_err());
        assert!(parse_timezone("utc").is_ok());
    }

    #[test]
    fn a_date_that_never_comes_has_no_next_tick() {
        let t = Timetable::new("0 0 30 2 *", "UTC").unwrap();
        assert_eq!(t.next_after(at("2026-01-01T00:00:00Z")), None);
    }

    #[test]
    fn catch_up_decides_the_missed_ticks() {
        let now = at("2026-03-01T10:00:10Z");
        let due: Vec<Micros> = (0..=10)
            .rev()
            .map(|s| at(&format!("2026-03-01T10:00:{s:02}Z")))
            .collect();
        let grace = Duration::from_secs(2);
        let none = pick(&due, now, grace, CatchUp::None);
        assert_eq!(none, due[..3].iter().rev().copied().collect::<Vec<_>>());
        let one = pick(&due, now, grace, CatchUp::One);
        assert_eq!(one.len(), 4);
        assert_eq!(one[0], at("2026-03-01T10:00:07Z"), "the latest missed tick");
        assert_eq!(pick(&due, now, grace, CatchUp::All).len(), 11);
        assert!(pick(&[], now, grace, CatchUp::One).is_empty());
    }
}
