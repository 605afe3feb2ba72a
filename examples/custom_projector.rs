//! A projector defined outside pgfold: what each customer has paid, folded in Rust
//! with exact decimals. Build a binary with the built-in projectors plus this one:
//!
//! ```sh
//! cargo run --example custom_projector -- run --once
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::str::FromStr;

use async_trait::async_trait;
use pgfold::{Event, EventFilter, EventFold, Fold, Projector, ProjectorError, Tx};
use rust_decimal::Decimal;
use serde_json::Value;

/// The allocator pgfold's own binary uses (see src/main.rs): with it, memory
/// taken by a batch of large events goes back to the system once it is applied.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct CustomerSpend;

/// A JSON number or numeric string, exactly as written: pgfold decodes payloads
/// with serde_json's `arbitrary_precision`, so a number's text is never a float.
fn decimal(event: &Event, value: Option<&Value>, what: &str) -> Result<Decimal, ProjectorError> {
    let text = match value {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ProjectorError::event(event, format!("{what} is missing"))),
    };
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| {
            ProjectorError::event(event, format!("{what} is {text:?}, not a decimal number"))
        })
}

#[async_trait]
impl Projector for CustomerSpend {
    fn name(&self) -> &str {
        "customer_spend"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::event_types(&["OrderCreated", "OrderPaid"]).in_streams_of(&["order"])
    }

    // Decoded events, one stream's in order: the fold below is Rust.
    fn fold(&self) -> Fold<'_> {
        Fold::Events(self)
    }

    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS customer_spend (
               customer_id TEXT PRIMARY KEY,
               paid NUMERIC NOT NULL
             );
             CREATE TABLE IF NOT EXISTS customer_spend_orders (
               stream_id TEXT PRIMARY KEY,
               customer_id TEXT NOT NULL
             )",
        )
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute("TRUNCATE customer_spend, customer_spend_orders")
            .await?;
        Ok(())
    }
}

#[async_trait]
impl EventFold for CustomerSpend {
    async fn apply(&self, tx: &Tx<'_>, events: &[Event]) -> Result<(), ProjectorError> {
        // OrderPaid does not name the customer: remember it from OrderCreated.
        // Within a batch, a stream's OrderCreated always comes before its OrderPaid.
        let mut customers: HashMap<&str, String> = HashMap::new();
        let mut paid: HashMap<String, Decimal> = HashMap::new();
        for event in events {
            if event.event_type == "OrderCreated" {
                let customer = event.payload["customerId"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string();
                tx.execute(
                    "INSERT INTO customer_spend_orders (stream_id, customer_id) VALUES ($1, $2)
                     ON CONFLICT (stream_id) DO UPDATE SET customer_id = EXCLUDED.customer_id",
                    &[&event.stream_id, &customer],
                )
                .await?;
                customers.insert(&event.stream_id, customer);
                continue;
            }
            let customer = match customers.get(event.stream_id.as_str()) {
                Some(c) => c.clone(),
                None => tx
                    .query_opt(
                        "SELECT customer_id FROM customer_spend_orders WHERE stream_id = $1",
                        &[&event.stream_id],
                    )
                    .await?
                    .map(|r| r.get(0))
                    .ok_or_else(|| {
                        ProjectorError::event(event, "OrderPaid before its OrderCreated")
                    })?,
            };
            let Some(items) = event.payload["items"].as_array() else {
                return Err(ProjectorError::event(
                    event,
                    "payload.items is not an array",
                ));
            };
            let mut total = Decimal::ZERO;
            for item in items {
                total += decimal(event, item.get("price"), "price")?
                    * decimal(event, item.get("qty"), "qty")?;
            }
            *paid.entry(customer).or_default() += total;
        }
        for (customer, amount) in paid {
            tx.execute(
                "INSERT INTO customer_spend AS s (customer_id, paid) VALUES ($1, $2)
                 ON CONFLICT (customer_id) DO UPDATE SET paid = s.paid + EXCLUDED.paid",
                &[&customer, &amount],
            )
            .await?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    pgfold::cli::main(pgfold::projectors::builtin().register(CustomerSpend))
}
