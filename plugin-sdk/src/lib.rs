//! The kiln backend protocol SDK: the only crate that knows `kiln.backend.v1`.
//!
//! - [`Backend`]: the trait every plugin implements and the runner calls, with domain types.
//! - [`server`]: serve a `Backend` on a unix socket or TCP (mutual TLS), with grpc.health.
//! - [`client`]: [`client::GrpcBackend`], the runner's `Backend` over gRPC.
//! - [`archive`]: tar helpers with the traversal rules.
//! - [`child`]: stream a local child process as an exec (timeouts, signals, drain).
//! - `conformance` (cargo feature `conformance`, off by default): the black-box conformance
//!   suite (also the `kiln-conformance` binary).
#![warn(missing_docs)]

mod convert;

pub mod archive;
pub mod backend;
pub mod beneath;
pub mod child;
pub mod client;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod dirs;
pub mod error;
pub mod forward;
pub mod ids;
pub mod paths;
pub mod record;
pub mod server;
pub mod spec;
pub mod time;
pub mod tls;
pub mod words;

/// Generated code of `proto/backend/v1/backend.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("kiln.backend.v1");
}

pub use backend::*;
pub use error::{Code, Error, Fault, Result};

pub use prost;
pub use tonic;
