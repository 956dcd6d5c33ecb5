//! Internet checksum helpers (RFC 1071 sums, RFC 1624 incremental updates).
//!
//! Values are 16-bit words *as they sit in memory* (loaded with native byte order): the one's
//! complement sum is independent of byte order as long as every word is read the same way, so the
//! datapath never swaps bytes to update a checksum.

/// Folds a 64-bit one's complement accumulator into 16 bits (not inverted).
#[inline(always)]
pub const fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Adds a 32-bit memory word to an accumulator as its two 16-bit halves.
#[inline(always)]
const fn add32(acc: u64, v: u32) -> u64 {
    acc + (v & 0xffff) as u64 + (v >> 16) as u64
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word of the covered data changed `old -> new`.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u64 + (!old) as u64 + new as u64)
}

/// The checksum after one 32-bit word (e.g. an IPv4 address) changed `old -> new`.
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    !fold(add32(add32((!check) as u64, !old), new))
}

/// The checksum after an address and a port changed together (one update of a TCP/UDP checksum,
/// whose pseudo-header covers the address and whose header covers the port).
#[inline(always)]
pub const fn replace_addr_port(check: u16, old_addr: u32, new_addr: u32, old_port: u16, new_port: u16) -> u16 {
    let acc = add32(add32((!check) as u64, !old_addr), new_addr);
    !fold(acc + (!old_port) as u64 + new_port as u64)
}

/// The checksum after a 128-bit value (an IPv6 address, as four memory words) changed.
#[inline(always)]
pub const fn replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    apply(check, delta16(old, new))
}

/// The one's complement sum that replacing a 128-bit value `old -> new` adds to a checksum's
/// complement (`replace16` is `apply` of it). Lets a caller drop both values once it has the
/// delta (one register instead of eight words).
#[inline(always)]
pub const fn delta16(old: &[u32; 4], new: &[u32; 4]) -> u64 {
    let mut acc = 0u64;
    let mut i = 0;
    while i < 4 {
        acc = add32(add32(acc, !old[i]), new[i]);
        i += 1;
    }
    acc
}

/// A checksum with a `delta16` applied.
#[inline(always)]
pub const fn apply(check: u16, delta: u64) -> u16 {
    !fold((!check) as u64 + delta)
}

/// A UDP checksum that computes to 0 is sent as 0xffff (RFC 768); 0 on the wire means "none".
#[inline(always)]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// One's complement sum of `data` (native-order words; an odd last byte is padded with zero),
/// added to `acc`. For tests and userspace; the datapath only updates checksums incrementally.
pub fn sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_ne_bytes([*last, 0]) as u64;
    }
    acc
}

/// The full Internet checksum of `data` (e.g. an IPv4 header with its checksum field zeroed).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

/// Full TCP/UDP checksum over the IPv4 pseudo-header and `l4` (the L4 header with its checksum
/// field zeroed, plus payload). `src`/`dst` are addresses as in memory (network order).
pub fn l4_checksum_v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> u16 {
    let mut acc = sum(0, &src);
    acc = sum(acc, &dst);
    acc = sum(acc, &[0, proto]);
    acc = sum(acc, &(l4.len() as u16).to_be_bytes());
    acc = sum(acc, l4);
    !fold(acc)
}

