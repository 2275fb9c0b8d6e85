//! One claim's decisions ([`ClaimPlan`]): fed the facts a store gathers, round by round, it
//! picks the candidates that start; and each lane's rotation between tenants ([`Rotation`],
//! kept by [`Sharing`] between claims).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use super::{Bucket, Concurrency, Rate};
use crate::clock::Micros;
use crate::job::{ExecutorKind, JobId};

/// Most tenants one claim looks at; with more waiting in a lane, successive claims take the
/// next ones in turn (the store keeps a cursor in [`Rotation`]).
pub const MAX_TENANTS: usize = 64;
/// Most candidate pages one claim fetches: after the first, a round looks again past the keys
/// that held candidates back (no head-of-line blocking) and past full pages.
pub const MAX_ROUNDS: usize = 4;
/// When a lane looks again after a claim found a key another server was deciding on.
const CONTENDED_RETRY_MS: i64 = 20;
/// When a lane looks again after a claim ran out of rounds with keys still blocking pages.
const ROUNDS_OUT_RETRY_MS: i64 = 50;

/// A due queued job as a claim sees it: what the policy needs, not the whole row.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: JobId,
    /// `""` for jobs without a tenant (they share as one tenant).
    pub tenant: String,
    pub priority: i32,
    pub scheduled_at: Micros,
    pub concurrency: Option<Concurrency>,
    pub rate: Option<Rate>,
}

/// Which candidates a page holds: the jobs without flow control (`Plain`, from the lane's
/// plain index), or the flow-controlled jobs of one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    Plain,
    Tenant(String),
}

/// One page of candidates: a group's first due jobs in claim order (priority, then schedule),
/// up to the page size.
#[derive(Debug)]
pub struct Page {
    pub group: Group,
    pub rows: Vec<Candidate>,
    /// The page has as many rows as asked for: the group may have more.
    pub full: bool,
}

/// What a round of a claim fetches.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub plain: bool,
    pub tenants: Vec<String>,
}

impl Round {
    pub fn groups(&self) -> usize {
        self.tenants.len() + usize::from(self.plain)
    }
}

/// The weights of tenants (default 1) and, per lane, the rotation the claims keep.
#[derive(Debug, Default)]
pub struct Sharing {
    weights: HashMap<String, u32>,
    // A std Mutex: taken for a moment at the start and the end of a claim, never across an
    // await (a claim takes its lane's rotation out and puts it back).
    lanes: Mutex<HashMap<ExecutorKind, Rotation>>,
}

impl Sharing {
    pub fn new(weights: impl IntoIterator<Item = (String, u32)>) -> Self {
        Sharing {
            weights: weights.into_iter().collect(),
            lanes: Mutex::default(),
        }
    }

    pub fn weight(&self, tenant: &str) -> u32 {
        self.weights.get(tenant).copied().unwrap_or(1).max(1)
    }

    /// The lane's rotation, for the length of one claim (a lane claims one at a time).
    pub fn take(&self, lane: ExecutorKind) -> Rotation {
        self.lanes
            .lock()
            .expect("rotation lock")
            .remove(&lane)
            .unwrap_or_default()
    }

    pub fn put(&self, lane: ExecutorKind, rotation: Rotation) {
        self.lanes
            .lock()
            .expect("rotation lock")
            .insert(lane, rotation);
    }
}

/// A lane's round-robin state between claims: how much each tenant has been served (in
/// claimed jobs over its weight), and where the next claim's scan of tenants starts.
#[derive(Clone, Debug, Default)]
pub struct Rotation {
    served: HashMap<String, f64>,
    /// The last tenant a full scan ended at: the next claim starts after it.
    pub cursor: Option<String>,
}

impl Rotation {
    fn served(&self, tenant: &str) -> f64 {
        self.served.get(tenant).copied().unwrap_or(0.0)
    }

