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
//!
//! # Layout
//!
//! A zone is an array of shards, each one 64-byte cache line holding its lock *and* the state
//! of its first key (the "head": up to [`SHORT_KEY`] key bytes, `excess`, `last`). Further keys
//! of a shard, and keys longer than [`SHORT_KEY`] bytes, live in a small array the shard owns
//! (the "rest", scanned linearly: a shard holds a handful of keys). There is at least one shard
//! per key of the cap ([`KEYS_PER_SHARD`]), so most keys are a head (about 80% with the zone
//! half full, 70% when full), and a check for such a key touches exactly one cache line of the
//! zone: the lock, the key and its state together; a key in the rest touches one more. Two
//! threads checking distinct keys only share a line when their keys share a shard, which with
//! a hundred thousand shards is rare; that is what lets two threads scale (a few large shards
//! would bounce one lock line between the cores on every check). Like an nginx zone, the
//! shards are allocated when the limit is built: 64 bytes per key of the cap, the shard count
//! rounded up to a power of two (8 MB for the default cap of 100 000 keys).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use hashbrown::DefaultHashBuilder;
use parking_lot::{Mutex, MutexGuard};

/// The most shards a zone has: 64 bytes each, 256 MB at most (reached at a cap of 4 million
/// keys; above it shards hold more keys each). At the default cap (100 000 keys) a zone has
/// 131 072 shards, 0.76 keys each when full.
const MAX_SHARDS: usize = 4 * 1024 * 1024;
/// Keys per shard the shard count is sized for at the cap.
const KEYS_PER_SHARD: usize = 1;
/// Below this cap a zone has one shard, so a forced eviction drops the zone-wide least recently
/// seen key exactly like nginx.
const SMALL_ZONE: usize = 128;
/// At the zone-wide cap, the forced eviction drops the least recently seen key among this many
/// non-empty shards (sampled LRU, as Redis approximates LRU): nginx drops its zone's oldest node.
const EVICTION_SAMPLE: usize = 8;

/// The longest key kept in its shard's own cache line, in bytes: IPv4 and IPv6 addresses, u64
/// ids and short strings. Longer keys are kept whole in the shard's rest array.
pub(crate) const SHORT_KEY: usize = 16;

/// Shards for a zone capped at `max_keys`: a power of two, 1 for small caps.
fn shard_count(max_keys: usize) -> usize {
    if max_keys < SMALL_ZONE {
        return 1;
    }
    (max_keys / KEYS_PER_SHARD)
        .max(1)
        .next_power_of_two()
        .min(MAX_SHARDS)
}

/// The most keys one shard holds: four times its even share of the cap, at least 16, never
/// more than the cap. The headroom is wide enough that a random hash practically never fills a
/// shard before the zone is full (at one key per shard on average, a shard reaches 16 with odds
/// of about 1 in 10^14), so keys are dropped by force only at the zone's cap, as in nginx; the
/// bound is what keeps a shard's linear scan short whatever keys arrive.
fn shard_cap(max_keys: usize, shards: usize) -> usize {
    let even = max_keys.div_ceil(shards);
    (4 * even).max(16).min(max_keys).max(1)
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

/// A key's bucket: nginx's `excess` (milli-requests) and `last` (whole ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    pub excess: u64,
    pub last: u64,
}

/// The excess a request at `now` would leave, given the bucket (rule 2):
/// `max(0, excess - rate_m * elapsed / 1000 + 1000)`. A new key leaves 0 (rule 3).
#[inline]
pub(crate) fn next_excess(state: Option<State>, now: u64, rate_m: u64) -> u64 {
    match state {
        None => 0,
        Some(s) => {
            let elapsed = now.saturating_sub(s.last);
            (s.excess + 1000).saturating_sub(rate_m.saturating_mul(elapsed) / 1000)
        }
    }
}

