//! One limit line's per-key state with nginx's integer arithmetic, sharded for concurrency.
//!
//! Why this is not governor's keyed limiter: governor's GCRA decides and commits in one step
//! (`check_key`), keeps a nanosecond theoretical arrival time and exposes neither that time nor
//! a read-only look-up. nginx's `limit_req` needs three things governor cannot express on its
//! own state: (1) integer milli-request units with truncation (`7r/m` is 116 milli-requests per
//! second, and `rate * ms / 1000` is truncated on every update), (2) a read-only look-up of
//! every line before any line is charged (rule 11 of NGINX-LIMIT-REQ.md), and (3) the hold of an
//! admitted request (`delay=N`), which needs the exact excess after admission. Where nginx's
//! integers are exact (a whole r/s rate whose period is a whole number of nanoseconds, whole-ms
//! request times) this arithmetic *is* governor's GCRA with a burst capacity of `burst + 1`; the
//! property test `agrees_with_governor` checks that against governor itself, request by request.
//!
//! Memory: governor keeps every key forever (governor#171). Here each zone counts its keys,
//! drops drained ones (a drained bucket is indistinguishable from a new key, so dropping it
//! changes no outcome) and holds a hard cap.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::Mutex;

/// The most shards a zone has. Two threads on distinct keys only meet on a lock (and bounce its
/// cache line between cores) when their keys share a shard, so there are many; but each shard
/// is a lock line and a table of its own, so too many spread a busy zone over more cache than
/// it needs: about [`KEYS_PER_SHARD`] keys each at the cap, 64 bytes of lock and table header
/// each, at most this many (64 KB).
const MAX_SHARDS: usize = 1024;
/// Keys per shard the shard count is sized for at the cap.
const KEYS_PER_SHARD: usize = 64;

/// Shards for a zone capped at `max_keys`: a power of two, 1 for tiny caps (then the forced
/// eviction picks the zone-wide least recently seen key, exactly like nginx).
fn shard_count(max_keys: usize) -> usize {
    (max_keys / KEYS_PER_SHARD)
        .max(1)
        .next_power_of_two()
        .min(MAX_SHARDS)
}

/// The most bytes a shard's table may keep allocated: what a fresh table for `cap` keys takes.
/// Forced removals leave tombstones, and hashbrown answers a table full of tombstones by
/// doubling it; a shard that grew past this is rehashed back to its size (at most `cap` keys).
fn table_bound(cap: usize) -> usize {
    HashTable::<Entry>::with_capacity(cap).allocation_size()
}

/// The most keys one shard holds: its even share of the cap with headroom (a random hash does
/// not spread keys perfectly evenly), never more than the cap. This is what bounds each hash
/// table's allocation, and so the zone's memory, by the cap however many keys pass through.
fn shard_cap(max_keys: usize, shards: usize) -> usize {
    let even = max_keys.div_ceil(shards);
    (2 * even).max(8).min(max_keys).max(1)
}

/// A line's parameters in nginx's integer units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    /// Milli-requests per second (nginx `ctx->rate`), at least 1.
    pub rate_m: u64,
    /// `burst × 1000`.
    pub burst_m: u64,
    /// `delay × 1000`; `u64::MAX` for nodelay.
    pub delay_m: u64,
}

impl Params {
    /// The hold of an admitted request whose excess after admission is `excess` (rule 6), in ms.
    #[inline]
    pub fn hold_ms(&self, excess: u64) -> u64 {
        if excess > self.delay_m {
            (excess - self.delay_m).saturating_mul(1000) / self.rate_m
        } else {
            0
        }
    }
}

/// The excess a request at `now` would leave, given the bucket's `(excess, last)` (rule 2):
/// `max(0, excess - rate_m * elapsed / 1000 + 1000)`. A new key leaves 0 (rule 3).
#[inline]
pub(crate) fn next_excess(state: Option<(u64, u64)>, now: u64, rate_m: u64) -> u64 {
    match state {
        None => 0,
        Some((excess, last)) => {
            let elapsed = now.saturating_sub(last);
            (excess + 1000).saturating_sub(rate_m.saturating_mul(elapsed) / 1000)
        }
    }
}

