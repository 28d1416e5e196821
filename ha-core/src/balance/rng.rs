//! The injectable RNG of the balancer's picks.
//!
//! By default every pick draws from a per-thread xorshift generator, so cloning a balancer (which
//! `Failover` does once per call) costs nothing. Tests seed it for deterministic picks.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// An RNG that can give each clone of a balancer its own stream.
pub trait ForkRng: RngCore {
    /// A generator for clone number `stream`, independent of `self`'s own stream.
    fn fork(&self, stream: u64) -> Self;

    /// False when [`ForkRng::fork`] ignores `stream` (a per-thread generator): cloning the
    /// balancer then skips counting its clones (one shared atomic less per call through
    /// `Failover`, which clones it for a possible retry).
    fn uses_stream(&self) -> bool {
        true
    }
}

impl ForkRng for SmallRng {
    fn fork(&self, stream: u64) -> Self {
        let mut parent = self.clone();
        SmallRng::seed_from_u64(parent.next_u64() ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

thread_local! {
    static STATE: Cell<u64> = Cell::new({
        // Seeded from std's per-process random keys: no extra dependency, never zero.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5EED);
        h.finish() | 1
    });
}

/// The default pick RNG: a per-thread xorshift64* (fast, not cryptographic), or a seeded
/// [`SmallRng`] for deterministic tests.
///
/// ```
/// use ha_core::balance::PickRng;
/// use rand::RngCore;
/// let (mut a, mut b) = (PickRng::seeded(7), PickRng::seeded(7));
/// assert_eq!(a.next_u64(), b.next_u64());
/// ```
#[derive(Debug, Clone, Default)]
pub struct PickRng {
    seeded: Option<SmallRng>,
}

impl PickRng {
    /// Draws from the per-thread generator.
    pub fn thread() -> Self {
        PickRng { seeded: None }
    }

    /// A deterministic generator.
    pub fn seeded(seed: u64) -> Self {
        PickRng {
            seeded: Some(SmallRng::seed_from_u64(seed)),
        }
    }
}

impl ForkRng for PickRng {
    fn fork(&self, stream: u64) -> Self {
        PickRng {
            seeded: self.seeded.as_ref().map(|r| r.fork(stream)),
        }
    }

    fn uses_stream(&self) -> bool {
        self.seeded.is_some()
    }
}

impl RngCore for PickRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        match &mut self.seeded {
            Some(r) => r.next_u64(),
            None => STATE.with(|s| {
                let mut x = s.get();
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                s.set(x);
                x.wrapping_mul(0x2545_F491_4F6C_DD1D)
            }),
        }
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
