//! The built-in projectors, one file each.

mod daily_revenue;
mod order_snapshots;

pub use daily_revenue::DailyRevenue;
pub use order_snapshots::OrderSnapshots;

use crate::projector::Registry;

/// A registry holding the built-in projectors; add your own with `register`.
pub fn builtin() -> Registry {
    Registry::new()
        .register(DailyRevenue)
        .register(OrderSnapshots)
}