/// How long after `now` a request rejected on this bucket would pass (whole ms, at least 1).
fn wait_ms(s: State, now: u64, p: &Params) -> u64 {
    // Admitted when floor(rate_m * E / 1000) >= excess + 1000 - burst_m, E = ms since `last`.
    let need = (s.excess + 1000).saturating_sub(p.burst_m);
    let e = need.saturating_mul(1000).div_ceil(p.rate_m);
    e.saturating_sub(now.saturating_sub(s.last)).max(1)
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

/// A short key's bytes, zero-padded to [`SHORT_KEY`] and read as two machine words: compared
/// with two integer compares (no `memcmp` call, no length loop). Two 8-byte loads rather than
/// one 16-byte load also let the CPU forward a key just written as two 8-byte stores (a
/// [`crate::Key`] built from a `u64` or an address) instead of stalling on it.
type Words = [u64; 2];

#[inline]
fn words(b: &[u8; SHORT_KEY]) -> Words {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
    ] = *b;
    [
        u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
    ]
}

/// The bytes of [`Words`] (the first `len` are the key).
fn unwords(w: &Words) -> [u8; SHORT_KEY] {
    let [a0, a1, a2, a3, a4, a5, a6, a7] = w[0].to_ne_bytes();
    let [b0, b1, b2, b3, b4, b5, b6, b7] = w[1].to_ne_bytes();
    [
        a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7,
    ]
}

/// A looked-up key: its bytes and, for keys up to [`SHORT_KEY`] bytes, their [`Words`].
#[derive(Clone, Copy)]
pub(crate) struct Probe<'a> {
    bytes: &'a [u8],
    short: Words,
}

