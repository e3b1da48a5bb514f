//! Wall-clock time as the protocol writes it (`*_unix_ms` fields): one helper for the runner
//! and every plugin.

/// Milliseconds since the Unix epoch (0 before it, `i64::MAX` far after it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
