//! Tiny eBPF programs the lab attaches itself, written as raw instructions and loaded with bpf(2)
//! (the lab must not depend on the eBPF toolchain): VLAN device stand-ins and an XDP_PASS
//! program.
//!
//! ## XDP_PASS on veth peers that receive XDP_TX frames
//!
//! A veth delivers frames another XDP program sent with XDP_TX into its peer's ring, and kicks the
//! peer's NAPI only when the peer has an XDP program itself (`veth_xdp_flush`); with only GRO on,
//! the frames wait until other traffic kicks it, which takes anything up to a second (observed on
//! 6.18: forwarded TCP segments held back 50-500 ms, so connections stall in retransmissions).
//! XDP_REDIRECT flushes either way. So a peer that receives XDP_TX frames gets
//! [`attach_xdp_pass_here`].
//!
//! ## 802.1Q / 802.1ad on the lab's wires without VLAN devices
//!
//! Kernels built without `CONFIG_VLAN_8021Q` (this project's test machine is one) have no
//! `eth0.100`. The lab gets the same behaviour from a pair of tiny tc programs per interface,
//! attached with TCX links (kernel 6.6+) and written here as raw eBPF instructions (the lab must
//! not depend on the eBPF toolchain):
//!
//! - egress: push the tag(s) (`bpf_skb_vlan_push`), as a VLAN device does for everything the
//!   kernel sends;
//! - ingress: accept only frames carrying exactly the expected tag(s), pop them
//!   (`bpf_skb_vlan_pop`) and hand the untagged frame to the stack; drop everything else (an
//!   untagged frame, another VLAN), as a VLAN device never sees it.
//!
//! So the kernel of every endpoint sees untagged traffic on its interface, while the wire between
//! them carries tagged frames only. An XDP program on the interface runs before tc ingress and
//! sees the tags in the frame data; what it sends with XDP_TX or XDP_REDIRECT bypasses tc
//! egress, so it must carry the tags itself, or the receiving end drops it. What it passes to the
//! kernel (XDP_PASS) is untagged by the stack and then by the ingress program, as a VLAN device
//! would take it.
//!
//! A pushed tag is first kept as skb metadata (hardware-offload style); the transmit path writes
//! it into the frame only when the device offers no tx VLAN offload. veth does offer it (and then
//! carries the tag as metadata to its peer, where XDP does not see it), so every interface that
//! sends tagged frames needs `ethtool -K <if> txvlan off tx-vlan-stag-hw-insert off`, exactly as
//! a real VLAN device on a veth does.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use anyhow::{Result, bail, ensure};

/// `ETH_P_8021Q`.
pub const ETH_P_8021Q: u16 = 0x8100;
/// `ETH_P_8021AD`.
pub const ETH_P_8021AD: u16 = 0x88a8;

// bpf(2) commands, program and attach types, helpers and return codes (uapi/linux/bpf.h; checked
// against the kernel's BTF).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_PASS: i32 = 2;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_FUNC_SKB_VLAN_PUSH: i32 = 18;
const BPF_FUNC_SKB_VLAN_POP: i32 = 19;
const TCX_PASS: i32 = 0;
const TCX_DROP: i32 = 2;
// struct __sk_buff offsets.
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_VLAN_TCI: i16 = 24;
const SKB_VLAN_PROTO: i16 = 28;

/// One eBPF instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
struct Insn {
    code: u8,
    /// dst register in the low nibble, src register in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R6: u8 = 6;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}
/// `dst = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
const fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
/// `dst = src` (BPF_ALU64 | BPF_MOV | BPF_X).
const fn mov_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
/// `dst = *(u32 *)(src + off)` (BPF_LDX | BPF_MEM | BPF_W).
const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
/// `dst &= imm` (BPF_ALU64 | BPF_AND | BPF_K).
const fn and_imm(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}
/// `if dst == imm goto +off` (BPF_JMP | BPF_JEQ | BPF_K); the offset is patched later.
const fn jeq_imm(dst: u8, imm: i32) -> Insn {
    insn(0x15, dst, 0, 0, imm)
}
/// `if dst != imm goto +off` (BPF_JMP | BPF_JNE | BPF_K); the offset is patched later.
const fn jne_imm(dst: u8, imm: i32) -> Insn {
    insn(0x55, dst, 0, 0, imm)
}
/// `call helper` (BPF_JMP | BPF_CALL).
const fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
/// `exit` (BPF_JMP | BPF_EXIT).
const fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}

/// A protocol number as the kernel holds a `__be16` in a register (host-order load of the
/// big-endian bytes).
fn be16_value(proto: u16) -> i32 {
    i32::from(u16::from_ne_bytes(proto.to_be_bytes()))
}

/// Egress: push the tags, innermost first (each push moves the previous tag into the frame).
fn egress_program(tags: &[(u16, u16)]) -> Vec<Insn> {
    let mut p = vec![mov_reg(R6, R1)];
    for &(proto, vid) in tags.iter().rev() {
        p.extend([
            mov_reg(R1, R6),
            mov_imm(R2, be16_value(proto)),
            mov_imm(R3, i32::from(vid)),
            call(BPF_FUNC_SKB_VLAN_PUSH),
        ]);
    }
    p.extend([mov_imm(R0, TCX_PASS), exit()]);
    p
}

