//! SSH adapter: the second protocol on the pipeline.
//!
//! Shape (as every adapter): the workload's connection is terminated by
//! cordon's own SSH server (`server`: host key and per-connection host
//! certificate from `hostkey`, `none` authentication: the identity is the
//! kernel's) → upstream client (`upstream`: pinned host keys, credentials
//! only cordon holds) → each session channel relayed by its own task
//! (`channel`), with exec commands judged (`policy`) and recorded through
//! the pipeline → errors that close only this session, with an audited
//! reason.

pub mod hostkey;
pub mod policy;

pub use policy::SshPolicy;
