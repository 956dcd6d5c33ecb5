//! The one userspace layer over bpf(2) for what aya 0.14 does not wrap (feature `sys`): the
//! `union bpf_attr` members lb uses, laid out by hand, and raw eBPF instructions for the tiny
//! programs the lab and the benchmarks load themselves (no eBPF toolchain needed for those).
//! The daemon's batch map operations, point lookups and deletes, the lab's TCX/XDP helper
//! programs and the benchmarks' baselines, live-frames generator and test runs all go through
//! here.

extern crate std;

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    string::String,
    vec,
};

pub const BPF_MAP_CREATE: libc::c_long = 0;
pub const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub const BPF_PROG_LOAD: libc::c_long = 5;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
pub const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_LINK_UPDATE: libc::c_long = 29;

pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// Attach types.
pub const BPF_XDP: u32 = 37;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Helper function ids.
pub const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
pub const FUNC_GET_PRANDOM_U32: i32 = 7;
pub const FUNC_SKB_VLAN_PUSH: i32 = 18;
pub const FUNC_SKB_VLAN_POP: i32 = 19;

/// bpf(2) with the attribute `attr` (a prefix of `union bpf_attr`): its non-negative result.
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised bpf_attr prefix of size_of::<T>() bytes; every
    // pointer it holds (instructions, keys, values, buffers) is the caller's and outlives the
    // call, with the sizes the map or program expects.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, core::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// bpf(2) for a command that returns a new file descriptor.
pub fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: the call returned a new file descriptor that nothing else owns.
    bpf(cmd, attr).map(|rc| unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// A BPF object's name as the kernel takes it (15 bytes and a NUL at most).
pub fn object_name(name: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    for (d, s) in n.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    n
}

// ------------------------------------------------------------------------------------------------
// Attributes.

/// BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
pub struct ProgLoadAttr {
    pub prog_type: u32,
    pub insn_cnt: u32,
    pub insns: u64,
    pub license: u64,
    pub log_level: u32,
    pub log_size: u32,
    pub log_buf: u64,
    pub kern_version: u32,
    pub prog_flags: u32,
    pub prog_name: [u8; 16],
    pub prog_ifindex: u32,
    pub expected_attach_type: u32,
}

/// BPF_MAP_CREATE, up to `map_name`.
#[repr(C)]
#[derive(Default)]
pub struct MapCreateAttr {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub inner_map_fd: u32,
    pub numa_node: u32,
    pub map_name: [u8; 16],
}

/// BPF_MAP_LOOKUP_ELEM / UPDATE_ELEM / DELETE_ELEM.
#[repr(C)]
#[derive(Default)]
pub struct MapElemAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub value: u64,
    pub flags: u64,
}

/// The `batch` member (BPF_MAP_LOOKUP_BATCH, UPDATE_BATCH, DELETE_BATCH; kernel 5.6+).
#[repr(C)]
#[derive(Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
pub struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    pub _pad: u32,
}

/// BPF_LINK_CREATE with room for its `tcx` member (relative fd, expected revision).
#[repr(C)]
#[derive(Default)]
pub struct LinkCreateAttr {
    pub prog_fd: u32,
    pub target_ifindex: u32,
    pub attach_type: u32,
    pub flags: u32,
    pub relative_fd: u32,
    pub _pad: u32,
    pub expected_revision: u64,
}

/// BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
pub struct LinkUpdateAttr {
    pub link_fd: u32,
    pub new_prog_fd: u32,
    pub flags: u32,
    pub old_prog_fd: u32,
}

// ------------------------------------------------------------------------------------------------
// Commands.

/// A program the verifier refused, with its log.
#[derive(Debug)]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}; verifier log:\n{}", self.error, self.log)
    }
}

impl std::error::Error for LoadError {}

/// Loads raw instructions as a program of `prog_type` (`expected_attach_type`: 0, or e.g.
/// [`BPF_XDP`] so that an XDP link may swap it with a program loaded as aya loads lb's).
pub fn load_program(name: &str, prog_type: u32, expected_attach_type: u32, insns: &[Insn]) -> Result<OwnedFd, LoadError> {
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: object_name(name),
        expected_attach_type,
        ..Default::default()
    };
    bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|error| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        LoadError { error, log: String::from_utf8_lossy(&log[..end]).into_owned() }
    })
}

/// A map without BTF.
pub fn create_map(name: &str, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr { map_type, key_size, value_size, max_entries, map_name: object_name(name), ..Default::default() };
    bpf_fd(BPF_MAP_CREATE, &mut attr)
}

