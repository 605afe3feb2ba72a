//! systemd's notification protocol (`Type=notify`): READY=1 once connected,
//! migrated and running, STOPPING=1 on shutdown, and WATCHDOG=1 while every
//! projector task is alive, so that `WatchdogSec=` restarts a wedged daemon.
//! Everything here is a no-op when not started by systemd (no NOTIFY_SOCKET).

use std::sync::Arc;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::Liveness;

/// Tells systemd the daemon is up (READY=1): connected, migrated and running, so
/// units ordered after it may start.
pub fn ready() {
    notify(&[NotifyState::Ready]);
}

/// Tells systemd the daemon has begun shutting down (STOPPING=1), so that a slow,
/// orderly drain is not mistaken for a hang.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// When systemd watches the service: the task that pings the watchdog at half its
/// interval while the tasks are alive (a wedged task stops the pings and systemd
/// restarts the service), until `shutdown`. The caller runs it and owns it.
pub fn watchdog(
    liveness: Arc<Liveness>,
    shutdown: CancellationToken,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let interval = sd_notify::watchdog_enabled()?;
    let period = interval / 2;
    Some(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let stale = liveness.stale();
                    if stale.is_empty() {
                        notify(&[NotifyState::Watchdog]);
                    } else {
                        tracing::error!(tasks = ?stale, "not pinging the watchdog: tasks are not making progress");
                    }
                }
            }
        }
    })
}