/// How long after `now` a request rejected on this bucket would pass (whole ms, at least 1).
fn wait_ms(excess: u64, last: u64, now: u64, p: &Params) -> u64 {
    // Admitted when floor(rate_m * E / 1000) >= excess + 1000 - burst_m, E = ms since `last`.
    let need = (excess + 1000).saturating_sub(p.burst_m);
    let e = need.saturating_mul(1000).div_ceil(p.rate_m);
    e.saturating_sub(now.saturating_sub(last)).max(1)
}

/// The outcome of looking at one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Look {
    /// The line admits; `excess` is what it leaves (or would leave).
    Pass { excess: u64 },
    /// The line rejects (rule 4); it would admit `wait_ms` later.
    Reject { wait_ms: u64 },
}

/// What inserting a new key had to evict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// Drained keys dropped (no outcome changes).
    pub idle: usize,
    /// Keys dropped by force at the cap (their state is lost, as in nginx).
    pub forced: usize,
    /// True when a new key was inserted.
    pub inserted: bool,
}

/// Bytes kept inline in an entry: IPv4/IPv6 addresses, u64 ids and short strings need no
/// allocation of their own and no pointer chase on the hit path.
const INLINE_KEY: usize = 22;

/// A key's bytes as stored: inline when short, on the heap otherwise.
enum StoredKey {
    Inline { len: u8, buf: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl StoredKey {
    fn new(key: &[u8]) -> StoredKey {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut buf = [0u8; INLINE_KEY];
                buf[..key.len()].copy_from_slice(key);
                StoredKey::Inline { len, buf }
            }
            _ => StoredKey::Heap(key.into()),
        }
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        match self {
            StoredKey::Inline { len, buf } => &buf[..usize::from(*len)],
            StoredKey::Heap(b) => b,
        }
    }

    /// Equality with a probe: short keys compare as two fixed-size arrays (a few loads, no
    /// `memcmp` call).
    #[inline]
    fn matches(&self, probe: &Probe<'_>) -> bool {
        match (self, probe) {
            (StoredKey::Inline { len, buf }, Probe::Inline { len: l, buf: b }) => {
                len == l && buf == b
            }
            (StoredKey::Heap(h), Probe::Long(k)) => **h == **k,
            _ => false,
        }
    }
}

/// A looked-up key, padded like a stored one so that short keys compare as fixed arrays.
pub(crate) enum Probe<'a> {
    Inline { len: u8, buf: [u8; INLINE_KEY] },
    Long(&'a [u8]),
}

impl<'a> Probe<'a> {
    #[inline]
    pub fn new(key: &'a [u8]) -> Probe<'a> {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut buf = [0u8; INLINE_KEY];
                buf[..key.len()].copy_from_slice(key);
                Probe::Inline { len, buf }
            }
            _ => Probe::Long(key),
        }
    }
}

struct Entry {
    excess: u64,
    last: u64,
    key: StoredKey,
}

// Each shard on its own cache line, so two threads on two shards do not share a line.
#[repr(align(64))]
struct Shard {
    table: Mutex<HashTable<Entry>>,
}

/// The keys of one line.
pub(crate) struct Zone {
    shards: Box<[Shard]>,
    /// `shards.len() - 1` (a power of two minus one).
    mask: usize,
    hasher: DefaultHashBuilder,
    count: AtomicUsize,
    max_keys: AtomicUsize,
    shard_cap: AtomicUsize,
    /// `table_bound(shard_cap)`.
    table_bound: AtomicUsize,
}

impl Zone {
    pub fn new(max_keys: usize) -> Zone {
        let n = shard_count(max_keys);
        let cap = shard_cap(max_keys, n);
        Zone {
            shards: (0..n)
                .map(|_| Shard {
                    table: Mutex::new(HashTable::new()),
                })
                .collect(),
            mask: n - 1,
            // foldhash with a per-zone random seed (hashbrown's default hasher): keys come from
            // clients, so the seed keeps collisions unpredictable (hash-flood resistance), at a
            // fraction of SipHash's cost on short keys.
            hasher: DefaultHashBuilder::default(),
            count: AtomicUsize::new(0),
            max_keys: AtomicUsize::new(max_keys),
            shard_cap: AtomicUsize::new(cap),
            table_bound: AtomicUsize::new(table_bound(cap)),
        }
    }