impl<'a> Probe<'a> {
    /// A probe for `bytes`, padding short keys.
    #[inline]
    pub fn new(bytes: &'a [u8]) -> Probe<'a> {
        let mut short = [0u8; SHORT_KEY];
        if let Some(dst) = short.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        Probe {
            bytes,
            short: words(&short),
        }
    }

    /// A probe for a key that is already padded: `short[..bytes.len()] == bytes` and the rest
    /// zero (the inline keys of [`crate::Key`]).
    #[inline]
    pub fn padded(bytes: &'a [u8], short: &[u8; SHORT_KEY]) -> Probe<'a> {
        Probe {
            bytes,
            short: words(short),
        }
    }

    #[inline]
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    #[inline]
    fn is_short(&self) -> bool {
        self.bytes.len() <= SHORT_KEY
    }
}

/// A shard's first key, kept in the shard's own cache line. `len == 0` means empty (an empty
/// key is never stored: it skips the line).
#[derive(Clone, Copy)]
struct Head {
    key: Words,
    len: u8,
    state: State,
}

impl Head {
    const EMPTY: Head = Head {
        key: [0; 2],
        len: 0,
        state: State { excess: 0, last: 0 },
    };

    #[inline]
    fn matches(&self, probe: &Probe<'_>) -> bool {
        usize::from(self.len) == probe.bytes.len()
            && self.key[0] == probe.short[0]
            && self.key[1] == probe.short[1]
    }

    fn bytes(&self) -> Vec<u8> {
        unwords(&self.key)[..usize::from(self.len)].to_vec()
    }
}

/// A key in a shard's table: short keys inline, long ones on the heap.
enum StoredKey {
    Short { len: u8, words: Words },
    Long(Box<[u8]>),
}

impl StoredKey {
    fn new(probe: &Probe<'_>) -> StoredKey {
        match u8::try_from(probe.bytes.len()) {
            Ok(len) if probe.is_short() => StoredKey::Short {
                len,
                words: probe.short,
            },
            _ => StoredKey::Long(probe.bytes.into()),
        }
    }

    /// The key's bytes, copied.
    fn to_vec(&self) -> Vec<u8> {
        match self {
            StoredKey::Short { len, words } => unwords(words)[..usize::from(*len)].to_vec(),
            StoredKey::Long(b) => b.to_vec(),
        }
    }

    #[inline]
    fn matches(&self, probe: &Probe<'_>) -> bool {
        match self {
            StoredKey::Short { len, words } => {
                usize::from(*len) == probe.bytes.len()
                    && words[0] == probe.short[0]
                    && words[1] == probe.short[1]
            }
            StoredKey::Long(k) => **k == *probe.bytes,
        }
    }
}

struct Entry {
    key: StoredKey,
    state: State,
}

/// The keys of one shard: the head, in the shard's line, and the rest in an array of its own
/// (exactly as long as it needs: no spare capacity, no tombstones; empty allocates nothing).
struct ShardData {
    head: Head,
    rest: Box<[Entry]>,
}

impl ShardData {
    fn len(&self) -> usize {
        usize::from(self.head.len != 0) + self.rest.len()
    }

    #[inline]
    fn find(&self, probe: &Probe<'_>) -> Option<State> {
        if self.head.matches(probe) {
            return Some(self.head.state);
        }
        self.rest
            .iter()
            .find(|e| e.key.matches(probe))
            .map(|e| e.state)
    }

    #[inline]
    fn find_mut(&mut self, probe: &Probe<'_>) -> Option<&mut State> {
        if self.head.matches(probe) {
            return Some(&mut self.head.state);
        }
        self.rest
            .iter_mut()
            .find(|e| e.key.matches(probe))
            .map(|e| &mut e.state)
    }

    /// Inserts a key known to be absent.
    fn insert(&mut self, probe: &Probe<'_>, state: State) {
        if self.head.len == 0
            && let Ok(len) = u8::try_from(probe.bytes.len())
            && probe.is_short()
        {
            self.head = Head {
                key: probe.short,
                len,
                state,
            };
            return;
        }
        self.edit_rest(|rest| {
            rest.push(Entry {
                key: StoredKey::new(probe),
                state,
            })
        });
    }

    /// Changes the rest array as a `Vec`, then stores it back exactly as long as it is (the
    /// rest keeps no spare capacity; this is only ever on the insert and eviction paths).
    fn edit_rest<R>(&mut self, edit: impl FnOnce(&mut Vec<Entry>) -> R) -> R {
        let mut rest = std::mem::take(&mut self.rest).into_vec();
        let out = edit(&mut rest);
        self.rest = rest.into_boxed_slice();
        out
    }

    /// Keeps the rest's entries for which `keep` is true; returns how many went.
    fn retain_rest(&mut self, keep: impl FnMut(&Entry) -> bool) -> usize {
        if self.rest.is_empty() {
            return 0;
        }
        self.edit_rest(|rest| {
            let before = rest.len();
            rest.retain(keep);
            before - rest.len()
        })
    }

    /// Drops every drained key; returns how many.
    fn drop_drained(&mut self, now: u64, rate_m: u64) -> usize {
        let mut dropped = 0;
        if self.head.len != 0 && next_excess(Some(self.head.state), now, rate_m) == 0 {
            self.head = Head::EMPTY;
            dropped += 1;
        }
        if self
            .rest
            .iter()
            .any(|e| next_excess(Some(e.state), now, rate_m) == 0)
        {
            dropped += self.retain_rest(|e| next_excess(Some(e.state), now, rate_m) != 0);
        }
        self.refill_head();
        dropped
    }

    /// The least recently seen key's `last`, if any.
    fn oldest(&self) -> Option<u64> {
        let head = (self.head.len != 0).then_some(self.head.state.last);
        let rest = self.rest.iter().map(|e| e.state.last).min();
        match (head, rest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops the least recently seen key; false when the shard is empty.
    fn drop_oldest(&mut self) -> bool {
        let Some(last) = self.oldest() else {
            return false;
        };
        if self.head.len != 0 && self.head.state.last == last {
            self.head = Head::EMPTY;
            self.refill_head();
            return true;
        }
        let Some(i) = self.rest.iter().position(|e| e.state.last == last) else {
            return false;
        };
        self.edit_rest(|rest| rest.swap_remove(i));
        true
    }

    /// Moves the most recently seen short key of the rest into an empty head, so that the
    /// shard's busiest keys stay one cache line away.
    fn refill_head(&mut self) {
        if self.head.len != 0 {
            return;
        }
        let newest = self
            .rest
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.key, StoredKey::Short { .. }))
            .max_by_key(|(_, e)| e.state.last)
            .map(|(i, _)| i);
        let Some(i) = newest else { return };
        let entry = self.edit_rest(|rest| rest.swap_remove(i));
        if let StoredKey::Short { len, words } = entry.key {
            self.head = Head {
                key: words,
                len,
                state: entry.state,
            };
        }
    }

    /// Bytes the shard holds outside its line (the rest's entries; long keys' own
    /// allocations are not counted).
    fn rest_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.rest)
    }
}