/// Full TCP/UDP/ICMPv6 checksum over the IPv6 pseudo-header and `l4` (checksum field zeroed).
pub fn l4_checksum_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, l4: &[u8]) -> u16 {
    let mut acc = sum(0, &src);
    acc = sum(acc, &dst);
    acc = sum(acc, &(l4.len() as u32).to_be_bytes());
    acc = sum(acc, &[0, 0, 0, next_header]);
    acc = sum(acc, l4);
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator so the tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn word32(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn known_ipv4_header() {
        // Example header from RFC 1071 discussions / Wikipedia: checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h).to_ne_bytes(), [0xb8, 0x61]);
        h[10..12].copy_from_slice(&[0xb8, 0x61]);
        assert_eq!(checksum(&h), 0, "a header with a valid checksum sums to zero");
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..20_000 {
            let len = (20 + (rng.next() % 40) as usize) & !1;
            let mut data: [u8; 64] = [0; 64];
            for b in data.iter_mut() {
                *b = rng.next() as u8;
            }
            let data = &mut data[..len];
            data[10] = 0;
            data[11] = 0;
            let c = checksum(data);
            data[10..12].copy_from_slice(&c.to_ne_bytes());

            // Change a 32-bit word at an even offset past the checksum, and a 16-bit word.
            let off4 = 12 + 2 * (rng.next() % ((len as u64 - 16) / 2)) as usize;
            let old4 = word32(data, off4);
            let new4 = rng.next() as u32;
            data[off4..off4 + 4].copy_from_slice(&new4.to_ne_bytes());
            let c1 = replace4(u16::from_ne_bytes([data[10], data[11]]), old4, new4);
            data[10..12].copy_from_slice(&c1.to_ne_bytes());

            let off2 = 12 + 2 * (rng.next() % ((len as u64 - 14) / 2)) as usize;
            let old2 = u16::from_ne_bytes([data[off2], data[off2 + 1]]);
            let new2 = rng.next() as u16;
            data[off2..off2 + 2].copy_from_slice(&new2.to_ne_bytes());
            let c2 = replace2(c1, old2, new2);
            data[10..12].copy_from_slice(&c2.to_ne_bytes());

            assert_eq!(checksum(data), 0, "incremental update disagrees with a full sum");
            let mut z = data.to_vec();
            z[10] = 0;
            z[11] = 0;
            let full = checksum(&z);
            // 0x0000 and 0xffff are the same value in one's complement; RFC 1624 never yields
            // 0x0000 from eqn. 3 unless the full sum does too.
            assert!(full == c2 || (full == 0xffff && c2 == 0) || (full == 0 && c2 == 0xffff));
        }
    }

    #[test]
    fn delta16_matches_full_recompute() {
        let mut rng = Rng(0x0bad_cafe_f00d_1234);
        for _ in 0..20_000 {
            // A 40-byte header with its checksum at 10..12 and a 16-byte field at 16..32.
            let mut data = [0u8; 40];
            for b in data.iter_mut() {
                *b = rng.next() as u8;
            }
            data[10] = 0;
            data[11] = 0;
            let c = checksum(&data);
            let old = [word32(&data, 16), word32(&data, 20), word32(&data, 24), word32(&data, 28)];
            let new = [rng.next() as u32, rng.next() as u32, rng.next() as u32, rng.next() as u32];
            for (i, w) in new.iter().enumerate() {
                data[16 + 4 * i..20 + 4 * i].copy_from_slice(&w.to_ne_bytes());
            }
            let c1 = apply(c, delta16(&old, &new));
            data[10..12].copy_from_slice(&c1.to_ne_bytes());
            assert_eq!(checksum(&data), 0, "delta16 update disagrees with a full sum");
        }
    }

    #[test]
    fn addr_and_port_together() {
        let src = [10, 0, 0, 1];
        let dst = [10, 0, 0, 100];
        let mut l4 = [0u8; 28];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&80u16.to_be_bytes());
        l4[4..6].copy_from_slice(&28u16.to_be_bytes());
        for (i, b) in l4[8..].iter_mut().enumerate() {
            *b = i as u8 * 7;
        }
        let c = l4_checksum_v4(src, dst, 17, &l4);
        let new_dst = [10, 1, 0, 11];
        let new_port = 8080u16.to_be_bytes();
        let inc = replace_addr_port(
            c,
            u32::from_ne_bytes(dst),
            u32::from_ne_bytes(new_dst),
            u16::from_ne_bytes([l4[2], l4[3]]),
            u16::from_ne_bytes(new_port),
        );
        l4[2..4].copy_from_slice(&new_port);
        assert_eq!(inc, l4_checksum_v4(src, new_dst, 17, &l4));
    }

    #[test]
    fn ipv6_address_change() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64];
        let new = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
        let l4 = [0x9c, 0x40, 0, 80, 0, 12, 0, 0, 1, 2, 3, 4];
        let c = l4_checksum_v6(src, dst, 17, &l4);
        let words = |a: [u8; 16]| core::array::from_fn::<u32, 4, _>(|i| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]));
        assert_eq!(replace16(c, &words(dst), &words(new)), l4_checksum_v6(src, new, 17, &l4));
    }

    #[test]
    fn udp_zero_is_sent_as_ffff() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
    }
}
