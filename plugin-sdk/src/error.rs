//! The one error type of the backend protocol: a code, a message and whose fault it was.
//!
//! Plugins return it from every [`crate::Backend`] method; the SDK maps it to and from
//! `tonic::Status` in one place (`convert.rs`), so neither plugins nor the runner name gRPC
//! codes directly.

use std::fmt;

/// What went wrong, in the protocol's terms. Mirrors the gRPC codes the protocol documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// A request field is malformed (bad id, bad path, bad tar entry).
    InvalidArgument,
    /// The environment, container or exec does not exist.
    NotFound,
    /// The id is taken by a different spec, or an exec id was used before.
    AlreadyExists,
    /// The request cannot be served in the current state (version mismatch, stopped container).
    FailedPrecondition,
    /// The plugin does not implement this call or this kind of resource.
    Unimplemented,
    /// The backend or plugin is not reachable; retry may help.
    Unavailable,
    /// The plugin refused by policy (a volume or option not allowed).
    PermissionDenied,
    /// A size limit was exceeded.
    ResourceExhausted,
    /// A deadline passed.
    DeadlineExceeded,
    /// The call was cancelled.
    Cancelled,
    /// A bug or an unexpected backend failure.
    Internal,
}

/// Whose fault a failure is (rule 11): decides what the runner tells the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Fault {
    /// Not stated.
    #[default]
    Unspecified,
    /// The workflow asked for something wrong.
    User,
    /// The backend failed.
    Infrastructure,
    /// A configuration is wrong.
    Config,
}

/// A failed backend call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The code.
    pub code: Code,
    /// A lowercase message that says what went wrong and what to do.
    pub message: String,
    /// Whose fault it was.
    pub fault: Fault,
    /// Whether the same call may succeed if retried.
    pub retryable: bool,
    /// The request field or option at fault.
    pub field: Option<String>,
}

/// Result of a backend call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with a code and a message; fault unspecified, not retryable.
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
            fault: Fault::Unspecified,
            retryable: false,
            field: None,
        }
    }

    /// `InvalidArgument`, the user's fault.
    pub fn invalid_argument(message: impl Into<String>) -> Error {
        Error::new(Code::InvalidArgument, message).fault(Fault::User)
    }

    /// `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(Code::NotFound, message)
    }

    /// `AlreadyExists`.
    pub fn already_exists(message: impl Into<String>) -> Error {
        Error::new(Code::AlreadyExists, message)
    }

    /// `FailedPrecondition`.
    pub fn failed_precondition(message: impl Into<String>) -> Error {
        Error::new(Code::FailedPrecondition, message)
    }

    /// `Unimplemented`: the caller must not retry.
    pub fn unimplemented(message: impl Into<String>) -> Error {
        Error::new(Code::Unimplemented, message)
    }

    /// `Unavailable`, the infrastructure's fault, retryable.
    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::new(Code::Unavailable, message).fault(Fault::Infrastructure).retryable(true)
    }

    /// `PermissionDenied`, the user's fault (a request against the plugin's policy).
    pub fn permission_denied(message: impl Into<String>) -> Error {
        Error::new(Code::PermissionDenied, message).fault(Fault::User)
    }

    /// `ResourceExhausted`.
    pub fn resource_exhausted(message: impl Into<String>) -> Error {
        Error::new(Code::ResourceExhausted, message)
    }

    /// `Internal`, the infrastructure's fault.
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(Code::Internal, message).fault(Fault::Infrastructure)
    }

    /// Sets whose fault it is.
    pub fn fault(mut self, fault: Fault) -> Error {
        self.fault = fault;
        self
    }

    /// Sets whether a retry may help.
    pub fn retryable(mut self, retryable: bool) -> Error {
        self.retryable = retryable;
        self
    }

    /// Names the request field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Error {
        self.field = Some(field.into());
        self
    }

    /// Prefixes the message with context, keeping code and fault.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// An I/O error while doing `what`.
    pub fn io(what: impl fmt::Display, err: &std::io::Error) -> Error {
        let code = match err.kind() {
            std::io::ErrorKind::NotFound => Code::NotFound,
            std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
            std::io::ErrorKind::AlreadyExists => Code::AlreadyExists,
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                Code::InvalidArgument
            }
            _ => Code::Internal,
        };
        Error::new(code, format!("{what}: {err}")).fault(Fault::Infrastructure)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (field {field})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Code::InvalidArgument => "invalid argument",
            Code::NotFound => "not found",
            Code::AlreadyExists => "already exists",
            Code::FailedPrecondition => "failed precondition",
            Code::Unimplemented => "unimplemented",
            Code::Unavailable => "unavailable",
            Code::PermissionDenied => "permission denied",
            Code::ResourceExhausted => "resource exhausted",
            Code::DeadlineExceeded => "deadline exceeded",
            Code::Cancelled => "cancelled",
            Code::Internal => "internal",
        };
        f.write_str(s)
    }
}
