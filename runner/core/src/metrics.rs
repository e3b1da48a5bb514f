//! The daemon's observability: Prometheus metrics (with the `prometheus-client` crate) and an
//! optional HTTP endpoint serving `/healthz` and `/metrics` (config `metrics.listen`).
//!
//! The metrics live in one process-wide registry ([`global`]) that the daemon's parts update
//! as they go: the poller (fetch errors, capacity), the task runner (jobs running, jobs
//! finished by result, job durations), the reporter (step durations) and the plugin monitor
//! (restarts). Updating them costs an atomic add when nothing scrapes them.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// A result label (`success`, `failure`, `cancelled`, `skipped`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The result.
    pub result: String,
}

/// A plugin label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    /// The plugin's name (`host`, `docker`, …).
    pub plugin: String,
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    /// Jobs running now.
    pub jobs_running: Gauge,
    /// Jobs finished, by result.
    pub jobs_finished: Family<ResultLabel, Counter>,
    /// Job durations in seconds.
    pub job_duration: Histogram,
    /// Step durations in seconds.
    pub step_duration: Histogram,
    /// Failed task fetches.
    pub fetch_errors: Counter,
    /// Plugin restarts, by plugin.
    pub plugin_restarts: Family<PluginLabel, Counter>,
    /// Jobs this runner takes at once (`runner.capacity`).
    pub capacity: Gauge,
}

/// Durations from 100 ms to about 3.6 hours.
fn duration_buckets() -> impl Iterator<Item = f64> {
    [0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0].into_iter()
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kiln");
        let m = Metrics {
            registry: Registry::default(),
            jobs_running: Gauge::default(),
            jobs_finished: Family::default(),
            job_duration: Histogram::new(duration_buckets()),
            step_duration: Histogram::new(duration_buckets()),
            fetch_errors: Counter::default(),
            plugin_restarts: Family::default(),
            capacity: Gauge::default(),
        };
        registry.register("jobs_running", "Jobs running now", m.jobs_running.clone());
        registry.register("jobs_finished", "Jobs finished, by result", m.jobs_finished.clone());
        registry.register("job_duration_seconds", "How long jobs took", m.job_duration.clone());
        registry.register("step_duration_seconds", "How long steps took", m.step_duration.clone());
        registry.register("fetch_errors", "Failed task fetches", m.fetch_errors.clone());
        registry.register(
            "plugin_restarts",
            "Managed plugins restarted after they died",
            m.plugin_restarts.clone(),
        );
        registry.register("capacity", "Jobs this runner takes at once", m.capacity.clone());
        Metrics { registry, ..m }
    }

    /// A job ended with `result` after `duration`.
    pub fn job_finished(&self, result: &str, duration: Duration) {
        self.jobs_finished.get_or_create(&ResultLabel { result: result.to_owned() }).inc();
        self.job_duration.observe(duration.as_secs_f64());
    }

    /// A managed plugin was restarted.
    pub fn plugin_restarted(&self, plugin: &str) {
        self.plugin_restarts.get_or_create(&PluginLabel { plugin: plugin.to_owned() }).inc();
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Serves `/healthz` and `/metrics` on `addr` until `stop`; returns the bound address (port 0
/// picks a free one).
pub async fn serve(addr: SocketAddr, stop: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /healthz and /metrics");
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(respond(req.uri().path()))
                    });
                if let Err(e) =
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
                {
                    tracing::debug!(error = %e, "metrics endpoint: connection ended with an error");
                }
            });
        }
    });
    Ok(bound)
}

fn respond(path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz" => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".to_owned()),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            global().encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /healthz or /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_metrics_are_encoded_with_their_names() {
        let m = super::Metrics::new();
        m.capacity.set(4);
        m.jobs_running.inc();
        m.job_finished("success", std::time::Duration::from_secs(3));
        m.plugin_restarted("docker");
        m.fetch_errors.inc();
        m.step_duration.observe(0.2);
        let text = m.encode();
        for needle in [
            "kiln_capacity 4",
            "kiln_jobs_running 1",
            "kiln_jobs_finished_total{result=\"success\"} 1",
            "kiln_job_duration_seconds_count 1",
            "kiln_step_duration_seconds_count 1",
            "kiln_fetch_errors_total 1",
            "kiln_plugin_restarts_total{plugin=\"docker\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