    /// Tenants not served lately join at the current least-served mark, so a newcomer gets
    /// its turn at once but no credit for the time it was away.
    fn enter<'a>(&mut self, tenants: impl Iterator<Item = &'a String> + Clone) {
        let floor = tenants
            .clone()
            .filter_map(|t| self.served.get(t))
            .copied()
            .reduce(f64::min)
            .unwrap_or(0.0);
        for t in tenants {
            self.served.entry(t.clone()).or_insert(floor);
        }
    }

    /// Forgets tenants the claim did not see, and keeps the numbers small.
    fn keep_only(&mut self, seen: &HashSet<String>) {
        self.served.retain(|t, _| seen.contains(t));
        let floor = self
            .served
            .values()
            .copied()
            .reduce(f64::min)
            .unwrap_or(0.0);
        for v in self.served.values_mut() {
            *v -= floor;
        }
    }
}

/// One claim's decisions: fed the facts round by round, it picks the candidates that start.
#[derive(Debug)]
pub struct ClaimPlan {
    limit: usize,
    now: Micros,
    picked: Vec<JobId>,
    /// Running jobs per concurrency key looked up, plus this claim's picks.
    running: HashMap<String, u32>,
    /// Concurrency keys and rate keys another server is deciding on now: not claimed here
    /// this time.
    busy: HashSet<(KeyKind, String)>,
    /// Rate keys looked up: the stored bucket (`None`: none stored, a full one).
    stored: HashMap<String, Option<Bucket>>,
    /// Buckets of rate keys as refilled at `now` (on the store's clock), less this claim's
    /// picks.
    buckets: HashMap<String, Bucket>,
    /// The store's clock less this process's (see [`super::FlowState::skew_us`]).
    skew_us: i64,
    /// This claim's picks per rate key, to write the buckets back for what was claimed.
    taken: HashMap<String, (Bucket, Vec<JobId>)>,
    blocked: HashSet<(KeyKind, String)>,
    full: Vec<Group>,
    seen_tenants: HashSet<String>,
    next_token: Option<Micros>,
    contended: bool,
    /// Claimable jobs may be left unexamined (a page cut at a priority, or rounds ran out).
    more: bool,
    blocked_more: bool,
}

/// Which kind of key a lock or a block is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    Concurrency,
    Rate,
}

impl ClaimPlan {
    pub fn new(limit: usize, now: Micros) -> Self {
        ClaimPlan {
            limit,
            now,
            picked: Vec::new(),
            running: HashMap::new(),
            busy: HashSet::new(),
            stored: HashMap::new(),
            buckets: HashMap::new(),
            skew_us: 0,
            taken: HashMap::new(),
            blocked: HashSet::new(),
            full: Vec::new(),
            seen_tenants: HashSet::new(),
            next_token: None,
            contended: false,
            more: false,
            blocked_more: false,
        }
    }

    pub fn now(&self) -> Micros {
        self.now
    }

    /// Moves the claim's time on to `now` (never back): the time its picks start at.
    pub fn restamp(&mut self, now: Micros) {
        self.now = Micros(self.now.0.max(now.0));
    }

    /// Rows to fetch per group: enough that each group can take its share of the claim
    /// twice over, and a single group the whole claim.
    pub fn page_size(&self, groups: usize) -> usize {
        let left = self.limit.saturating_sub(self.picked.len()).max(1);
        if groups <= 1 {
            return left;
        }
        (2 * left.div_ceil(groups)).clamp(8.min(left), left)
    }