    pub fn set_max_keys(&self, max_keys: usize) {
        self.max_keys.store(max_keys, Ordering::Relaxed);
        let cap = shard_cap(max_keys, self.shards.len());
        self.shard_cap.store(cap, Ordering::Relaxed);
        self.table_bound.store(table_bound(cap), Ordering::Relaxed);
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    #[inline]
    fn shard_index(&self, hash: u64) -> usize {
        // Middle bits: hashbrown uses the low bits for the bucket and the top 7 for the tag.
        (hash >> 32) as usize & self.mask
    }

    #[inline]
    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[self.shard_index(hash)]
    }

    /// Reads a line without writing (the look-up of rule 11).
    pub fn peek(&self, hash: u64, key: &[u8], now: u64, p: &Params) -> Look {
        let probe = Probe::new(key);
        let table = self.shard(hash).table.lock();
        let state = table
            .find(hash, |e| e.key.matches(&probe))
            .map(|e| (e.excess, e.last));
        drop(table);
        judge(state, now, p)
    }

    /// Checks a line and, when it admits, charges it, under one lock.
    #[inline]
    pub fn check_commit(&self, hash: u64, key: &[u8], now: u64, p: &Params) -> (Look, Evicted) {
        let probe = Probe::new(key);
        let mut table = self.shard(hash).table.lock();
        if let Some(e) = table.find_mut(hash, |e| e.key.matches(&probe)) {
            let look = judge(Some((e.excess, e.last)), now, p);
            if let Look::Pass { excess } = look {
                write(e, excess, now);
            }
            return (look, Evicted::default());
        }
        // A new key always passes with excess 0 (rule 3).
        let ev = self.insert(&mut table, hash, key, now, p);
        (Look::Pass { excess: 0 }, ev)
    }

    /// Charges a line without checking it (nginx's `ngx_http_limit_req_account`: the line
    /// admitted at look-up; it is recomputed at the same `now` and written).
    pub fn commit(&self, hash: u64, key: &[u8], now: u64, p: &Params) -> (u64, Evicted) {
        let probe = Probe::new(key);
        let mut table = self.shard(hash).table.lock();
        if let Some(e) = table.find_mut(hash, |e| e.key.matches(&probe)) {
            let excess = next_excess(Some((e.excess, e.last)), now, p.rate_m);
            write(e, excess, now);
            return (excess, Evicted::default());
        }
        let ev = self.insert(&mut table, hash, key, now, p);
        (0, ev)
    }

