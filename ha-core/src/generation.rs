//! Generations: a counter per dependency bumped whenever its master changes (a backend that
//! publishes the master itself should use [`MasterWatch`](crate::master::MasterWatch), which keeps
//! the address and the generation in one snapshot). Every pooled
//! connection carries the generation it was made in, and a connection of an older generation is
//! fenced (refused) instead of being used to write to a demoted master.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A generation number.
pub type Generation = u64;

/// The shared generation counter of one dependency.
///
/// ```
/// use ha_core::GenerationCounter;
/// let g = GenerationCounter::new();
/// let conn_gen = g.current();
/// assert!(g.check(conn_gen).is_ok());
/// g.bump();
/// assert!(g.check(conn_gen).unwrap_err().is_fenced());
/// ```
#[derive(Debug, Clone, Default)]
pub struct GenerationCounter {
    inner: Arc<AtomicU64>,
}

impl GenerationCounter {
    /// A counter at generation 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current generation.
    pub fn current(&self) -> Generation {
        self.inner.load(Ordering::Acquire)
    }

    /// Starts a new generation and returns it.
    pub fn bump(&self) -> Generation {
        self.inner.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// `Ok` when `connection` is the current generation, else [`HaError::Fenced`](crate::HaError::Fenced).
    pub fn check(&self, connection: Generation) -> Result<(), crate::HaError> {
        let current = self.current();
        if connection == current {
            Ok(())
        } else {
            Err(crate::HaError::Fenced {
                connection,
                current,
            })
        }
    }
}