    /// The keys among `pages` this claim has not looked up yet, sorted, each once.
    pub fn unknown_keys(&self, pages: &[Page]) -> Vec<(KeyKind, String)> {
        let mut keys: Vec<(KeyKind, String)> = pages
            .iter()
            .flat_map(|p| &p.rows)
            .flat_map(|c| {
                let conc = c
                    .concurrency
                    .as_ref()
                    .map(|k| (KeyKind::Concurrency, k.key.clone()));
                let rate = c.rate.as_ref().map(|r| (KeyKind::Rate, r.key.clone()));
                conc.into_iter().chain(rate)
            })
            .filter(|(kind, key)| !self.known(*kind, key))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn known(&self, kind: KeyKind, key: &str) -> bool {
        self.busy.contains(&(kind, key.to_string()))
            || match kind {
                KeyKind::Concurrency => self.running.contains_key(key),
                KeyKind::Rate => self.stored.contains_key(key),
            }
    }

    /// What a store looked up for `keys` (under their locks): running jobs per concurrency
    /// key, stored buckets per rate key, and its clock's skew.
    pub fn learn(&mut self, keys: &[(KeyKind, String)], state: &super::FlowState) {
        self.set_skew(state.skew_us);
        for (kind, key) in keys {
            match kind {
                KeyKind::Concurrency => {
                    let n = state.running.get(key).copied().unwrap_or(0);
                    self.set_running(key.clone(), n);
                }
                KeyKind::Rate => self.set_bucket(key.clone(), state.buckets.get(key).copied()),
            }
        }
    }

    /// How many jobs of a concurrency key run (looked up under its lock).
    pub fn set_running(&mut self, key: String, n: u32) {
        self.running.insert(key, n);
    }

    /// A rate key's stored bucket (looked up under its lock); `None`: none is stored.
    pub fn set_bucket(&mut self, key: String, bucket: Option<Bucket>) {
        self.stored.insert(key, bucket);
    }

    /// The store's clock less this process's, as read with the buckets: buckets refill and
    /// are stored by the store's clock. A lookup that read no bucket (`None`) leaves the last
    /// reading: the buckets this claim already holds are on the store's clock.
    pub fn set_skew(&mut self, skew_us: Option<i64>) {
        if let Some(s) = skew_us {
            self.skew_us = s;
        }
    }

    /// A key another server is deciding on: its jobs wait for a later claim.
    pub fn set_busy(&mut self, kind: KeyKind, key: String) {
        self.busy.insert((kind, key));
    }

    /// Picks from `pages` (the facts for their keys already given), tenants in weighted
    /// round-robin at each priority, until the claim is full or the candidates run out.
    pub fn choose(&mut self, pages: Vec<Page>, rotation: &mut Rotation, sharing: &Sharing) {
        // A full page may hide more of its group's jobs at its last row's priority or lower:
        // nothing below the highest such priority may start before they are seen.
        let frontier = pages
            .iter()
            .filter(|p| p.full)
            .filter_map(|p| p.rows.last().map(|c| c.priority))
            .max();
        self.full = pages
            .iter()
            .filter(|p| p.full)
            .map(|p| p.group.clone())
            .collect();
        let mut queues: BTreeMap<String, VecDeque<Candidate>> = BTreeMap::new();
        for page in pages {
            for c in page.rows {
                if frontier.is_some_and(|f| c.priority < f) {
                    self.more = true;
                    continue;
                }
                queues.entry(c.tenant.clone()).or_default().push_back(c);
            }
        }
        for q in queues.values_mut() {
            q.make_contiguous().sort_by_key(order);
        }
        self.seen_tenants.extend(queues.keys().cloned());
        rotation.enter(queues.keys());
        while self.picked.len() < self.limit {
            let Some(top) = queues
                .values()
                .filter_map(|q| q.front())
                .map(|c| c.priority)
                .max()
            else {
                break;
            };
            let tenant = queues
                .iter()
                .filter_map(|(t, q)| q.front().filter(|c| c.priority == top).map(|c| (t, c)))
                .min_by(|(ta, a), (tb, b)| {
                    rotation
                        .served(ta)
                        .total_cmp(&rotation.served(tb))
                        .then_with(|| order(a).cmp(&order(b)))
                })
                .map(|(t, _)| t.clone())
                .expect("a queue has the top priority at its head");
            let queue = queues.get_mut(&tenant).expect("the tenant's queue");
            let c = queue.pop_front().expect("a head");
            if queue.is_empty() {
                queues.remove(&tenant);
            }
            if self.admit(&c) {
                self.picked.push(c.id);
                let w = sharing.weight(&tenant) as f64;
                *rotation.served.entry(tenant).or_insert(0.0) += 1.0 / w;
            }
        }
    }

    /// Whether `c` fits its key's limit and its rate key has a token; if so, counts it.
    fn admit(&mut self, c: &Candidate) -> bool {
        if let Some(k) = &c.concurrency {
            let id = (KeyKind::Concurrency, k.key.clone());
            if self.busy.contains(&id) {
                self.contended = true;
                self.blocked.insert(id);
                return false;
            }
            if self.running.get(&k.key).copied().unwrap_or(0) >= k.limit {
                self.blocked.insert(id);
                return false;
            }
        }
        if let Some(r) = &c.rate {
            let id = (KeyKind::Rate, r.key.clone());
            if self.busy.contains(&id) {
                self.contended = true;
                self.blocked.insert(id);
                return false;
            }
            let now = Micros(self.now.0.saturating_add(self.skew_us));
            let stored = self.stored.get(&r.key).copied().flatten();
            let bucket = *self.buckets.entry(r.key.clone()).or_insert_with(|| {
                stored.map_or_else(|| Bucket::full(r, now), |b| b.refilled(r, now))
            });
            if !bucket.has_token() {
                let at = Micros(bucket.next_token(r).0.saturating_sub(self.skew_us));
                self.next_token = Some(self.next_token.map_or(at, |t| t.min(at)));
                self.blocked.insert(id);
                return false;
            }
            self.taken
                .entry(r.key.clone())
                .or_insert((bucket, Vec::new()))
                .1
                .push(c.id);
            self.buckets.get_mut(&r.key).expect("just set").tokens -= 1.0;
        }
        if let Some(k) = &c.concurrency {
            *self.running.entry(k.key.clone()).or_insert(0) += 1;
        }
        true
    }

    pub fn picked(&self) -> &[JobId] {
        &self.picked
    }

    /// Keys whose jobs later rounds skip: held back in this claim, or busy elsewhere.
    pub fn excluded(&self, kind: KeyKind) -> Vec<String> {
        let mut keys: Vec<String> = self
            .blocked
            .iter()
            .chain(&self.busy)
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// What the next round fetches, if one may find more: the groups whose page was full.
    pub fn next_round(&self) -> Option<Round> {
        if self.picked.len() >= self.limit || self.full.is_empty() {
            return None;
        }
        let mut round = Round::default();
        for g in &self.full {
            match g {
                Group::Plain => round.plain = true,
                Group::Tenant(t) => round.tenants.push(t.clone()),
            }
        }
        Some(round)
    }

    /// The claim stops with rounds still to go: unexamined jobs may be claimable.
    pub fn out_of_rounds(&mut self) {
        if self.next_round().is_some() {
            if self.blocked.is_empty() {
                self.more = true;
            } else {
                self.blocked_more = true;
            }
        }
    }

    /// The buckets to store for the rate keys of the jobs that were claimed.
    pub fn buckets_after(&self, claimed: &HashSet<JobId>) -> Vec<(String, Bucket)> {
        let mut out: Vec<(String, Bucket)> = self
            .taken
            .iter()
            .filter_map(|(key, (base, ids))| {
                let n = ids.iter().filter(|id| claimed.contains(id)).count();
                (n > 0).then(|| {
                    (
                        key.clone(),
                        Bucket {
                            tokens: base.tokens - n as f64,
                            at: base.at,
                        },
                    )
                })
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// When the lane should look again as far as flow control knows (the store adds its next
    /// scheduled job): at once if jobs were left unexamined; soon if another server held a
    /// key; when the first empty bucket holds a token. Jobs held by a concurrency key need no
    /// time: the store announces a keyed job's end, which wakes the lane.
    pub fn next_due(&self) -> Option<Micros> {
        let mut at = self.next_token;
        let mut soon = |t: Micros| at = Some(at.map_or(t, |a: Micros| a.min(t)));
        if self.more {
            soon(self.now);
        }
        if self.contended {
            soon(Micros(self.now.0 + CONTENDED_RETRY_MS * 1000));
        }
        if self.blocked_more {
            soon(Micros(self.now.0 + ROUNDS_OUT_RETRY_MS * 1000));
        }
        at
    }

    /// Ends the claim: the rotation forgets tenants this claim did not see.
    pub fn finish(&self, rotation: &mut Rotation) {
        rotation.keep_only(&self.seen_tenants);
    }
}

/// Claim order: higher priority first, then earlier schedule, then id.
fn order(c: &Candidate) -> (std::cmp::Reverse<i32>, Micros, JobId) {
    (std::cmp::Reverse(c.priority), c.scheduled_at, c.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cand(
        tenant: &str,
        priority: i32,
        conc: Option<(&str, u32)>,
        rate: Option<&Rate>,
    ) -> Candidate {
        Candidate {
            id: JobId::new(),
            tenant: tenant.into(),
            priority,
            scheduled_at: Micros(1),
            concurrency: conc.map(|(k, l)| Concurrency {
                key: k.into(),
                limit: l,
            }),
            rate: rate.cloned(),
        }
    }

    fn page(tenant: &str, rows: Vec<Candidate>) -> Page {
        Page {
            group: Group::Tenant(tenant.into()),
            rows,
            full: false,
        }
    }

    #[test]
    fn a_key_at_its_limit_holds_its_jobs_back_but_not_the_jobs_behind_them() {
        let mut plan = ClaimPlan::new(10, Micros(1));
        plan.set_running("k".into(), 1);
        let blocked = cand("", 0, Some(("k", 1)), None);
        let free = cand("", 0, None, None);
        let sharing = Sharing::default();
        let mut rot = Rotation::default();
        plan.choose(
            vec![page("", vec![blocked.clone(), free.clone()])],
            &mut rot,
            &sharing,
        );
        assert_eq!(plan.picked(), &[free.id]);
        assert_eq!(plan.excluded(KeyKind::Concurrency), vec!["k".to_string()]);
        assert_eq!(
            plan.next_due(),
            None,
            "a freed key is announced, not polled"
        );
    }

    #[test]
    fn a_limit_counts_the_claims_own_picks() {
        let mut plan = ClaimPlan::new(10, Micros(1));
        plan.set_running("k".into(), 1);
        let rows: Vec<Candidate> = (0..5).map(|_| cand("", 0, Some(("k", 3)), None)).collect();
        let mut rot = Rotation::default();
        plan.choose(vec![page("", rows.clone())], &mut rot, &Sharing::default());
        assert_eq!(plan.picked(), &[rows[0].id, rows[1].id]);
    }

    #[test]
    fn an_empty_bucket_holds_jobs_until_its_next_token() {
        let rate = Rate {
            key: "r".into(),
            per_second: 2.0,
            burst: 2,
        };
        let now = Micros(10_000_000);
        let mut plan = ClaimPlan::new(10, now);
        plan.set_bucket("r".into(), None);
        let rows: Vec<Candidate> = (0..4).map(|_| cand("", 0, None, Some(&rate))).collect();
        let mut rot = Rotation::default();
        plan.choose(vec![page("", rows.clone())], &mut rot, &Sharing::default());
        assert_eq!(plan.picked().len(), 2, "the burst");
        assert_eq!(plan.next_due(), Some(now.plus(Duration::from_millis(500))));
        let claimed: HashSet<JobId> = [rows[0].id].into_iter().collect();
        let after = plan.buckets_after(&claimed);
        assert_eq!(
            after,
            vec![(
                "r".to_string(),
                Bucket {
                    tokens: 1.0,
                    at: now
                }
            )],
            "only what was claimed is taken"
        );
    }

    #[test]
    fn buckets_refill_by_the_stores_clock_for_the_whole_claim() {
        let rate = Rate {
            key: "r".into(),
            per_second: 10.0,
            burst: 1,
        };
        // This server's clock is an hour behind the store's; the bucket was emptied by the
        // store's clock 100 ms ago.
        let hour = 3_600_000_000;
        let local = Micros(10 * hour);
        let store = Micros(local.0 + hour);
        let mut plan = ClaimPlan::new(10, local);
        plan.set_skew(Some(hour));
        // A later lookup that read no bucket leaves the reading.
        plan.set_skew(None);
        plan.set_bucket(
            "r".into(),
            Some(Bucket {
                tokens: 0.0,
                at: Micros(store.0 - 100_000),
            }),
        );
        let rows: Vec<Candidate> = (0..2).map(|_| cand("", 0, None, Some(&rate))).collect();
        let mut rot = Rotation::default();
        plan.choose(vec![page("", rows.clone())], &mut rot, &Sharing::default());
        assert_eq!(
            plan.picked(),
            &[rows[0].id],
            "one token refilled, by the store's clock"
        );
        // The next token, 100 ms on, on this server's clock; the bucket stored by the store's.
        assert_eq!(
            plan.next_due(),
            Some(local.plus(Duration::from_millis(100)))
        );
        let claimed: HashSet<JobId> = [rows[0].id].into_iter().collect();
        assert_eq!(
            plan.buckets_after(&claimed),
            vec![(
                "r".to_string(),
                Bucket {
                    tokens: 0.0,
                    at: store
                }
            )]
        );
    }

    #[test]
    fn tenants_of_one_priority_take_turns_by_weight_and_priority_comes_first() {
        let sharing = Sharing::new([("a".to_string(), 2)]);
        let mut rot = Rotation::default();
        let a: Vec<Candidate> = (0..10).map(|_| cand("a", 0, None, None)).collect();
        let b: Vec<Candidate> = (0..10).map(|_| cand("b", 0, None, None)).collect();
        let urgent = cand("c", 5, None, None);
        let mut plan = ClaimPlan::new(7, Micros(1));
        plan.choose(
            vec![
                page("a", a.clone()),
                page("b", b.clone()),
                page("c", vec![urgent.clone()]),
            ],
            &mut rot,
            &sharing,
        );
        let picked = plan.picked();
        assert_eq!(picked[0], urgent.id);
        let of_a = picked
            .iter()
            .filter(|id| a.iter().any(|c| c.id == **id))
            .count();
        let of_b = picked
            .iter()
            .filter(|id| b.iter().any(|c| c.id == **id))
            .count();
        assert_eq!((of_a, of_b), (4, 2), "a weighs 2, b 1");
    }

    #[test]
    fn one_job_claims_rotate_between_tenants() {
        let sharing = Sharing::default();
        let mut rot = Rotation::default();
        let mut order = Vec::new();
        for _ in 0..6 {
            let a = cand("a", 0, None, None);
            let b = cand("b", 0, None, None);
            let mut plan = ClaimPlan::new(1, Micros(1));
            plan.choose(
                vec![page("a", vec![a.clone()]), page("b", vec![b.clone()])],
                &mut rot,
                &sharing,
            );
            order.push(if plan.picked() == [a.id] { "a" } else { "b" });
            plan.finish(&mut rot);
        }
        assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn a_newcomer_gets_its_turn_but_no_credit_for_its_absence() {
        let sharing = Sharing::default();
        let mut rot = Rotation::default();
        for _ in 0..50 {
            let mut plan = ClaimPlan::new(1, Micros(1));
            plan.choose(
                vec![page("a", vec![cand("a", 0, None, None)])],
                &mut rot,
                &sharing,
            );
            plan.finish(&mut rot);
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            let a = cand("a", 0, None, None);
            let b = cand("b", 0, None, None);
            let mut plan = ClaimPlan::new(1, Micros(1));
            plan.choose(
                vec![page("a", vec![a.clone()]), page("b", vec![b.clone()])],
                &mut rot,
                &sharing,
            );
            got.push(plan.picked()[0] == b.id);
            plan.finish(&mut rot);
        }
        assert_eq!(got.iter().filter(|b| **b).count(), 2, "{got:?}");
    }

    #[test]
    fn a_full_page_cuts_lower_priorities_and_asks_for_another_round() {
        let mut plan = ClaimPlan::new(10, Micros(1));
        let high = cand("a", 5, None, None);
        let low = cand("b", 0, None, None);
        let mut rot = Rotation::default();
        plan.choose(
            vec![
                Page {
                    group: Group::Tenant("a".into()),
                    rows: vec![high.clone()],
                    full: true,
                },
                page("b", vec![low]),
            ],
            &mut rot,
            &Sharing::default(),
        );
        assert_eq!(plan.picked(), &[high.id]);
        let round = plan.next_round().expect("a's page was full");
        assert_eq!(round.tenants, vec!["a".to_string()]);
        plan.out_of_rounds();
        assert_eq!(plan.next_due(), Some(Micros(1)), "look again at once");
    }
}
