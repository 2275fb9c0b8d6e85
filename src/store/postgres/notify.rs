//! The PostgreSQL store's notifications: what a transaction announces ([`Notices`], sent on the
//! schema's channel just before its commit, so delivered at it), and how a server reads the
//! payloads it hears ([`parse_payload`]).

use std::collections::HashMap;

use sqlx::PgConnection;

use crate::job::JobId;
use crate::store::StoreError;

/// PostgreSQL refuses a notification payload of 8000 bytes or more; a `change:` list is cut
/// well below that.
const PAYLOAD_MAX: usize = 7900;

/// The origin of what no server has counted or published itself yet: the jobs a cascade
/// moved (children of a job that became final, or of a retried one). Every server acts on
/// these, the sender's own included. (Stores name themselves with hex UUIDs, never this.)
pub(super) const EVERY: &str = "*";

/// What one transaction announces, gathered while it runs and sent just before its commit
/// ([`Notices::send`]): a few notifications per round, not one per row.
#[derive(Default)]
pub(super) struct Notices {
    /// How many jobs each lane got queued by the writes the sending server asked for (and
    /// counted itself): `new:<origin>:<executor>=<n>,...`, which wakes the lanes of every
    /// server and tells the others how many to add to their queued counts.
    pub new: HashMap<crate::job::ExecutorKind, u64>,
    /// Jobs whose state changed by those writes (the sending server publishes them itself):
    /// `change:<origin>:<id>,<id>,...`, for watchers and event streams on other servers.
    pub changed: Vec<JobId>,
    /// Blobs deleted: `blobdel:<id>,<id>,...`, so every server removes its copies.
    pub blobs_deleted: Vec<String>,
    /// Running jobs cancelled: `cancel:<id>`, one each, to whoever runs them.
    pub cancelled: Vec<JobId>,
    /// Jobs a cascade queued, per lane: `new:*:<executor>=<n>,...`, counted by every server.
    pub cascade_new: HashMap<crate::job::ExecutorKind, u64>,
    /// Jobs a cascade moved: `change:*:<id>,...`, published by every server.
    pub cascade_changed: Vec<JobId>,
}

/// Appends `items` to `out` as `<prefix><item>,<item>,...` payloads, each under PostgreSQL's
/// limit.
fn lists<'a>(out: &mut Vec<String>, prefix: &str, items: impl Iterator<Item = &'a str>) {
    let mut list = String::new();
    for item in items {
        if !list.is_empty() && list.len() + 1 + item.len() > PAYLOAD_MAX {
            out.push(std::mem::take(&mut list));
        }
        if list.is_empty() {
            list.push_str(prefix);
        } else {
            list.push(',');
        }
        list.push_str(item);
    }
    if !list.is_empty() {
        out.push(list);
    }
}

/// `new:<origin>:<executor>=<n>,...` for the lanes with jobs in `counts`, if any.
fn new_payload(
    out: &mut Vec<String>,
    origin: &str,
    counts: &HashMap<crate::job::ExecutorKind, u64>,
) {
    // A lane with 0 is a wake-up that adds nothing (a job freed its concurrency key's slot).
    let mut new: Vec<_> = counts.iter().collect();
    new.sort_by_key(|(e, _)| e.index());
    if !new.is_empty() {
        let counts: Vec<String> = new
            .iter()
            .map(|(e, n)| format!("{}={n}", e.as_str()))
            .collect();
        out.push(format!("new:{origin}:{}", counts.join(",")));
    }
}

/// `change:<origin>:<id>,...` payloads for `ids`.
fn change_payloads(out: &mut Vec<String>, origin: &str, ids: &[JobId]) {
    let ids: Vec<String> = ids.iter().map(|id| id.0.hyphenated().to_string()).collect();
    lists(
        out,
        &format!("change:{origin}:"),
        ids.iter().map(String::as_str),
    );
}

impl Notices {
    /// Adds what a parent's final state (or a retry) moved besides its own job. The server
    /// that wrote it neither counted nor published these, so they go out for every server,
    /// the sender included ([`EVERY`]).
    pub(super) fn cascaded(&mut self, cascade: crate::store::graph::Cascade) {
        for (_, lane) in &cascade.queued {
            *self.cascade_new.entry(*lane).or_default() += 1;
        }
        self.cascade_changed.extend(cascade.moved);
    }

    /// The payloads, lists cut to fit PostgreSQL's limit. `origin` names the store that sends
    /// them, so its own server can tell its own notices from the others'.
    pub(super) fn payloads(&self, origin: &str) -> Vec<String> {
        let mut out = Vec::new();
        new_payload(&mut out, origin, &self.new);
        new_payload(&mut out, EVERY, &self.cascade_new);
        out.extend(self.cancelled.iter().map(|id| format!("cancel:{id}")));
        change_payloads(&mut out, origin, &self.changed);
        change_payloads(&mut out, EVERY, &self.cascade_changed);
        lists(
            &mut out,
            "blobdel:",
            self.blobs_deleted.iter().map(String::as_str),
        );
        out
    }