// Each shard on its own cache line: the lock, the head key and its state together.
#[repr(align(64))]
struct Shard {
    data: Mutex<ShardData>,
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
}

impl Zone {
    pub fn new(max_keys: usize) -> Zone {
        let n = shard_count(max_keys);
        let cap = shard_cap(max_keys, n);
        Zone {
            shards: (0..n)
                .map(|_| Shard {
                    data: Mutex::new(ShardData {
                        head: Head::EMPTY,
                        rest: Box::default(),
                    }),
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
        }
    }

    pub fn set_max_keys(&self, max_keys: usize) {
        self.max_keys.store(max_keys, Ordering::Relaxed);
        let cap = shard_cap(max_keys, self.shards.len());
        self.shard_cap.store(cap, Ordering::Relaxed);
    }

    /// True when a cap of `max_keys` keeps this zone's number of shards (a reload can then keep
    /// the table in place).
    pub fn fits(&self, max_keys: usize) -> bool {
        shard_count(max_keys) == self.shards.len()
    }

    /// A new zone for `max_keys` holding this zone's keys: the most recently seen ones, as
    /// many as the new cap (and each new shard's cap) allows.
    pub fn rebuilt(&self, max_keys: usize) -> Zone {
        let mut keys: Vec<(Vec<u8>, State)> = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let data = shard.data.lock();
            if data.head.len != 0 {
                keys.push((data.head.bytes(), data.head.state));
            }
            keys.extend(data.rest.iter().map(|e| (e.key.to_vec(), e.state)));
        }
        keys.sort_unstable_by_key(|(_, s)| std::cmp::Reverse(s.last));
        let zone = Zone::new(max_keys);
        let cap = zone.shard_cap.load(Ordering::Relaxed);
        for (bytes, state) in keys.iter().take(max_keys) {
            let probe = Probe::new(bytes);
            let mut data = zone.shard(zone.hash(bytes)).data.lock();
            if data.len() < cap {
                data.insert(&probe, *state);
                zone.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        zone
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
        // foldhash's high bits are its best mixed.
        (hash >> 32) as usize & self.mask
    }

    #[inline]
    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[self.shard_index(hash)]
    }

    /// Reads a line without writing (the look-up of rule 11).
    pub fn peek(&self, hash: u64, probe: &Probe<'_>, now: u64, p: &Params) -> Look {
        let state = self.shard(hash).data.lock().find(probe);
        judge(state, now, p)
    }

    /// Checks a line and, when it admits, charges it, under one lock.
    #[inline(always)]
    pub fn check_commit(
        &self,
        hash: u64,
        probe: &Probe<'_>,
        now: u64,
        p: &Params,
    ) -> (Look, Evicted) {
        let mut data = self.shard(hash).data.lock();
        if let Some(s) = data.find_mut(probe) {
            let look = judge(Some(*s), now, p);
            if let Look::Pass { excess } = look {
                write(s, excess, now);
            }
            return (look, Evicted::default());
        }
        // A new key always passes with excess 0 (rule 3).
        let ev = self.insert(data, hash, probe, now, p);
        (Look::Pass { excess: 0 }, ev)
    }

    /// Charges a line without checking it (nginx's `ngx_http_limit_req_account`: the line
    /// admitted at look-up; it is recomputed at the same `now` and written).
    pub fn commit(&self, hash: u64, probe: &Probe<'_>, now: u64, p: &Params) -> (u64, Evicted) {
        let mut data = self.shard(hash).data.lock();
        if let Some(s) = data.find_mut(probe) {
            let excess = next_excess(Some(*s), now, p.rate_m);
            write(s, excess, now);
            return (excess, Evicted::default());
        }
        let ev = self.insert(data, hash, probe, now, p);
        (0, ev)
    }

    #[cold]
    #[inline(never)]
    fn insert(
        &self,
        mut data: MutexGuard<'_, ShardData>,
        hash: u64,
        probe: &Probe<'_>,
        now: u64,
        p: &Params,
    ) -> Evicted {
        let mut ev = Evicted {
            inserted: true,
            ..Evicted::default()
        };
        let max = self.max_keys.load(Ordering::Relaxed);
        let cap = self.shard_cap.load(Ordering::Relaxed);
        let zone_full = || self.count.load(Ordering::Relaxed) >= max;
        if zone_full() || data.len() >= cap {
            // At the cap (the zone's, or this shard's share of it), like a full nginx zone:
            // first drop drained keys (no outcome changes), then, as
            // ngx_http_limit_req_expire(ctx, 0) does, the least recently seen key by force.
            // nginx answers 503 only when that oldest node is pinned by a request in flight;
            // nothing is pinned across a lock here, so a request is never refused for room.
            //
            // The zone-wide count bounds memory (the rest arrays hold exactly their keys); the
            // per-shard cap bounds a shard's scan.
            let dropped = data.drop_drained(now, p.rate_m);
            self.count.fetch_sub(dropped, Ordering::Relaxed);
            ev.idle += dropped;
            if data.len() >= cap {
                // This shard is at its own cap: its oldest key goes.
                if data.drop_oldest() {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    ev.forced += 1;
                }
            } else if zone_full() {
                self.evict_sampled(&mut data, hash, now, p, &mut ev);
            }
        }
        data.insert(
            probe,
            State {
                excess: 0,
                last: now,
            },
        );
        self.count.fetch_add(1, Ordering::Relaxed);
        ev
    }

    /// The zone is at its cap: drops drained keys of sampled shards until the count is below
    /// the cap, else the least recently seen key among this shard and [`EVICTION_SAMPLE`]
    /// non-empty shards picked at random (with one shard, the zone's oldest key, exactly).
    /// Other shards are only ever `try_lock`ed, so no thread waits for a second lock; if every
    /// other shard is busy the key is inserted anyway, and the cap can be passed by at most the
    /// number of threads inserting at that instant.
    fn evict_sampled(
        &self,
        data: &mut MutexGuard<'_, ShardData>,
        hash: u64,
        now: u64,
        p: &Params,
        ev: &mut Evicted,
    ) {
        let max = self.max_keys.load(Ordering::Relaxed);
        let start = self.shard_index(hash);
        let mut best: Option<(u64, Option<MutexGuard<'_, ShardData>>)> =
            data.oldest().map(|last| (last, None));
        let mut seen = usize::from(best.is_some());
        // Shards are picked at random (a splitmix64 sequence seeded by the key's hash), not
        // the neighbours: evictions from a fixed window would empty a neighbourhood of its old
        // keys and then take recent ones. If those tries find no key at all (a zone whose keys
        // crowd into few shards), every shard is looked at in turn until one key is found.
        let n = self.shards.len();
        let tries = if n > 1 { 4 * EVICTION_SAMPLE } else { 0 };
        let mut seed = hash;
        for t in 0..tries + n {
            let i = if t < tries {
                splitmix64(&mut seed) as usize & self.mask
            } else {
                (start + t - tries) & self.mask
            };
            if seen >= EVICTION_SAMPLE || (t >= tries && seen > 0) {
                break;
            }
            if i == start {
                continue;
            }
            let Some(mut other) = self.shards[i].data.try_lock() else {
                continue;
            };
            let dropped = other.drop_drained(now, p.rate_m);
            if dropped > 0 {
                self.count.fetch_sub(dropped, Ordering::Relaxed);
                ev.idle += dropped;
                if self.count.load(Ordering::Relaxed) < max {
                    return;
                }
            }
            let Some(last) = other.oldest() else {
                continue;
            };
            seen += 1;
            if best.as_ref().is_none_or(|(b, _)| last < *b) {
                best = Some((last, Some(other)));
            }
        }
        let dropped = match best {
            Some((_, Some(mut other))) => other.drop_oldest(),
            Some((_, None)) => data.drop_oldest(),
            None => false,
        };
        if dropped {
            self.count.fetch_sub(1, Ordering::Relaxed);
            ev.forced += 1;
        }
    }

    /// Drops every drained key (see `Limiter::sweep`); returns how many.
    pub fn sweep(&self, now: u64, rate_m: u64) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let n = shard.data.lock().drop_drained(now, rate_m);
            self.count.fetch_sub(n, Ordering::Relaxed);
            dropped += n;
        }
        dropped
    }

    /// Bytes held by the zone: its shards and their rest arrays (keys longer than
    /// [`SHORT_KEY`] bytes add their own allocation, not counted here).
    pub fn table_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.shards)
            + self
                .shards
                .iter()
                .map(|s| s.data.lock().rest_bytes())
                .sum::<usize>()
    }
}

