//! cordon's kernel side.
//!
//! * `connect4` / `connect6`: a TCP connect from a task whose cgroup (or an
//!   ancestor) is tagged, to a destination an intercept rule matches, is
//!   rewritten to the agent's proxy listener. What the kernel knows about the
//!   caller is stored under the socket cookie.
//! * `sockops`: at `TCP_CONNECT_CB` (inside `connect()`, after the source
//!   port is chosen, before the SYN) the cookie entry is published under the
//!   socket's 4-tuple, which is what the proxy sees after `accept()`. Both
//!   entries are removed when the socket reaches TCP_CLOSE.
//! * `getpeername4` / `getpeername6`: the workload sees the address it dialled.
//!
//! Failing closed: a tagged connect whose metadata cannot be stored, or that
//! arrives before the agent has configured the programs, gets EPERM. Nothing
//! here ever lets a governed connection bypass the proxy.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use agent_common::{
    v4_mapped, ConnMeta, InterceptRule, ProxyConfig, SockTuple, TagValue, AF_INET, AF_INET6, MAX_CGROUP_LEVELS,
    MAX_RULES,
};
use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};

const IPPROTO_TCP: u32 = 6;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
const BPF_TCP_CLOSE: u32 = 7;

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
/// The kernel turns 0 into EPERM for the caller of connect().
const DENY: i32 = 0;

#[map(name = "CORDON_CONFIG")]
static CONFIG: Array<ProxyConfig> = Array::pinned(1, 0);

#[map(name = "CORDON_RULES")]
static RULES: Array<InterceptRule> = Array::pinned(MAX_RULES, 0);

#[map(name = "CORDON_TAGS")]
static TAGS: HashMap<u64, TagValue> = HashMap::pinned(16384, 0);

/// connect → sockops and getpeername. LRU so a flood of sockets that never
/// reach TCP_CLOSE cannot fill it; an evicted entry only costs that
/// connection its identity, and the proxy refuses connections without one.
#[map(name = "CORDON_BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, ConnMeta> = LruHashMap::pinned(65536, 0);

/// sockops → proxy. Holds connections between connect and accept.
#[map(name = "CORDON_BY_TUPLE")]
static BY_TUPLE: LruHashMap<SockTuple, ConnMeta> = LruHashMap::pinned(65536, 0);

/// Destination of a connect, normalised to IPv6 form.
struct Dest {
    addr: [u8; 16],
    port: u16,
}

#[cgroup_sock_addr(connect4)]
pub fn cordon_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, AF_INET) {
        Ok(verdict) => verdict,
        Err(()) => DENY,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn cordon_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, AF_INET6) {
        Ok(verdict) => verdict,
        Err(()) => DENY,
    }
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, family: u16) -> Result<i32, ()> {
    let sa = ctx.sock_addr;
    // One volatile load per ctx field: the verifier rejects merged or
    // offset loads from the context.
    let protocol = unsafe { read_volatile(addr_of!((*sa).protocol)) };
    if protocol != IPPROTO_TCP {
        return Ok(ALLOW);
    }

    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let (tagged_cgroup_id, profile_id) = find_tag(cgroup_id);
    if tagged_cgroup_id == 0 {
        return Ok(ALLOW);
    }

    let Some(cfg) = CONFIG.get(0) else {
        return Err(());
    };
    // The agent's own sockets: its cgroup AND the SO_MARK on its upstream
    // sockets. The mark alone is not enough: a tagged workload with
    // CAP_NET_RAW or CAP_NET_ADMIN could set it and go direct.
    if cfg.agent_cgroup_id != 0
        && cgroup_id == cfg.agent_cgroup_id
        && cfg.socket_mark != 0
        && socket_mark(sa) == cfg.socket_mark
    {
        return Ok(ALLOW);
    }
    if cfg.ready == 0 {
        // Tagged, but no proxy configured yet: refuse, never bypass.
        return Err(());
    }

    let dest = read_dest(sa, family);
    let proxy_v4 = v4_mapped(cfg.proxy_ip4.to_ne_bytes());
    let proxy_v6 = words_to_bytes(cfg.proxy_ip6);
    if dest.port == cfg.proxy_port && (dest.addr == proxy_v4 || dest.addr == proxy_v6) {
        // Already pointed at the proxy (a second program, or a direct dial):
        // the proxy itself refuses connections it has no metadata for.
        return Ok(ALLOW);
    }

    let Some(rule_id) = match_rule(&dest) else {
        return Ok(ALLOW);
    };

    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let uid_gid = unsafe { bpf_get_current_uid_gid() };
    let mut comm = [0u8; 16];
    unsafe {
        bpf_get_current_comm(comm.as_mut_ptr().cast(), comm.len() as u32);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let meta = ConnMeta {
        orig_addr: dest.addr,
        orig_port: dest.port,
        family,
        rule_id,
        cgroup_id,
        tagged_cgroup_id,
        profile_id,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _pad: 0,
        comm,
        cookie,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Metadata first: if it cannot be stored, the connect fails.
    BY_COOKIE.insert(&cookie, &meta, 0).map_err(|_| ())?;

    unsafe {
        if family == AF_INET {
            write_volatile(addr_of_mut!((*sa).user_ip4), cfg.proxy_ip4);
        } else if is_v4_mapped(&dest.addr) {
            // Dual-stack socket dialling ::ffff:a.b.c.d: stay in the v4-mapped
            // space, so the kernel keeps using the IPv4 path.
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), u32::from_ne_bytes([0, 0, 0xff, 0xff]));
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), cfg.proxy_ip4);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), cfg.proxy_ip6[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), cfg.proxy_ip6[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), cfg.proxy_ip6[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), cfg.proxy_ip6[3]);
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(cfg.proxy_port.to_be()));
    }
    Ok(ALLOW)
}