    /// Queues the notifications in the open transaction: PostgreSQL delivers them at its
    /// commit, and drops them if it rolls back. One statement for all of them.
    pub(super) async fn send(
        &self,
        conn: &mut PgConnection,
        channel: &str,
        origin: &str,
    ) -> Result<(), StoreError> {
        let payloads = self.payloads(origin);
        if payloads.is_empty() {
            return Ok(());
        }
        sqlx::query("SELECT count(pg_notify($1, p)) FROM UNNEST($2::text[]) AS p")
            .bind(channel)
            .bind(payloads)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Parses one notification's payload: `new:<origin>:<executor>=<n>,...`, `cancel:<id>`,
/// `change:<origin>:<id>,<id>,...` or `blobdel:<id>,...`. `own` is this store's origin: its
/// own jobs this server has counted and published already, so its `new:` adds nothing to the
/// counts and its `change:` is dropped. The origin [`EVERY`] (what a cascade moved) is never
/// `own`: every server, the sender too, counts and publishes those.
pub(super) fn parse_payload(payload: &str, own: &str) -> Vec<crate::store::Notice> {
    use crate::store::Notice;
    if payload == "schedules" {
        return vec![Notice::Schedules];
    }
    match payload.split_once(':') {
        Some(("new", rest)) => {
            let Some((origin, counts)) = rest.split_once(':') else {
                return Vec::new();
            };
            counts
                .split(',')
                .filter_map(|c| {
                    let (lane, n) = c.split_once('=')?;
                    let lane = lane.parse().ok()?;
                    let n: u64 = n.parse().ok()?;
                    Some(Notice::New {
                        lane,
                        added: if origin == own { 0 } else { n },
                    })
                })
                .collect()
        }
        Some(("cancel", id)) => id.parse().ok().map(Notice::Cancel).into_iter().collect(),
        Some(("change", rest)) => match rest.split_once(':') {
            Some((origin, ids)) if origin != own => {
                let ids: Vec<JobId> = ids.split(',').filter_map(|id| id.parse().ok()).collect();
                if ids.is_empty() {
                    Vec::new()
                } else {
                    vec![Notice::Changed(ids)]
                }
            }
            _ => Vec::new(),
        },
        Some(("blobdel", ids)) => {
            let ids: Vec<String> = ids
                .split(',')
                .filter_map(crate::blob::canonical_id)
                .collect();
            if ids.is_empty() {
                Vec::new()
            } else {
                vec![Notice::BlobsDeleted(ids)]
            }
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ExecutorKind;
    use crate::store::Notice;

    #[test]
    fn a_lane_woken_with_nothing_added_is_still_announced() {
        // A job that freed its concurrency key's slot: every server's lane must look again.
        let notices = Notices {
            new: [(ExecutorKind::Async, 0)].into_iter().collect(),
            ..Notices::default()
        };
        let heard: Vec<Notice> = notices
            .payloads("them")
            .iter()
            .flat_map(|p| parse_payload(p, "me"))
            .collect();
        assert_eq!(
            heard,
            vec![Notice::New {
                lane: ExecutorKind::Async,
                added: 0
            }]
        );
    }

    #[test]
    fn a_long_change_list_is_cut_below_the_payload_limit_and_parses_back() {
        let ids: Vec<JobId> = (0..1000).map(|_| JobId::new()).collect();
        let notices = Notices {
            new: [(ExecutorKind::Async, 1000)].into_iter().collect(),
            changed: ids.clone(),
            ..Notices::default()
        };
        let payloads = notices.payloads("them");
        assert!(payloads.len() > 2, "cut into several");
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let heard: Vec<Notice> = payloads
            .iter()
            .flat_map(|p| parse_payload(p, "me"))
            .collect();
        let Notice::New { lane, added } = &heard[0] else {
            panic!("{heard:?}")
        };
        assert_eq!((*lane, *added), (ExecutorKind::Async, 1000));
        let changed: Vec<JobId> = heard[1..]
            .iter()
            .flat_map(|n| match n {
                Notice::Changed(ids) => ids.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(changed, ids);
    }

    #[test]
    fn a_servers_own_notices_add_nothing_and_its_changes_are_dropped() {
        let notices = Notices {
            new: [(ExecutorKind::Rayon, 3), (ExecutorKind::Async, 2)]
                .into_iter()
                .collect(),
            changed: vec![JobId::new()],
            blobs_deleted: vec![uuid::Uuid::now_v7().hyphenated().to_string()],
            cancelled: vec![JobId::new()],
            ..Notices::default()
        };
        let heard: Vec<Notice> = notices
            .payloads("me")
            .iter()
            .flat_map(|p| parse_payload(p, "me"))
            .collect();
        assert_eq!(
            heard,
            vec![
                Notice::New {
                    lane: ExecutorKind::Async,
                    added: 0
                },
                Notice::New {
                    lane: ExecutorKind::Rayon,
                    added: 0
                },
                // Cancels name no origin: the server running the job stops it, whoever
                // cancelled it.
                Notice::Cancel(notices.cancelled[0]),
                Notice::BlobsDeleted(notices.blobs_deleted.clone()),
            ]
        );
    }

    #[test]
    fn what_a_cascade_moved_reaches_every_server_the_sender_too() {
        let (own, child) = (JobId::new(), JobId::new());
        let mut notices = Notices {
            new: [(ExecutorKind::Async, 1)].into_iter().collect(),
            changed: vec![own],
            ..Notices::default()
        };
        notices.cascaded(crate::store::graph::Cascade {
            queued: vec![(child, ExecutorKind::Rayon)],
            moved: vec![child],
        });
        let heard: Vec<Notice> = notices
            .payloads("me")
            .iter()
            .flat_map(|p| parse_payload(p, "me"))
            .collect();
        assert_eq!(
            heard,
            vec![
                Notice::New {
                    lane: ExecutorKind::Async,
                    added: 0
                },
                Notice::New {
                    lane: ExecutorKind::Rayon,
                    added: 1
                },
                Notice::Changed(vec![child]),
            ]
        );
    }

    #[test]
    fn malformed_payloads_are_ignored() {
        for p in [
            "new:x",
            "new:x:async",
            "new:x:nolane=3",
            "change:x",
            "cancel:nope",
            "blobdel:../etc",
            "",
        ] {
            assert!(parse_payload(p, "me").is_empty(), "{p}");
        }
    }
}
