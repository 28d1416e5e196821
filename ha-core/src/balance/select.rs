//! The tier arithmetic of locality-aware selection, as pure functions (property-tested).
//!
//! Each tier (`SameIdc`, `SameRegion`, `Remote`) has a *health*: `min(1, overprovisioning ×
//! healthy / total)` over its non-drained endpoints. Tiers are filled nearest first: a tier takes
//! `min(health, what is left)`, so a local tier with 1 of 2 endpoints healthy and the default
//! factor 1.4 keeps 70% and spills 30% to the next tier, exactly as Envoy's priority/locality
//! weighting does. When the healths add up to less than 1, the shares are normalised to them.
//! Panic mode (every non-drained endpoint used, whatever its health) starts when the healthy
//! share of the non-drained endpoints falls below the panic threshold.

/// Counts of one tier's non-drained endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierCounts {
    /// Non-drained endpoints in the tier.
    pub total: usize,
    /// Of those, the healthy ones that count toward the tier's health (not ejected, not warming).
    pub healthy: usize,
}

/// The traffic shares of the three tiers, nearest first (summing to 1, or all 0 when nothing is
/// healthy).
///
/// ```
/// use ha_core::balance::select::{tier_shares, TierCounts};
/// let s = tier_shares(
///     [TierCounts { total: 2, healthy: 1 }, TierCounts { total: 2, healthy: 2 }, TierCounts { total: 2, healthy: 2 }],
///     1.4,
/// );
/// assert!((s[0] - 0.7).abs() < 1e-9 && (s[1] - 0.3).abs() < 1e-9 && s[2] == 0.0);
/// ```
pub fn tier_shares(tiers: [TierCounts; 3], overprovisioning: f64) -> [f64; 3] {
    let health = tiers.map(|t| {
        if t.total == 0 {
            0.0
        } else {
            (overprovisioning * t.healthy as f64 / t.total as f64).min(1.0)
        }
    });
    let sum: f64 = health.iter().sum();
    if sum <= 0.0 {
        return [0.0; 3];
    }
    if sum < 1.0 {
        return health.map(|h| h / sum);
    }
    let mut left = 1.0f64;
    health.map(|h| {
        let take = h.min(left);
        left -= take;
        take
    })
}

/// True when too few of the non-drained endpoints are healthy: below `threshold` as a share, or
/// none at all.
pub fn is_panic(tiers: [TierCounts; 3], threshold: f64) -> bool {
    let total: usize = tiers.iter().map(|t| t.total).sum();
    let healthy: usize = tiers.iter().map(|t| t.healthy).sum();
    healthy == 0 || (total > 0 && (healthy as f64) < threshold * total as f64)
}

/// Cumulative thresholds on a `u32` scale, so a pick needs one random `u32` and no float math.
pub(crate) fn cumulative(shares: [f64; 3]) -> [u64; 3] {
    let scale = u32::MAX as f64 + 1.0;
    let mut acc = 0.0;
    shares.map(|s| {
        acc += s;
        (acc * scale).round() as u64
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn tc(total: usize, healthy: usize) -> TierCounts {
        TierCounts { total, healthy }
    }

    #[test]
    fn all_healthy_stays_local() {
        assert_eq!(
            tier_shares([tc(2, 2), tc(2, 2), tc(2, 2)], 1.4),
            [1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn no_local_goes_to_region_then_remote() {
        assert_eq!(
            tier_shares([tc(2, 0), tc(2, 2), tc(2, 2)], 1.4),
            [0.0, 1.0, 0.0]
        );
        assert_eq!(
            tier_shares([tc(0, 0), tc(0, 0), tc(2, 2)], 1.4),
            [0.0, 0.0, 1.0]
        );
    }

    #[test]
    fn partial_health_is_normalised() {
        // 1 of 4 healthy everywhere, no overprovisioning: health 0.25 per tier, normalised to thirds.
        let s = tier_shares([tc(4, 1), tc(4, 1), tc(4, 1)], 1.0);
        for x in s {
            assert!((x - 1.0 / 3.0).abs() < 1e-9);
        }
        // With 1.4: 0.35 + 0.35 cover 70%, the remote tier takes the last 30%.
        let s = tier_shares([tc(4, 1), tc(4, 1), tc(4, 1)], 1.4);
        assert!(
            (s[0] - 0.35).abs() < 1e-9 && (s[1] - 0.35).abs() < 1e-9 && (s[2] - 0.3).abs() < 1e-9
        );
        assert!(is_panic([tc(4, 1), tc(4, 1), tc(4, 1)], 0.5));
        assert!(!is_panic([tc(2, 1), tc(2, 2), tc(2, 2)], 0.5));
        assert!(is_panic([tc(2, 0), tc(0, 0), tc(0, 0)], 0.0));
    }

    proptest! {
        #[test]
        fn shares_are_a_distribution(
            t in proptest::array::uniform3((0usize..20, 0usize..20)),
            over in 1.0f64..3.0,
        ) {
            let tiers = t.map(|(total, h)| tc(total, h.min(total)));
            let s = tier_shares(tiers, over);
            let sum: f64 = s.iter().sum();
            let any_healthy = tiers.iter().any(|t| t.healthy > 0);
            prop_assert!(s.iter().all(|x| *x >= 0.0 && *x <= 1.0 + 1e-12));
            if any_healthy { prop_assert!((sum - 1.0).abs() < 1e-9) } else { prop_assert_eq!(sum, 0.0) }
            // A tier with no healthy endpoint gets nothing.
            for (i, tier) in tiers.iter().enumerate() {
                if tier.healthy == 0 { prop_assert_eq!(s[i], 0.0); }
            }
        }

        #[test]
        fn nothing_spills_while_nearer_tiers_suffice(
            t in proptest::array::uniform3((1usize..20, 0usize..20)),
            over in 1.0f64..3.0,
        ) {
            let tiers = t.map(|(total, h)| tc(total, h.min(total)));
            let s = tier_shares(tiers, over);
            // Once the nearer tiers' health covers 100%, farther tiers get exactly nothing.
            let mut covered = 0.0;
            for i in 0..3 {
                if covered >= 1.0 { prop_assert_eq!(s[i], 0.0); }
                covered += (over * tiers[i].healthy as f64 / tiers[i].total as f64).min(1.0);
            }
        }

        #[test]
        fn local_share_follows_overprovisioning(total in 1usize..50, healthy in 0usize..50, over in 1.0f64..3.0) {
            let healthy = healthy.min(total);
            let far = tc(10, 10);
            let s = tier_shares([tc(total, healthy), far, far], over);
            let expect = (over * healthy as f64 / total as f64).min(1.0);
            prop_assert!((s[0] - expect).abs() < 1e-9);
            prop_assert!((s[1] - (1.0 - expect)).abs() < 1e-9);
        }
    }
}
