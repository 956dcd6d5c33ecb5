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

use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::{Result, bail, ensure};
use lb_common::sys::{
    self, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP, BPF_TCX_EGRESS, BPF_TCX_INGRESS, BPF_XDP, FUNC_SKB_VLAN_POP as BPF_FUNC_SKB_VLAN_POP,
    FUNC_SKB_VLAN_PUSH as BPF_FUNC_SKB_VLAN_PUSH, Insn, R0, R1, R2, R3, R6, and_imm, call, exit, ldx_w, mov_imm, mov_reg,
};

/// `ETH_P_8021Q`.
pub const ETH_P_8021Q: u16 = 0x8100;
/// `ETH_P_8021AD`.
pub const ETH_P_8021AD: u16 = 0x88a8;

// Return codes (uapi/linux/bpf.h) and `struct __sk_buff` offsets.
const XDP_PASS: i32 = 2;
const TCX_PASS: i32 = 0;
const TCX_DROP: i32 = 2;
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_VLAN_TCI: i16 = 24;
const SKB_VLAN_PROTO: i16 = 28;

/// `if dst == imm goto` the drop label (the offset is patched once it is known).
const fn jeq_imm(dst: u8, imm: i32) -> Insn {
    sys::jeq_imm(dst, imm, 0)
}
/// `if dst != imm goto` the drop label (patched as above).
const fn jne_imm(dst: u8, imm: i32) -> Insn {
    sys::jne_imm(dst, imm, 0)
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

fn load(name: &str, prog_type: u32, insns: &[Insn]) -> Result<OwnedFd> {
    sys::load_program(name, prog_type, 0, insns).or_else(|e| bail!("loading the lab's program {name}: {e}"))
}

fn attach(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    sys::link_create(prog.as_fd(), ifindex, attach_type)
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
