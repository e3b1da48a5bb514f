//! A job's environments on their plugins: creating one (retried while a managed plugin
//! restarts), the delegate environment of delegated container layers (its request derived
//! from the parent's), which plugin provides a container layer, and removing an environment.
//! Below `job` (and the scheduler, which removes what a dead job task left).

use std::sync::Arc;
use std::time::Duration;

use kiln_plugin_sdk::{
    Backend, Capabilities, Environment, EnvironmentRequest, LayerSupport, Owner, RemoveRequest,
};

use super::context::Shared;
use crate::backends::Plugin;
use crate::output::LineKind;

/// An environment on a plugin, as the job's steps and containers use it: the job's own, or
/// the one of its delegate.
pub(crate) struct Delegated<'a> {
    pub(crate) plugin: &'a Plugin,
    pub(crate) backend: Arc<dyn Backend>,
    /// For a delegate: its id, with the paths of the delegating environment (the delegate
    /// mounts them at the same paths).
    pub(crate) env: Environment,
}

/// Why an environment (or a container layer's place) cannot be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnvError {
    /// The job needs a layer its backend neither provides nor delegates.
    #[error(
        "the job needs {what}, which backend {backend:?} does not support{}",
        detail_suffix(detail)
    )]
    Unsupported { what: String, backend: String, detail: String },
    /// The layer is delegated to a backend that is not configured.
    #[error(
        "the job needs {what}, which backend {backend:?} delegates to backend {delegate:?}, which \
         is not configured; add it under plugins: in the config file (or --plugin \
         {delegate}=COMMAND)"
    )]
    DelegateNotConfigured { what: String, backend: String, delegate: String },
    /// The delegate does not provide the layer natively.
    #[error(
        "the job needs {what}, which backend {backend:?} delegates to backend {delegate:?}, which \
         does not support it natively"
    )]
    DelegateNotNative { what: String, backend: String, delegate: String },
    /// The environment's Create returned no delegation although its layers are delegated.
    #[error("environment {0} declares delegated layers but its Create returned no delegation")]
    NoDelegation(String),
    /// The delegation names another backend than the capabilities.
    #[error(
        "the environment delegates to backend {declared:?}, but its capabilities name {named:?}"
    )]
    WrongDelegate { declared: String, named: String },
    /// The plugin refused or failed.
    #[error(transparent)]
    Backend(#[from] kiln_plugin_sdk::Error),
    /// The job was cancelled meanwhile.
    #[error("cancelled")]
    Cancelled,
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() { String::new() } else { format!(": {detail}") }
}

/// Creates the delegate environment `id` for `env` (its parent), with the options of
/// `env.delegation`; returns it with `env`'s paths.
pub(crate) async fn create_delegate(
    delegate: &Plugin,
    env: &Environment,
    base: &EnvironmentRequest,
    id: &str,
) -> Result<Environment, EnvError> {
    let request = delegate_request(delegate, env, base, id)?;
    let created = create_with_retry(delegate, request).await?;
    Ok(Environment { paths: env.paths.clone(), ..created })
}

/// The request of the delegate environment `id` for `env` (its parent): `env`'s owner with
/// the parent set, the options of `env.delegation`.
pub(crate) fn delegate_request(
    delegate: &Plugin,
    env: &Environment,
    base: &EnvironmentRequest,
    id: &str,
) -> Result<EnvironmentRequest, EnvError> {
    let Some(d) = &env.delegation else {
        return Err(EnvError::NoDelegation(env.id.clone()));
    };
    if d.backend != delegate.name {
        return Err(EnvError::WrongDelegate {
            declared: d.backend.clone(),
            named: delegate.name.clone(),
        });
    }
    Ok(EnvironmentRequest {
        environment_id: id.to_owned(),
        owner: Owner { parent_environment_id: env.id.clone(), ..base.owner.clone() },
        label: base.label.clone(),
        options: d.options.clone(),
        hints: base.hints,
    })
}

/// Picks one container layer's support out of capabilities.
pub(crate) type Layer = fn(&Capabilities) -> &LayerSupport;

/// The plugin that creates a container layer for a job on `plugin`: `plugin` itself when the
/// layer is native, its delegate when delegated (configured, and native there). The error
/// names the capability and the backend.
pub(crate) fn layer_plugin<'a>(
    shared: &'a Shared,
    plugin: &'a Plugin,
    layer: Layer,
    what: &str,
) -> Result<&'a Plugin, EnvError> {
    let (what, backend) = (what.to_owned(), plugin.name.clone());
    match layer(&plugin.capabilities) {
        LayerSupport::Native => Ok(plugin),
        LayerSupport::Delegated { backend: delegate } => {
            let delegate_name = delegate.clone();
            let Some(delegate) = shared.backends.get(delegate) else {
                return Err(EnvError::DelegateNotConfigured {
                    what,
                    backend,
                    delegate: delegate_name,
                });
            };
            match layer(&delegate.capabilities) {
                LayerSupport::Native => Ok(delegate),
                _ => Err(EnvError::DelegateNotNative { what, backend, delegate: delegate_name }),
            }
        }
        LayerSupport::Unsupported(detail) => {
            Err(EnvError::Unsupported { what, backend, detail: detail.clone() })
        }
    }
}

/// Creates an environment; while the plugin is unavailable (a managed plugin being restarted
/// after a crash), retries through the current client for up to ten seconds.
pub(crate) async fn create_with_retry(
    plugin: &Plugin,
    request: EnvironmentRequest,
) -> kiln_plugin_sdk::Result<Environment> {
    let mut attempts = 0;
    loop {
        match plugin.client().create_environment(request.clone()).await {
            Err(e) if e.code == kiln_plugin_sdk::Code::Unavailable && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Removes an environment. When the plugin is unavailable (it crashed and is being
/// restarted), retries through the current client for a few seconds; what still fails is
/// collected later by the garbage collector.
pub(crate) async fn remove_env(plugin: &Plugin, env_id: &str, log: &impl Fn(String, LineKind)) {
    let request = RemoveRequest {
        environment_id: env_id.to_owned(),
        container_id: None,
        grace: Duration::from_secs(2),
    };
    let mut attempts = 0;
    loop {
        match plugin.client().remove(request.clone()).await {
            Ok(_) => return,
            Err(e) if e.code == kiln_plugin_sdk::Code::Unavailable && attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                log(
                    format!(
                        "could not remove environment {env_id} on backend {:?}: {e} (it will be collected later)",
                        plugin.name
                    ),
                    LineKind::RunnerError,
                );
                return;
            }
        }
    }
}