/// The next number of a splitmix64 sequence (a fast, well-mixed sequence for sampling).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
fn judge(state: Option<State>, now: u64, p: &Params) -> Look {
    let excess = next_excess(state, now, p.rate_m);
    // Rule 4: reject iff strictly more than the burst.
    if excess > p.burst_m {
        let s = state.unwrap_or(State {
            excess: 0,
            last: now,
        });
        Look::Reject {
            wait_ms: wait_ms(s, now, p),
        }
    } else {
        Look::Pass { excess }
    }
}

#[inline]
fn write(s: &mut State, excess: u64, now: u64) {
    s.excess = excess;
    // nginx writes `last` only when time moved (`if (ms) lr->last = now`), so a racing older
    // `now` never moves it back.
    if now > s.last {
        s.last = now;
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

    fn st(excess: u64, last: u64) -> Option<State> {
        Some(State { excess, last })
    }

    fn check(z: &Zone, key: &[u8], now: u64, params: &Params) -> (Look, Evicted) {
        z.check_commit(z.hash(key), &Probe::new(key), now, params)
    }

    #[test]
    fn a_shard_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Shard>(), 64);
        assert_eq!(std::mem::align_of::<Shard>(), 64);
    }

    #[test]
    fn drains_continuously_in_integer_units() {
        // A bucket at 5000 that idles 550 ms at 10 r/s: max(0, 5000 - 5500 + 1000) = 500.
        assert_eq!(next_excess(st(5000, 0), 550, 10_000), 500);
        assert_eq!(next_excess(st(5000, 0), 450, 10_000), 1500);
        // 7r/m truncates: 5 ms drain 0.
        assert_eq!(next_excess(st(0, 0), 5, 116), 1000);
        assert_eq!(next_excess(None, 5, 116), 0);
    }

    #[test]
    fn wait_is_exact() {
        let params = p(10_000, 0, u64::MAX);
        // excess 0 at t=0, burst 0: the next request passes at t >= 100.
        let s = State { excess: 0, last: 0 };
        let w = wait_ms(s, 30, &params);
        assert_eq!(w, 70);
        assert_eq!(
            judge(Some(s), 30 + w - 1, &params),
            Look::Reject { wait_ms: 1 }
        );
        assert!(matches!(judge(Some(s), 30 + w, &params), Look::Pass { .. }));
    }

    #[test]
    fn cap_evicts_drained_then_oldest() {
        let z = Zone::new(4);
        let params = p(1000, 5, u64::MAX);
        for k in 0u8..4 {
            check(&z, &[k], u64::from(k), &params);
        }
        assert_eq!(z.len(), 4);
        // Nothing drained at t=10: the oldest (key 0, last 0) goes by force.
        let (_, ev) = check(&z, &[9], 10, &params);
        assert_eq!((ev.idle, ev.forced), (0, 1));
        assert_eq!(z.len(), 4);
        // Key 0 is gone (a new key: passes with excess 0), key 1 is still tracked.
        assert!(matches!(
            z.peek(z.hash(&[0]), &Probe::new(&[0]), 10, &params),
            Look::Pass { excess: 0 }
        ));
        assert!(matches!(
            z.peek(z.hash(&[1]), &Probe::new(&[1]), 10, &params),
            Look::Pass { excess } if excess > 0
        ));
        // At t=5000 all are drained: they are dropped, no force.
        let (_, ev) = check(&z, &[10], 5000, &params);
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
        let keys = [
            &long[..],
            &other[..],
            &long[..16],
            &long[..17],
            &long[..15],
            &[0u8][..],
            &[0u8, 0][..],
        ];
        for key in keys {
            let (look, ev) = check(&z, key, 0, &params);
            assert_eq!(
                (look, ev.inserted),
                (Look::Pass { excess: 0 }, true),
                "{key:?}"
            );
        }
        for key in keys {
            let (look, _) = check(&z, key, 0, &params);
            assert!(matches!(look, Look::Reject { .. }), "{look:?}");
        }
        assert_eq!(z.len(), keys.len());
    }

    #[test]
    fn head_is_refilled_from_the_table() {
        // One shard: the first short key is the head, the others in the table; dropping the
        // head moves the newest short key of the table into it, and every key stays found.
        let z = Zone::new(100);
        let params = p(1000, 5, u64::MAX);
        for k in 0u8..10 {
            check(&z, &[k], u64::from(k) * 100, &params);
        }
        let mut data = z.shards[0].data.lock();
        assert_eq!(data.head.bytes(), [0]);
        assert!(data.drop_oldest());
        assert_eq!(data.head.bytes(), [9]);
        assert_eq!(data.len(), 9);
        drop(data);
        z.count.fetch_sub(1, Ordering::Relaxed);
        for k in 1u8..10 {
            let look = z.peek(z.hash(&[k]), &Probe::new(&[k]), 900, &params);
            assert!(
                matches!(look, Look::Pass { excess } if excess > 0),
                "{k}: {look:?}"
            );
        }
    }

    #[test]
    fn sampled_eviction_drops_an_old_key_not_a_recent_one() {
        // 1 500 keys seen long ago, then 500 recent ones, cap 2 000, nothing drained (two
        // requests leave 1000 milli-requests, which 1 milli-request/s drains in 1000 s): 500 new
        // keys force out old keys, not recent ones.
        let z = Zone::new(2000);
        let params = p(1, 1000, u64::MAX);
        let key = |k: u32| k.to_be_bytes();
        for k in 0..1500 {
            check(&z, &key(k), 0, &params);
            check(&z, &key(k), 0, &params);
        }
        for k in 1500..2000 {
            check(&z, &key(k), 50_000, &params);
            check(&z, &key(k), 50_000, &params);
        }
        assert_eq!(z.len(), 2000);
        for k in 2000..2500 {
            let (_, ev) = check(&z, &key(k), 60_000, &params);
            assert_eq!(ev.forced, 1);
        }
        assert!(z.len() <= 2000);
        // Sampled LRU is an approximation: a recent key goes only when none of the sampled
        // shards holds an old one (about 1 run in 1000 loses one recent key here).
        let lost: Vec<u32> = (1500..2000)
            .filter(|&k| {
                let b = key(k);
                !matches!(
                    z.peek(z.hash(&b), &Probe::new(&b), 50_000, &params),
                    Look::Pass { excess } if excess > 1000
                )
            })
            .collect();
        assert!(lost.len() <= 5, "recent keys evicted: {lost:?}");
    }

    #[test]
    fn a_rebuilt_zone_keeps_the_most_recent_keys() {
        let z = Zone::new(200);
        let params = p(1, 5, u64::MAX);
        let long = [9u8; 40];
        for k in 0u64..150 {
            check(&z, &k.to_be_bytes(), k, &params);
        }
        check(&z, &long, 150, &params);
        check(&z, &long, 150, &params);
        // Larger: every key, with its state.
        let big = z.rebuilt(100_000);
        assert!(!z.fits(100_000) && big.fits(100_000));
        assert_eq!(big.len(), 151);
        let look = |z: &Zone, key: &[u8]| z.peek(z.hash(key), &Probe::new(key), 150, &params);
        for k in 0u64..150 {
            assert_eq!(
                look(&big, &k.to_be_bytes()),
                look(&z, &k.to_be_bytes()),
                "{k}"
            );
        }
        assert_eq!(look(&big, &long), Look::Pass { excess: 2000 });
        // Smaller: the 50 most recently seen.
        let small = big.rebuilt(50);
        assert_eq!(small.len(), 50);
        assert_eq!(look(&small, &long), Look::Pass { excess: 2000 });
        assert_eq!(
            look(&small, &149u64.to_be_bytes()),
            Look::Pass { excess: 1000 }
        );
        assert_eq!(look(&small, &0u64.to_be_bytes()), Look::Pass { excess: 0 });
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
                check(&z, &key, now, &params);
                assert!(z.len() <= cap);
            }
            at.push(z.table_bytes());
        }
        // Bounded: no later round holds more than twice what the first full round held.
        let first = at[0];
        assert!(at.iter().all(|&b| b <= 2 * first), "{at:?}");
    }
}
