//! Types shared by the kernel programs (`agent-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so the kernel and
//! userspace agree byte for byte on map keys and values: an uninitialised
//! padding byte in a hash key would make the two sides hash differently.
#![no_std]

/// Bumped whenever a map layout or program contract changes. It is part of
/// the bpffs pin directory name, so an agent never adopts maps it cannot read.
pub const ABI_VERSION: u32 = 1;

/// Most intercept rules the kernel side evaluates (an unrolled, bounded loop).
pub const MAX_RULES: u32 = 32;
/// Deepest cgroup nesting level whose ancestors are checked for a tag.
pub const MAX_CGROUP_LEVELS: u32 = 24;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// One intercept rule: TCP destination port plus an optional address prefix.
/// Addresses are kept in IPv6 form; IPv4 prefixes are stored as IPv4-mapped
/// (`::ffff:a.b.c.d`, prefix length + 96), so one comparison covers both
/// `connect4` and dual-stack `connect6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterceptRule {
    /// Network byte order of the address; host order for everything else.
    pub addr: [u8; 16],
    pub prefix_len: u8,
    /// 1 = rule in use. Rules are packed from index 0; the first unused one
    /// ends the scan.
    pub enabled: u8,
    /// Destination TCP port, host byte order.
    pub port: u16,
    /// Index into the agent's rule table (protocol, upstream); echoed in
    /// [`ConnMeta::rule`].
    pub rule_id: u32,
}

impl InterceptRule {
    pub const EMPTY: Self = Self { addr: [0; 16], prefix_len: 0, enabled: 0, port: 0, rule_id: 0 };
}

/// Agent-wide settings the programs read from a one-element array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Proxy listener, IPv4, network byte order as stored in `user_ip4`.
    pub proxy_ip4: u32,
    /// Proxy listener, IPv6 (network byte order words as in `user_ip6`).
    pub proxy_ip6: [u32; 4],
    /// Proxy port, host byte order.
    pub proxy_port: u16,
    /// 1 once the agent has written a complete configuration. Until then
    /// tagged connects are refused rather than let through.
    pub ready: u8,
    pub _pad0: u8,
    /// SO_MARK on the agent's upstream sockets; never redirected.
    pub socket_mark: u32,
    pub _pad1: u32,
    /// cgroup v2 id the agent runs in; never redirected.
    pub agent_cgroup_id: u64,
}

impl ProxyConfig {
    pub const EMPTY: Self = Self {
        proxy_ip4: 0,
        proxy_ip6: [0; 4],
        proxy_port: 0,
        ready: 0,
        _pad0: 0,
        socket_mark: 0,
        _pad1: 0,
        agent_cgroup_id: 0,
    };
}

/// Value stored in the tag map for a tagged cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagValue {
    /// Index of the profile in the agent's policy.
    pub profile_id: u32,
    pub _pad: u32,
}

/// What the kernel learnt about a redirected connection, at connect time,
/// from the calling task.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMeta {
    /// Original destination in IPv6 form (IPv4 as `::ffff:a.b.c.d`).
    pub orig_addr: [u8; 16],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// Address family the workload used (AF_INET or AF_INET6).
    pub family: u16,
    pub rule_id: u32,
    /// The calling task's own cgroup v2 id.
    pub cgroup_id: u64,
    /// The tagged cgroup (self or ancestor) whose tag matched.
    pub tagged_cgroup_id: u64,
    pub profile_id: u32,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
    pub cookie: u64,
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) at connect.
    pub ktime_ns: u64,
}

/// Connection 4-tuple as seen from the workload's socket after the rewrite:
/// (workload address, workload port) → (proxy address, proxy port).
/// Addresses in IPv6 form, IPv4 as IPv4-mapped; ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
}

/// Map names, shared so the agent finds the pins the programs declare.
pub mod maps {
    pub const CONFIG: &str = "CORDON_CONFIG";
    pub const RULES: &str = "CORDON_RULES";
    pub const TAGS: &str = "CORDON_TAGS";
    pub const BY_COOKIE: &str = "CORDON_BY_COOKIE";
    pub const BY_TUPLE: &str = "CORDON_BY_TUPLE";
}

/// Program names (the Rust function names in agent-ebpf).
pub mod programs {
    pub const CONNECT4: &str = "cordon_connect4";
    pub const CONNECT6: &str = "cordon_connect6";
    pub const GETPEERNAME4: &str = "cordon_getpeername4";
    pub const GETPEERNAME6: &str = "cordon_getpeername6";
    pub const SOCKOPS: &str = "cordon_sockops";
    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6, SOCKOPS];
}

/// Map an IPv4 address (network byte order bytes) into IPv6 form.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers and byte
    // arrays, with every padding byte spelled out as a field.
    unsafe impl aya::Pod for super::InterceptRule {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::TagValue {}
    unsafe impl aya::Pod for super::ConnMeta {}
    unsafe impl aya::Pod for super::SockTuple {}
}