/// The deepest tagged cgroup among the task's own cgroup and its ancestors,
/// as (tagged cgroup id, profile id); id 0 = not tagged.
///
/// Plain integers rather than an Option of a struct: LLVM may spill the
/// uninitialised payload of a `None`, which the verifier rejects.
#[inline(always)]
fn find_tag(cgroup_id: u64) -> (u64, u32) {
    if let Some(tag) = unsafe { TAGS.get(&cgroup_id) } {
        return (cgroup_id, tag.profile_id);
    }
    let mut found_id: u64 = 0;
    let mut found_profile: u32 = 0;
    // Level 0 is the root; a level deeper than the task's returns 0.
    let mut level = 1;
    while level < MAX_CGROUP_LEVELS {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 || id == cgroup_id {
            break;
        }
        if let Some(tag) = unsafe { TAGS.get(&id) } {
            found_id = id;
            found_profile = tag.profile_id;
        }
        level += 1;
    }
    (found_id, found_profile)
}

#[inline(always)]
fn socket_mark(sa: *mut bpf_sock_addr) -> u32 {
    let mut mark: u32 = 0;
    let ret = unsafe {
        bpf_getsockopt(sa.cast(), SOL_SOCKET, SO_MARK, addr_of_mut!(mark).cast(), core::mem::size_of::<u32>() as i32)
    };
    if ret == 0 {
        mark
    } else {
        0
    }
}

#[inline(always)]
fn read_dest(sa: *mut bpf_sock_addr, family: u16) -> Dest {
    let raw_port = unsafe { read_volatile(addr_of!((*sa).user_port)) };
    let port = u16::from_be(raw_port as u16);
    let addr = if family == AF_INET {
        let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
        v4_mapped(ip.to_ne_bytes())
    } else {
        let w = unsafe {
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]
        };
        words_to_bytes(w)
    };
    Dest { addr, port }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let a = w[0].to_ne_bytes();
    let b = w[1].to_ne_bytes();
    let c = w[2].to_ne_bytes();
    let d = w[3].to_ne_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

#[inline(always)]
fn match_rule(dest: &Dest) -> Option<u32> {
    let mut i = 0;
    while i < MAX_RULES {
        let rule = RULES.get(i)?;
        if rule.enabled == 0 {
            return None;
        }
        if rule.port == dest.port && prefix_matches(&rule.addr, rule.prefix_len, &dest.addr) {
            return Some(rule.rule_id);
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn prefix_matches(net: &[u8; 16], prefix_len: u8, addr: &[u8; 16]) -> bool {
    let mut i = 0usize;
    let mut remaining = prefix_len as u32;
    while i < 16 {
        if remaining == 0 {
            return true;
        }
        let bits = if remaining >= 8 { 8 } else { remaining };
        let mask: u8 = (0xffu32 << (8 - bits)) as u8;
        if (net[i] & mask) != (addr[i] & mask) {
            return false;
        }
        remaining -= bits;
        i += 1;
    }
    true
}

#[cgroup_sock_addr(getpeername4)]
pub fn cordon_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, AF_INET);
    // getpeername programs must return exactly 1.
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn cordon_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, AF_INET6);
    1
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, family: u16) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(meta) = (unsafe { BY_COOKIE.get(&cookie) }) else {
        return;
    };
    let sa = ctx.sock_addr;
    let a = meta.orig_addr;
    unsafe {
        if family == AF_INET {
            write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes([a[12], a[13], a[14], a[15]]));
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), u32::from_ne_bytes([a[0], a[1], a[2], a[3]]));
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), u32::from_ne_bytes([a[4], a[5], a[6], a[7]]));
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), u32::from_ne_bytes([a[8], a[9], a[10], a[11]]));
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), u32::from_ne_bytes([a[12], a[13], a[14], a[15]]));
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(meta.orig_port.to_be()));
    }
}

#[sock_ops]
pub fn cordon_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let Some(meta) = (unsafe { BY_COOKIE.get(&cookie) }) else {
            return 1;
        };
        let meta = *meta;
        let tuple = sock_tuple(&ctx);
        // If this insert fails the proxy finds no metadata and refuses the
        // connection: still closed, never open.
        let _ = BY_TUPLE.insert(&tuple, &meta, 0);
        // Ask for state callbacks so both entries go when the socket closes.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        if unsafe { BY_COOKIE.get(&cookie) }.is_some() {
            let tuple = sock_tuple(&ctx);
            let _ = BY_TUPLE.remove(&tuple);
            let _ = BY_COOKIE.remove(&cookie);
        }
    }
    1
}

#[inline(always)]
fn sock_tuple(ctx: &SockOpsContext) -> SockTuple {
    // Every field is loaded unconditionally, volatile, before any branch.
    // Loads inside the v4/v6 branches were merged by LLVM into one load
    // through a phi of `ctx + offset` pointers, which the verifier refuses
    // ("dereference of modified ctx ptr"); volatile loads on every path
    // cannot be sunk or merged.
    let ops = ctx.ops;
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
        )
    };
    let (src_addr, dst_addr) = if family == u32::from(AF_INET) {
        (v4_mapped(l4.to_ne_bytes()), v4_mapped(r4.to_ne_bytes()))
    } else {
        (words_to_bytes(l6), words_to_bytes(r6))
    };
    SockTuple {
        src_addr,
        dst_addr,
        // local_port is host order; remote_port is network order in the
        // upper 16 bits on little-endian kernels.
        src_port: lport as u16,
        dst_port: u16::from_be((rport >> 16) as u16),
        _pad: 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