/// BPF_MAP_LOOKUP_ELEM into `value` (of the map's value size; per-CPU maps: one per possible
/// CPU). `Ok(false)`: no such key.
///
/// # Safety
/// `key` and `value` must point at memory of the map's key and value sizes.
pub unsafe fn lookup_elem(fd: RawFd, key: *const u8, value: *mut u8) -> io::Result<bool> {
    let mut attr = MapElemAttr { map_fd: fd as u32, key: key as u64, value: value as u64, ..Default::default() };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// BPF_MAP_DELETE_ELEM; whether the key was there.
///
/// # Safety
/// `key` must point at memory of the map's key size.
pub unsafe fn delete_elem(fd: RawFd, key: *const u8) -> io::Result<bool> {
    let mut attr = MapElemAttr { map_fd: fd as u32, key: key as u64, ..Default::default() };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The kernel has no batch operations for this map (before 5.6, or a map type without them).
pub fn batch_unsupported(e: &io::Error) -> bool {
    // 524: the kernel's ENOTSUPP, which libc does not name.
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(524) | Some(libc::EOPNOTSUPP))
}

/// BPF_PROG_TEST_RUN of `prog` on `data` with context `ctx`: (return value, kernel ns per
/// run). `out`: where the output frame goes. `live_batch`: run with
/// BPF_F_TEST_XDP_LIVE_FRAMES in batches of that size (no output then).
pub fn test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out: Option<&mut [u8]>,
    ctx: &[u8],
    repeat: u32,
    live_batch: Option<u32>,
) -> io::Result<(u32, u32)> {
    let (data_out, data_size_out) = match out {
        Some(o) => (o.as_mut_ptr() as u64, o.len() as u32),
        None => (0, 0),
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out,
        data_in: data.as_ptr() as u64,
        data_out,
        repeat,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        flags: if live_batch.is_some() { BPF_F_TEST_XDP_LIVE_FRAMES } else { 0 },
        batch_size: live_batch.unwrap_or(0),
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.retval, attr.duration))
}

/// A link attaching `prog` to `ifindex` (of the calling thread's network namespace) at
/// `attach_type` ([`BPF_XDP`]: driver mode where the device has one; [`BPF_TCX_INGRESS`],
/// [`BPF_TCX_EGRESS`]); detached when the link closes or the device goes.
pub fn link_create(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type, ..Default::default() };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// Swaps the program of a link in place (an XDP device keeps its rings and NAPI).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

// ------------------------------------------------------------------------------------------------
// Raw instructions.

/// One eBPF instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src register in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

pub const R0: u8 = 0;
pub const R1: u8 = 1;
pub const R2: u8 = 2;
pub const R3: u8 = 3;
pub const R4: u8 = 4;
pub const R5: u8 = 5;
pub const R6: u8 = 6;
pub const R7: u8 = 7;
pub const R10: u8 = 10;

pub const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}
/// `dst = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
pub const fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
/// `dst = src` (BPF_ALU64 | BPF_MOV | BPF_X).
pub const fn mov_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
/// `dst += imm`
pub const fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
/// `dst += src`
pub const fn add_reg(dst: u8, src: u8) -> Insn {
    insn(0x0f, dst, src, 0, 0)
}
/// `dst &= imm`
pub const fn and_imm(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}
/// `dst >>= imm` (logical)
pub const fn rsh_imm(dst: u8, imm: i32) -> Insn {
    insn(0x77, dst, 0, 0, imm)
}
/// `dst ^= imm`
pub const fn xor_imm(dst: u8, imm: i32) -> Insn {
    insn(0xa7, dst, 0, 0, imm)
}
/// `dst = *(u32 *)(src + off)`
pub const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
/// `dst = *(u64 *)(src + off)`
pub const fn ldx_dw(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x79, dst, src, off, 0)
}
/// `*(u32 *)(dst + off) = imm`
pub const fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm)
}
/// `*(u16 *)(dst + off) = imm`
pub const fn st_h(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x6a, dst, 0, off, imm)
}
/// `*(u16 *)(dst + off) = src`
pub const fn stx_h(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x6b, dst, src, off, 0)
}
/// `*(u64 *)(dst + off) = src`
pub const fn stx_dw(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x7b, dst, src, off, 0)
}
/// `if dst > src goto +off` (unsigned)
pub const fn jgt_reg(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x2d, dst, src, off, 0)
}
/// `if dst == imm goto +off`
pub const fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm)
}
/// `if dst != imm goto +off`
pub const fn jne_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x55, dst, 0, off, imm)
}
/// `call helper`
pub const fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
pub const fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// `dst = map` (BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD): two instruction slots.
pub const fn ld_map_fd(dst: u8, fd: RawFd) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        assert_eq!(core::mem::size_of::<Insn>(), 8);
        // r0 = 2; exit
        assert_eq!(mov_imm(R0, 2), Insn { code: 0xb7, regs: 0, off: 0, imm: 2 });
        assert_eq!(ldx_w(R2, R6, 20), Insn { code: 0x61, regs: 0x62, off: 20, imm: 0 });
        assert_eq!(ld_map_fd(R1, 7)[0].regs, 0x11);
        assert_eq!(object_name("a_name_longer_than_fifteen")[15], 0);
    }

    #[test]
    fn attributes_have_the_kernels_sizes() {
        assert_eq!(core::mem::size_of::<BatchAttr>(), 56);
        assert_eq!(core::mem::size_of::<MapElemAttr>(), 32);
        assert_eq!(core::mem::size_of::<TestRunAttr>(), 80);
        assert_eq!(core::mem::size_of::<ProgLoadAttr>(), 72);
    }
}
