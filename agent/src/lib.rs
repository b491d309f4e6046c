//! cordon: a host agent that governs what workloads in tagged cgroups do with
//! production data. See ARCHITECTURE.md for the flow and where each part is.
pub mod approvals;
pub mod audit;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod daemon;
#[doc(hidden)]
pub mod fuzz;
pub mod identity;
pub mod kernel;
pub mod limits;
pub mod net;
pub mod pipeline;
pub mod postgres;
pub mod protocol;
pub mod proxy;
pub mod relay;
pub mod replay;
pub mod secrets;
pub mod sessions;
pub mod ssh;
pub mod state;
pub mod tagging;
