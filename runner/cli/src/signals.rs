//! Two-phase shutdown on SIGINT/SIGTERM, shared by `exec` and `daemon`: the first signal cancels
//! `first` (stop gracefully), the second `second` (stop now), the third exits at once.

use tokio_util::sync::CancellationToken;

/// What to log at each of the first two signals.
pub(crate) struct Messages {
    pub(crate) first: &'static str,
    pub(crate) second: &'static str,
}

/// Watches the signals until the task is aborted.
pub(crate) fn watch(
    first: CancellationToken,
    second: CancellationToken,
    messages: Messages,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        let mut count = 0;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            count += 1;
            match count {
                1 => {
                    tracing::warn!("{}", messages.first);
                    first.cancel();
                }
                2 => {
                    tracing::warn!("{}", messages.second);
                    second.cancel();
                }
                _ => std::process::exit(130),
            }
        }
    })
}