    #[cold]
    #[inline(never)]
    fn insert(
        &self,
        table: &mut HashTable<Entry>,
        hash: u64,
        key: &[u8],
        now: u64,
        p: &Params,
    ) -> Evicted {
        let mut ev = Evicted {
            inserted: true,
            ..Evicted::default()
        };
        let max = self.max_keys.load(Ordering::Relaxed);
        let cap = self.shard_cap.load(Ordering::Relaxed);
        let full = |table: &HashTable<Entry>| {
            self.count.load(Ordering::Relaxed) >= max || table.len() >= cap
        };
        if full(table) {
            // At the cap (the zone's, or this shard's share of it), like a full nginx zone:
            // first drop drained keys (no outcome changes), then, as
            // ngx_http_limit_req_expire(ctx, 0) does, the least recently seen key by force (the
            // oldest of this shard: an approximation of nginx's zone-wide LRU queue that keeps
            // the hit path free of any list update; with one shard, for small caps, it is
            // exact). nginx answers 503 only when that oldest node is pinned by a request in
            // flight; nothing is pinned across a lock here, so a request is never refused for
            // room. If this shard is empty, other shards are tried with try_lock (never two
            // blocking locks at once); if all are busy, the key is inserted anyway, so the cap
            // can be passed by at most the number of threads inserting at that instant.
            //
            // The per-shard cap is what bounds memory: each shard's table never holds more than
            // `cap` keys, so its allocation stays bounded however many keys pass through (a
            // zone-wide count alone would let single shards grow, and keep their capacity,
            // while others are emptied by drained-key drops).
            ev.idle += self.drop_drained(table, now, p.rate_m);
            if full(table) {
                if drop_oldest(table, &self.hasher) {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    ev.forced += 1;
                } else {
                    let start = self.shard_index(hash);
                    for i in 1..self.shards.len() {
                        let other = &self.shards[(start + i) & self.mask];
                        if let Some(mut t) = other.table.try_lock() {
                            ev.idle += self.drop_drained(&mut t, now, p.rate_m);
                            if self.count.load(Ordering::Relaxed) < max {
                                break;
                            }
                            if drop_oldest(&mut t, &self.hasher) {
                                self.count.fetch_sub(1, Ordering::Relaxed);
                                ev.forced += 1;
                                break;
                            }
                        }
                    }
                }
            }
        }
        let hasher = &self.hasher;
        table.insert_unique(
            hash,
            Entry {
                excess: 0,
                last: now,
                key: StoredKey::new(key),
            },
            |e| hasher.hash_one(e.key.as_bytes()),
        );
        self.count.fetch_add(1, Ordering::Relaxed);
        if table.allocation_size() > self.table_bound.load(Ordering::Relaxed) {
            // Grown past what `cap` keys need (tombstones of removals, or a lowered cap):
            // rehash into a table sized for the keys it holds.
            table.shrink_to(table.len(), |e| hasher.hash_one(e.key.as_bytes()));
        }
        ev
    }

    fn drop_drained(&self, table: &mut HashTable<Entry>, now: u64, rate_m: u64) -> usize {
        let before = table.len();
        table.retain(|e| next_excess(Some((e.excess, e.last)), now, rate_m) != 0);
        let dropped = before - table.len();
        self.count.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    /// Drops every drained key (see `Limiter::sweep`) and gives back table memory a lowered
    /// cap or an emptied shard no longer needs; returns how many keys were dropped.
    pub fn sweep(&self, now: u64, rate_m: u64) -> usize {
        let mut dropped = 0;
        let hasher = &self.hasher;
        for shard in self.shards.iter() {
            let mut t = shard.table.lock();
            dropped += self.drop_drained(&mut t, now, rate_m);
            if t.len() < t.capacity() / 4
                || t.allocation_size() > self.table_bound.load(Ordering::Relaxed)
            {
                let target = t.len() * 2;
                t.shrink_to(target, |e| hasher.hash_one(e.key.as_bytes()));
            }
        }
        dropped
    }

    /// Bytes held by the zone: its shards and their hash tables (entries and control bytes;
    /// keys longer than the inline size add their own allocation, not counted here).
    pub fn table_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.shards)
            + self
                .shards
                .iter()
                .map(|s| s.table.lock().allocation_size())
                .sum::<usize>()
    }
}

#[inline]
fn judge(state: Option<(u64, u64)>, now: u64, p: &Params) -> Look {
    let excess = next_excess(state, now, p.rate_m);
    // Rule 4: reject iff strictly more than the burst.
    if excess > p.burst_m {
        let (x, last) = state.unwrap_or((0, now));
        Look::Reject {
            wait_ms: wait_ms(x, last, now, p),
        }
    } else {
        Look::Pass { excess }
    }
}

#[inline]
fn write(e: &mut Entry, excess: u64, now: u64) {
    e.excess = excess;
    // nginx writes `last` only when time moved (`if (ms) lr->last = now`), so a racing older
    // `now` never moves it back.
    if now > e.last {
        e.last = now;
    }
}

