//! Reading the log: positions, the horizon below which reading is final, the
//! queries, the repair that keeps each stream in `sequence` order, and the
//! upcasters every read applies.

mod event;
mod horizon;
mod order;
mod plans;
mod position;
mod range;
mod reader;
mod upcast;

pub use event::{Event, EventFilter};
pub use horizon::{blocker, horizon, kept_horizon, Blocker, Horizon, KeptHorizonWith};
pub use order::{delivered_ahead_of, order_batch, OrderedBatch};
pub use plans::{plan_mode, set_plan_mode, GENERIC_PLANS_FROM_BYTES};
pub use position::{Position, POSITION_TX};
pub use range::{key_staged, EventRange, PART_PARAMS, RANGE_PARAMS, STAGED_TABLE};
pub(crate) use reader::event_from_row;
pub use reader::{
    ahead_of_range, newest, read_events, ready_set_batch_end, set_batch_end, stream_key_after,
    ReadBatch, ReadRow,
};
pub use upcast::{changed_upcasters, Upcaster, Upcasters, COLUMNS_SQL};
