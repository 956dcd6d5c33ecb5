//! Hashes shared by the datapath and the daemon. Murmur3 (x86, 32-bit) over 32-bit words:
//! cheap, branch-free, verifier-friendly, and the same on every node, which is what lets several
//! balancer nodes agree on a client's backend without talking to each other.

/// Murmur3's finaliser: every input bit affects every output bit.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// Murmur3 of four words (a masked client address as stored in `AffinityKey::addr`).
#[inline(always)]
pub const fn hash4(seed: u32, w: &[u32; 4]) -> u32 {
    let mut h = seed;
    h = round(h, w[0]);
    h = round(h, w[1]);
    h = round(h, w[2]);
    h = round(h, w[3]);
    fmix32(h ^ 16)
}

/// Murmur3 of any number of words (userspace: Maglev permutations).
pub fn hash_words(seed: u32, words: &[u32]) -> u32 {
    let mut h = seed;
    for w in words {
        h = round(h, *w);
    }
    fmix32(h ^ (words.len() as u32 * 4))
}

/// The Maglev slot for a client: `hash4(seed, masked address) % m`.
#[inline(always)]
pub const fn client_slot(seed: u32, addr: &[u32; 4], m: u32) -> u32 {
    hash4(seed, addr) % m
}

/// A cheap hash of an address (IPv4 uses `addr[0]`), for the datapath's direct-mapped tables
/// (`ADDR_FILTER`, `FIB_CACHE`); not seeded, not for client placement.
#[inline(always)]
pub const fn addr_hash(v6: bool, addr: &[u32; 4]) -> u32 {
    let x = if v6 {
        addr[0] ^ addr[1].rotate_left(7) ^ addr[2].rotate_left(14) ^ addr[3].rotate_left(21) ^ 0x6a09_e667
    } else {
        addr[0]
    };
    fmix32(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash4_equals_general_form() {
        let w = [0x0a00_0001, 7, 0, 0xffff_ffff];
        assert_eq!(hash4(42, &w), hash_words(42, &w));
    }

    #[test]
    fn murmur3_reference_vector() {
        // murmur3_32 of the 4 bytes 0x21 0x43 0x65 0x87 with seed 0x5082EDEE is 0x2362F9DE.
        assert_eq!(hash_words(0x5082_edee, &[u32::from_le_bytes([0x21, 0x43, 0x65, 0x87])]), 0x2362_f9de);
    }
}