fn drop_oldest(table: &mut HashTable<Entry>, hasher: &DefaultHashBuilder) -> bool {
    let Some((hash, last)) = table
        .iter()
        .min_by_key(|e| e.last)
        .map(|e| (hasher.hash_one(e.key.as_bytes()), e.last))
    else {
        return false;
    };
    // Any entry with that hash and that `last` is an oldest one.
    match table.find_entry(hash, |e| e.last == last) {
        Ok(entry) => {
            entry.remove();
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn p(rate_m: u64, burst: u64, delay: u64) -> Params {
        Params {
            rate_m,
            burst_m: burst * 1000,
            delay_m: delay,
        }
    }

    #[test]
    fn drains_continuously_in_integer_units() {
        // A bucket at 5000 that idles 550 ms at 10 r/s: max(0, 5000 - 5500 + 1000) = 500.
        assert_eq!(next_excess(Some((5000, 0)), 550, 10_000), 500);
        assert_eq!(next_excess(Some((5000, 0)), 450, 10_000), 1500);
        // 7r/m truncates: 5 ms drain 0.
        assert_eq!(next_excess(Some((0, 0)), 5, 116), 1000);
        assert_eq!(next_excess(None, 5, 116), 0);
    }

    #[test]
    fn wait_is_exact() {
        let params = p(10_000, 0, u64::MAX);
        // excess 0 at t=0, burst 0: the next request passes at t >= 100.
        let w = wait_ms(0, 0, 30, &params);
        assert_eq!(w, 70);
        assert_eq!(
            judge(Some((0, 0)), 30 + w - 1, &params),
            Look::Reject { wait_ms: 1 }
        );
        assert!(matches!(
            judge(Some((0, 0)), 30 + w, &params),
            Look::Pass { .. }
        ));
    }

    #[test]
    fn cap_evicts_drained_then_oldest() {
        let z = Zone::new(4);
        let params = p(1000, 5, u64::MAX);
        for k in 0u8..4 {
            let key = [k];
            z.check_commit(z.hash(&key), &key, u64::from(k), &params);
        }
        assert_eq!(z.len(), 4);
        // Nothing drained at t=10: the oldest (key 0, last 0) goes by force.
        let (_, ev) = z.check_commit(z.hash(&[9]), &[9], 10, &params);
        assert_eq!((ev.idle, ev.forced), (0, 1));
        assert_eq!(z.len(), 4);
        // At t=5000 all are drained: they are dropped, no force.
        let (_, ev) = z.check_commit(z.hash(&[10]), &[10], 5000, &params);
        assert!(ev.idle >= 1 && ev.forced == 0, "{ev:?}");
        assert!(z.len() <= 4);
        let before = z.len();
        assert_eq!(z.sweep(5000, 1000), before - 1);
        assert_eq!(z.len(), 1);
    }

    #[test]
    fn keys_longer_than_inline_are_kept_whole() {
        let z = Zone::new(100);
        let params = p(1000, 0, u64::MAX);
        let long = [7u8; 100];
        let mut other = long;
        other[99] = 8;
        for key in [&long[..], &other[..], &long[..22], &long[..23]] {
            let (look, ev) = z.check_commit(z.hash(key), key, 0, &params);
            assert_eq!((look, ev.inserted), (Look::Pass { excess: 0 }, true));
        }
        for key in [&long[..], &other[..], &long[..22], &long[..23]] {
            let (look, _) = z.check_commit(z.hash(key), key, 0, &params);
            assert!(matches!(look, Look::Reject { .. }), "{look:?}");
        }
        assert_eq!(z.len(), 4);
    }

    #[test]
    fn table_memory_is_bounded_by_the_cap() {
        // 10x the cap in distinct keys, none drained (no time passes), then as many drained
        // ones: the tables' allocation after 10x and after 20x stays what the cap needs.
        let cap = 10_000;
        let z = Zone::new(cap);
        let params = p(1000, 5, u64::MAX);
        let mut at = Vec::new();
        for round in 0..20u64 {
            for k in round * cap as u64..(round + 1) * cap as u64 {
                let key = k.to_be_bytes();
                let now = if round < 10 { 0 } else { 10 * round };
                z.check_commit(z.hash(&key), &key, now, &params);
                assert!(z.len() <= cap);
            }
            at.push(z.table_bytes());
        }
        // Bounded: no later round holds more than twice what the first full round held.
        let first = at[0];
        assert!(at.iter().all(|&b| b <= 2 * first), "{at:?}");
    }
}
