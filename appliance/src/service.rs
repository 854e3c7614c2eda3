//! systemd's service protocol (`Type=notify`): `READY=1` once the daemon
//! serves, `WATCHDOG=1` while it lives. With steering, the watchdog is pinged
//! where the fail-open heartbeat is written (the splicer's accept loops, see
//! [`crate::steer::FailOpen::beat`]), so systemd restarts exactly the daemon
//! whose traffic the kernel already forwards around it; without steering, by a
//! task on the runtime ([`watchdog_loop`]). Outside systemd (no
//! `NOTIFY_SOCKET`) every call does nothing.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// When the watchdog was last pinged, in ms since [`EPOCH`] (0: never).
static LAST_PING_MS: AtomicU64 = AtomicU64::new(0);
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// The unit's `WatchdogSec`, if it set one for this process.
pub fn watchdog() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}

/// Tells systemd the daemon is up (datapath attached, API listening).
pub fn ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(cause = %e, "telling systemd we are ready");
    }
}

/// Pings the watchdog, at most once per `period` / 4 (the accept loops beat
/// every 250 ms each).
pub fn ping(period: Duration) {
    let now = u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
    let last = LAST_PING_MS.load(Ordering::Relaxed);
    let spacing = u64::try_from((period / 4).as_millis()).unwrap_or(u64::MAX);
    if last != 0 && now.saturating_sub(last) < spacing {
        return;
    }
    if LAST_PING_MS
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }
}

/// Without steering there is no accept loop: the runtime itself pings, every
/// `period` / 4.
pub async fn watchdog_loop(period: Duration) {
    let mut tick = tokio::time::interval(period / 4);
    loop {
        tick.tick().await;
        ping(period);
    }
}