/// Ingress: the stack has moved the outer tag into skb metadata already; check it and pop it
/// (which moves the next tag up), and so on; then no tag may be left. Anything else is dropped.
fn ingress_program(tags: &[(u16, u16)]) -> Vec<Insn> {
    let mut p = vec![mov_reg(R6, R1)];
    // Jumps to the drop label, patched once its position is known.
    let mut to_drop = Vec::new();
    let mut jump = |p: &mut Vec<Insn>, i: Insn| {
        to_drop.push(p.len());
        p.push(i);
    };
    for &(proto, vid) in tags {
        p.push(ldx_w(R2, R6, SKB_VLAN_PRESENT));
        jump(&mut p, jeq_imm(R2, 0));
        p.push(ldx_w(R2, R6, SKB_VLAN_PROTO));
        jump(&mut p, jne_imm(R2, be16_value(proto)));
        p.push(ldx_w(R2, R6, SKB_VLAN_TCI));
        p.push(and_imm(R2, 0x0fff));
        jump(&mut p, jne_imm(R2, i32::from(vid)));
        p.push(mov_reg(R1, R6));
        p.push(call(BPF_FUNC_SKB_VLAN_POP));
    }
    p.push(ldx_w(R2, R6, SKB_VLAN_PRESENT));
    jump(&mut p, jne_imm(R2, 0));
    p.push(mov_imm(R0, TCX_PASS));
    p.push(exit());
    let drop_at = p.len();
    p.push(mov_imm(R0, TCX_DROP));
    p.push(exit());
    for at in to_drop {
        p[at].off = (drop_at - at - 1) as i16;
    }
    p
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` points to a live, fully initialised attribute struct of `size` bytes whose
    // pointers (instructions, license, log buffer) outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as libc::c_uint) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the call returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE with its `tcx` member.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn load(name: &str, prog_type: u32, insns: &[Insn]) -> Result<OwnedFd> {
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    bpf(
        BPF_PROG_LOAD,
        (&raw mut attr).cast(),
        size_of::<ProgLoadAttr>(),
    )
    .or_else(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        bail!(
            "loading the lab's program {name}: {e}; verifier log:\n{}",
            String::from_utf8_lossy(&log[..end])
        )
    })
}

fn attach(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    bpf(
        BPF_LINK_CREATE,
        (&raw mut attr).cast(),
        size_of::<LinkCreateAttr>(),
    )
}

/// Makes interface `ifname` of the calling thread's network namespace behave like a VLAN device
/// for `tags` (outermost first; see the module docs). The returned TCX links keep the programs
/// attached until they are closed or the interface goes away.
pub(super) fn attach_here(ifname: &str, tags: &[(u16, u16)]) -> Result<Vec<OwnedFd>> {
    ensure!(
        (1..=2).contains(&tags.len())
            && tags.iter().all(|&(p, vid)| {
                (p == ETH_P_8021Q || p == ETH_P_8021AD) && (1..=4094).contains(&vid)
            }),
        "VLAN tags must be one or two 802.1Q/802.1ad tags with VLAN ids 1..=4094, got {tags:x?}"
    );
    let ifindex = nix::net::if_::if_nametoindex(ifname)
        .map_err(|e| anyhow::anyhow!("no interface {ifname}: {e}"))?;
    let ingress = load(
        "lab_vlan_in",
        BPF_PROG_TYPE_SCHED_CLS,
        &ingress_program(tags),
    )?;
    let egress = load(
        "lab_vlan_out",
        BPF_PROG_TYPE_SCHED_CLS,
        &egress_program(tags),
    )?;
    let mut links = Vec::new();
    for (prog, at, what) in [
        (&ingress, BPF_TCX_INGRESS, "ingress"),
        (&egress, BPF_TCX_EGRESS, "egress"),
    ] {
        match attach(prog, ifindex, at) {
            Ok(link) => links.push(link),
            Err(e) => bail!("attaching the lab's VLAN program to {ifname} {what} (TCX): {e}"),
        }
    }
    Ok(links)
}

/// Attaches an XDP program that passes everything to interface `ifname` of the calling thread's
/// network namespace (native mode), so that frames XDP_TX'd into it by its veth peer are
/// delivered at once (see the module docs). Attached while the returned link is open or until
/// the interface goes away.
pub(super) fn attach_xdp_pass_here(ifname: &str) -> Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(ifname)
        .map_err(|e| anyhow::anyhow!("no interface {ifname}: {e}"))?;
    let prog = load(
        "lab_xdp_pass",
        BPF_PROG_TYPE_XDP,
        &[mov_imm(R0, XDP_PASS), exit()],
    )?;
    attach(&prog, ifindex, BPF_XDP)
        .map_err(|e| anyhow::anyhow!("attaching the lab's XDP_PASS program to {ifname}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_jump_to_the_drop_label() {
        let tags = [(ETH_P_8021AD, 20), (ETH_P_8021Q, 100)];
        let p = ingress_program(&tags);
        let drop_at = p.len() - 2;
        assert_eq!(p[drop_at], mov_imm(R0, TCX_DROP));
        let mut jumps = 0;
        for (i, ins) in p.iter().enumerate() {
            if ins.code == 0x15 || ins.code == 0x55 {
                jumps += 1;
                assert_eq!(i as i16 + 1 + ins.off, drop_at as i16, "jump at {i}");
            }
        }
        assert_eq!(jumps, 7, "3 checks per tag and the no-tag-left check");
        // Tag protocols are compared as the kernel holds a __be16.
        let protos: Vec<i32> = p
            .windows(2)
            .filter(|w| w[0] == ldx_w(R2, R6, SKB_VLAN_PROTO))
            .map(|w| w[1].imm)
            .collect();
        assert_eq!(
            protos,
            vec![be16_value(ETH_P_8021AD), be16_value(ETH_P_8021Q)]
        );
        let e = egress_program(&tags);
        let pushes: Vec<i32> = e
            .windows(4)
            .filter(|w| w[3] == call(BPF_FUNC_SKB_VLAN_PUSH))
            .map(|w| w[2].imm)
            .collect();
        assert_eq!(pushes, vec![100, 20], "innermost first");
    }
}
