//! Who holds archiving back: the projector rows whose checkpoints keep in the
//! table events that the policies would otherwise move.
//!
//! The oldest checkpoint is not the answer. A projector's checkpoint moves only
//! with the events it consumes, so one whose filter passes few kinds of event (a
//! sink of cancellations, a revenue fold of payments) can stand far behind the
//! others and hold nothing back; and with every old event archived, some row
//! still has the oldest checkpoint. A row holds archiving back only if an event
//! after its checkpoint passes its filter and would leave but for it: old enough,
//! of a policy's stream types and class, and, for a policy of whole streams, in a
//! stream old enough throughout; for one event by event, not its stream's
//! newest.

use tokio_postgres::types::ToSql;

use crate::config::ArchivePolicy;
use crate::db::Db;
use crate::feed::POSITION_TX;

/// `alias`'s class condition for a policy whose class is bound at `param`: with
/// the article's column, a class policy takes its class and any other every
/// class but `hot`; without it, `param` must be NULL (checked before a pass).
pub(super) fn class_filter(alias: &str, param: &str, has_class: bool, with_class: bool) -> String {
    match (has_class, with_class) {
        (true, true) => {
            format!("AND {alias}.retention_class = {param} AND {alias}.retention_class <> 'hot'")
        }
        (true, false) => {
            format!("AND {alias}.retention_class IS DISTINCT FROM 'hot' AND {param}::text IS NULL")
        }
        (false, _) => format!("AND {param}::text IS NULL"),
    }
}

/// A projector row that holds archiving back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The projector, or for a rebuild in progress the projector it rebuilds.
    pub projector: String,
    /// A rebuild beside the live tables.
    pub rebuild: bool,
    /// Parked on an event it could not apply.
    pub parked: bool,
    /// Its checkpoint's event id.
    pub at: i64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rebuild = if self.rebuild { " (rebuild)" } else { "" };
        let parked = if self.parked { "parked " } else { "" };
        write!(
            f,
            "{}{rebuild} ({parked}at event {})",
            self.projector, self.at
        )
    }
}

/// The rows that hold archiving back under `policies`, oldest checkpoint first.
pub async fn holders<C: Db>(
    client: &C,
    policies: &[ArchivePolicy],
    has_class: bool,
) -> Result<Vec<Holder>, tokio_postgres::Error> {
    let mut found: Vec<((String, i64), Holder)> = Vec::new();
    for policy in policies {
        let old = |alias: &str| {
            format!(
                "{alias}.occurred_at < now() - $2::text::interval {}",
                class_filter(alias, "$3", has_class, policy.retention_class.is_some())
            )
        };
        let movable = if policy.whole_streams {
            format!(
                "NOT EXISTS (SELECT 1 FROM events n WHERE n.stream_id = e.stream_id AND NOT ({}))",
                old("n")
            )
        } else {
            "EXISTS (SELECT 1 FROM events n WHERE n.stream_id = e.stream_id AND n.sequence > e.sequence)"
                .to_string()
        };
        // The range after each checkpoint is read through the position index,
        // fenced (see feed::reader): the filters stay above the scan.
        let sql = format!(
            "SELECT coalesce(p.build_of, p.name), p.build_of IS NOT NULL, p.state = 'failed',
                    p.position_id, p.position_tx::text
               FROM pgfold.projectors p
              WHERE EXISTS (
                SELECT 1 FROM (SELECT e.* FROM events e
                                WHERE ({POSITION_TX}, e.id) > (p.position_tx, p.position_id)
                               OFFSET 0) e
                 WHERE e.stream_type = ANY($1) AND {old}
                   AND (p.event_types IS NULL OR e.event_type = ANY(p.event_types))
                   AND (p.stream_types IS NULL OR e.stream_type = ANY(p.stream_types))
                   AND {movable})",
            old = old("e"),
        );
        let params: [&(dyn ToSql + Sync); 3] =
            [&policy.stream_types, &policy.after, &policy.retention_class];
        for r in client.query(&sql, &params).await? {
            let holder = Holder {
                projector: r.get(0),
                rebuild: r.get(1),
                parked: r.get(2),
                at: r.get(3),
            };
            let tx: String = r.get(4);
            let key = (format!("{:0>20}", tx), holder.at);
            if !found.iter().any(|(_, h)| *h == holder) {
                found.push((key, holder));
            }
        }
    }
    found.sort_by(|(a, x), (b, y)| (a, &x.projector).cmp(&(b, &y.projector)));
    Ok(found.into_iter().map(|(_, h)| h).collect())
}

/// Holders as `status` and a pass show them; `None` when nothing holds back.
pub fn describe(holders: &[Holder]) -> Option<String> {
    (!holders.is_empty()).then(|| {
        holders
            .iter()
            .map(Holder::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_says_what_it_is_and_where_it_stands() {
        let h = |projector: &str, rebuild, parked, at| Holder {
            projector: projector.into(),
            rebuild,
            parked,
            at,
        };
        assert_eq!(
            h("order_status", false, false, 7).to_string(),
            "order_status (at event 7)"
        );
        assert_eq!(
            h("daily_revenue", true, false, 0).to_string(),
            "daily_revenue (rebuild) (at event 0)"
        );
        assert_eq!(
            h("order_status", false, true, 0).to_string(),
            "order_status (parked at event 0)"
        );
        assert_eq!(describe(&[]), None);
        assert_eq!(
            describe(&[h("a", false, false, 1), h("b", false, true, 2)]).as_deref(),
            Some("a (at event 1), b (parked at event 2)")
        );
    }
}
