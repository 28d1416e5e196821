//! The phases: what each does to the lab, and the expectation computed from the counts.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ha_core::TopologyEvent;
use ha_core::health::Status;
use ha_lab::dns::DnsMode;
use ha_lab::proxy::Fault;
use tokio::time::{Instant, sleep, sleep_until};

use crate::DemoError;
use crate::client::DemoClient;
use crate::config::Tuning;
use crate::lab::{DNS_NAME, DemoLab, POISON_IP, RECORD_TTL_SECS};
use crate::load::{EventLog, Load, Outcome, Sample};
use crate::progress::Progress;
use crate::report::{Check, PhaseRow};

/// How much later than its deadline a call may end and still count as on time: the task
/// scheduling slack of a loaded 2-core machine. A correctness bound, not a speed target.
pub const DEADLINE_SLACK: Duration = Duration::from_millis(100);
/// Samples this close after a drain or undrain are not judged (the switch and the picks race).
pub const SWITCH_GRACE: Duration = Duration::from_millis(25);
/// The shortest `--seconds-per-phase` accepted: the shortest a phase can measure anything in.
/// Some phases need longer ([`Phase::duration`]) and run longer, which the row's notes say.
pub const MIN_SECONDS_PER_PHASE: f64 = 2.0;
/// How long to wait for a healthy, undrained, fresh picture before a phase.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// One phase of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Everything healthy: all traffic stays in `bj-a`.
    Steady,
    /// One `bj-a` backend (server and proxy) is killed.
    KillOne,
    /// Both `bj-a` proxies accept and never answer.
    Blackhole,
    /// `bj-a` heals after being blackholed and ejected.
    Recovery,
    /// `bj-b` and `bj-a` drained for half the phase, then undrained.
    Drain,
    /// The `north` DNS server stops answering.
    DnsNorthDown,
    /// Both DNS servers stop answering.
    DnsAllDown,
    /// The `north` DNS server adds an address outside the allowed CIDRs.
    DnsPoison,
}

impl Phase {
    /// Every phase, in the demo's order.
    pub const ALL: [Phase; 8] = [
        Phase::Steady,
        Phase::KillOne,
        Phase::Blackhole,
        Phase::Recovery,
        Phase::Drain,
        Phase::DnsNorthDown,
        Phase::DnsAllDown,
        Phase::DnsPoison,
    ];

    /// The phase's name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::KillOne => "kill-one",
            Phase::Blackhole => "blackhole",
            Phase::Recovery => "recovery",
            Phase::Drain => "drain",
            Phase::DnsNorthDown => "dns-north-down",
            Phase::DnsAllDown => "dns-all-down",
            Phase::DnsPoison => "dns-poison",
        }
    }

    /// How long the phase runs when phases are `secs` long: a few phases need a minimum for
    /// their mechanism to play out (the recovery needs the rest of an ejection, the failback
    /// hold, then a second to measure).
    pub fn duration(self, secs: f64, tuning: &Tuning) -> Duration {
        let min = match self {
            Phase::Steady | Phase::Drain | Phase::DnsPoison => MIN_SECONDS_PER_PHASE,
            // Room to judge the shares after a late ejection (see the judge).
            Phase::KillOne => MIN_SECONDS_PER_PHASE.max(3.5),
            Phase::Blackhole | Phase::DnsNorthDown | Phase::DnsAllDown => 3.0,
            Phase::Recovery => (tuning.max_ejection + tuning.failback_hold).as_secs_f64() + 2.0,
        };
        Duration::from_secs_f64(secs.max(min))
    }
}

/// What one phase needs.
pub(crate) struct Env<'a> {
    pub(crate) lab: &'a DemoLab,
    pub(crate) client: &'a DemoClient,
    pub(crate) load: &'a Load,
    pub(crate) events: &'a EventLog,
    pub(crate) tuning: Tuning,
    pub(crate) progress: &'a Progress,
}

/// What the phase saw by sampling the client's state while it ran.
#[derive(Debug, Default)]
struct Watched {
    min_set_len: Option<usize>,
    stale_seen: bool,
    disallowed_in_set: Vec<IpAddr>,
}

/// Times of the actions taken during the phase.
#[derive(Debug, Default)]
struct Marks {
    drained_at: Option<Instant>,
    undrained_at: Option<Instant>,
}

fn allowed(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 127 && (1..=3).contains(&v4.octets()[2]))
}

/// Waits until every endpoint is healthy (not ejected, not warming), nothing is drained, the
/// DNS set is fresh and complete, and all traffic goes to the local tier.
async fn settle(env: &Env<'_>, timeout: Duration) -> Result<(), String> {
    let until = Instant::now() + timeout;
    loop {
        let set = env.client.discovery.current();
        let view = env.client.service.get_ref().view();
        let expected = env.lab.backends.len();
        let unhealthy: Vec<String> = view
            .endpoints
            .iter()
            .filter(|e| e.status != Status::Healthy || e.drained)
            .map(|e| format!("{} {:?}", e.endpoint.addr, e.status))
            .collect();
        let ok = set.len() == expected
            && !set.stale
            && view.endpoints.len() == expected
            && unhealthy.is_empty()
            && !view.panic
            && view.shares[0] >= 1.0 - 1e-9;
        if ok {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(format!(
                "after {timeout:?}: dns set {} endpoints (stale {}), shares {:?}, not healthy: [{}]",
                set.len(),
                set.stale,
                view.shares,
                unhealthy.join(", ")
            ));
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every endpoint of `idc` is ejected (for the recovery phase's setup).
async fn wait_ejected(env: &Env<'_>, idc: &str, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    loop {
        let view = env.client.service.get_ref().view();
        let all = view
            .endpoints
            .iter()
            .filter(|e| e.endpoint.idc.as_deref() == Some(idc))
            .all(|e| matches!(e.status, Status::Ejected { .. }));
        if all {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        sleep(Duration::from_millis(50)).await;
    }
}

fn set_fault(env: &Env<'_>, idc: &str, fault: Fault) {
    for b in env.lab.backends_of(idc) {
        b.proxy.set_fault(fault);
    }
}

fn control_err(e: ha_core::HaError) -> DemoError {
    DemoError::Ha(e)
}

/// Runs one phase: settle, set up (not counted), act, measure, undo, judge.
pub(crate) async fn run_phase(
    env: &Env<'_>,
    phase: Phase,
    secs: f64,
) -> Result<PhaseRow, DemoError> {
    let mut notes = Vec::new();
    if let Err(why) = settle(env, SETTLE_TIMEOUT).await {
        notes.push(format!("not settled before start: {why}"));
    }
    // Set-up that is not measured.
    if phase == Phase::Recovery {
        set_fault(env, "bj-a", Fault::Blackhole);
        if !wait_ejected(env, "bj-a", Duration::from_secs(5)).await {
            notes.push("set-up: bj-a was not ejected within 5s of the blackhole".into());
        }
    }

    let dur = phase.duration(secs, &env.tuning);
    if dur.as_secs_f64() > secs {
        notes.push(format!(
            "ran {:.1}s, the phase's minimum, instead of --seconds-per-phase {secs}",
            dur.as_secs_f64()
        ));
    }
    let bar = env.progress.phase(phase, dur);
    let live0 = env.load.live().snapshot();
    let t0 = Instant::now();
    let mut marks = Marks::default();
    if matches!(phase, Phase::Steady | Phase::KillOne) {
        // The balancer's latency estimates decide which endpoint of a tier gets the calls.
        let view = env.client.service.get_ref().view();
        let ewma: Vec<String> = view
            .endpoints
            .iter()
            .filter(|e| e.endpoint.idc.as_deref() == Some("bj-a"))
            .map(|e| format!("{} {}µs", e.endpoint.addr, e.ewma.as_micros()))
            .collect();
        notes.push(format!(
            "at start, bj-a peak-EWMA cost: {}",
            ewma.join(", ")
        ));
    }
    act_start(env, phase, &mut marks).await?;
    let t1 = t0 + dur;
    let mut watched = Watched::default();
    loop {
        let now = Instant::now();
        if now >= t1 {
            break;
        }
        if phase == Phase::Drain && marks.undrained_at.is_none() && now >= t0 + dur / 2 {
            env.client.control.undrain("bj-a").map_err(control_err)?;
            env.client.control.undrain("bj-b").map_err(control_err)?;
            marks.undrained_at = Some(Instant::now());
        }
        observe(env, &mut watched);
        bar.update(now - t0, &env.load.live().snapshot().since(&live0));
        sleep(Duration::from_millis(100).min(t1 - now)).await;
    }
    // Undo everything, then let the calls that started in the phase finish.
    env.client.control.undrain("bj-a").map_err(control_err)?;
    env.client.control.undrain("bj-b").map_err(control_err)?;
    env.lab.heal_all().await?;
    sleep_until(t1 + env.tuning.deadline + Duration::from_millis(300)).await;
    let samples = env.load.samples_between(t0, t1).await;
    let events = env.events.between(t0, Instant::now()).await;

    let mut row = PhaseRow::from_samples(phase.name(), dur, &samples);
    let mut ev_counts: BTreeMap<String, u64> = BTreeMap::new();
    for (_, e) in &events {
        *ev_counts.entry(e.kind().to_string()).or_default() += 1;
    }
    row.events = ev_counts;
    row.checks = judge(
        env, phase, t0, t1, &samples, &events, &marks, &watched, &mut notes,
    );
    row.notes = notes;
    row.pass = !row.checks.is_empty() && row.checks.iter().all(|c| c.ok);
    bar.finish(&row);
    Ok(row)
}

async fn act_start(env: &Env<'_>, phase: Phase, marks: &mut Marks) -> Result<(), DemoError> {
    match phase {
        Phase::Steady => {}
        Phase::KillOne => {
            // The host dies: its server and its proxy (the published address) go away.
            if let Some(b) = env.lab.backends_of("bj-a").next() {
                b.proxy.stop().await;
                b.who.stop().await;
            }
        }
        Phase::Blackhole => set_fault(env, "bj-a", Fault::Blackhole),
        Phase::Recovery => set_fault(env, "bj-a", Fault::Pass),
        Phase::Drain => {
            // bj-b first, so that traffic never passes through it on the way to sh-a.
            env.client.control.drain("bj-b").map_err(control_err)?;
            env.client.control.drain("bj-a").map_err(control_err)?;
            marks.drained_at = Some(Instant::now());
        }
        Phase::DnsNorthDown => env.lab.north.set_mode(DnsMode::Silent),
        Phase::DnsAllDown => {
            env.lab.north.set_mode(DnsMode::Silent);
            env.lab.south.set_mode(DnsMode::Silent);
        }
        Phase::DnsPoison => {
            let mut ips = env.lab.proxy_ips();
            ips.push(IpAddr::V4(POISON_IP));
            env.lab.north.set_records(DNS_NAME, &ips, RECORD_TTL_SECS)?;
        }
    }
    Ok(())
}

fn observe(env: &Env<'_>, w: &mut Watched) {
    let set = env.client.discovery.current();
    w.min_set_len = Some(w.min_set_len.map_or(set.len(), |m| m.min(set.len())));
    w.stale_seen |= set.stale;
    for ep in set.endpoints.iter() {
        let ip = ep.addr.ip();
        if !allowed(ip) && !w.disallowed_in_set.contains(&ip) {
            w.disallowed_in_set.push(ip);
        }
    }
}

// === judging ===

struct Counts {
    ok: u64,
    errors: u64,
    by_idc: BTreeMap<String, u64>,
}

fn counts<'a>(samples: impl Iterator<Item = &'a Sample>) -> Counts {
    let mut c = Counts {
        ok: 0,
        errors: 0,
        by_idc: BTreeMap::new(),
    };
    for s in samples {
        match &s.outcome {
            Outcome::Ok { idc, .. } => {
                c.ok += 1;
                *c.by_idc.entry(idc.clone()).or_default() += 1;
            }
            Outcome::Err(_) => c.errors += 1,
        }
    }
    c
}

impl Counts {
    fn share(&self, idc: &str) -> f64 {
        if self.ok == 0 {
            0.0
        } else {
            self.by_idc.get(idc).copied().unwrap_or(0) as f64 / self.ok as f64
        }
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn check(what: impl Into<String>, ok: bool) -> Check {
    Check {
        what: what.into(),
        ok,
    }
}

fn share_at_least(c: &Counts, idc: &str, min: f64, scope: &str) -> Check {
    let s = c.share(idc);
    check(
        format!(
            "{scope}{idc} ≥ {} of answers: {} of {}",
            pct(min),
            pct(s),
            c.ok
        ),
        c.ok > 0 && s >= min,
    )
}

fn no_errors(c: &Counts, scope: &str) -> Check {
    check(format!("{scope}errors = 0: {}", c.errors), c.errors == 0)
}

fn saw(
    events: &[(Instant, TopologyEvent)],
    f: impl Fn(&TopologyEvent) -> bool,
) -> Option<&(Instant, TopologyEvent)> {
    events.iter().find(|(_, e)| f(e))
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[allow(clippy::too_many_arguments)]
fn judge(
    env: &Env<'_>,
    phase: Phase,
    t0: Instant,
    t1: Instant,
    samples: &[Sample],
    events: &[(Instant, TopologyEvent)],
    marks: &Marks,
    watched: &Watched,
    notes: &mut Vec<String>,
) -> Vec<Check> {
    let all = counts(samples.iter());
    let after = |t: Instant| samples.iter().filter(move |s| s.start >= t);
    let tuning = &env.tuning;
    let mut checks = Vec::new();
    if samples.is_empty() {
        checks.push(check("the load ran (0 calls)", false));
        return checks;
    }
    match phase {
        Phase::Steady => {
            checks.push(no_errors(&all, ""));
            checks.push(share_at_least(&all, "bj-a", 0.99, ""));
            let mut per: BTreeMap<SocketAddr, u64> = BTreeMap::new();
            for s in samples {
                if let Outcome::Ok { endpoint, .. } = &s.outcome {
                    *per.entry(*endpoint).or_default() += 1;
                }
            }
            notes.push(format!(
                "answers per endpoint: {}",
                per.iter()
                    .map(|(a, n)| format!("{a} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Phase::KillOne => {
            // The shares are judged once the balancer can know: 1 s after the kill, or 200 ms
            // after the killed endpoint's ejection if that came later (a passive check needs
            // failures, and peak-EWMA may send the dead endpoint only a few calls a second:
            // one CI run saw the ejection 1.4 s after the kill).
            let dead = env.lab.backends_of("bj-a").next().map(|b| b.proxy.addr());
            let ejected_at = dead.and_then(|dead| {
                saw(
                    events,
                    |e| matches!(e, TopologyEvent::EndpointEjected { addr, .. } if *addr == dead),
                )
                .map(|(t, _)| *t)
            });
            let from = ejected_at.map_or(t0 + Duration::from_secs(1), |t| {
                (t + Duration::from_millis(200)).max(t0 + Duration::from_secs(1))
            });
            let settled = counts(after(from));
            let expect = (tuning.overprovisioning * 0.5).min(1.0);
            let a = settled.share("bj-a");
            let b = settled.share("bj-b");
            checks.push(check(
                format!(
                    "after +{}: bj-a share {} within {}±10% (overprovisioning {} × 1/2 healthy)",
                    ms(from - t0),
                    pct(a),
                    pct(expect),
                    tuning.overprovisioning
                ),
                (a - expect).abs() <= 0.1,
            ));
            checks.push(check(
                format!(
                    "after +{}: bj-b share {} within {}±10% (the spill stays in the region)",
                    ms(from - t0),
                    pct(b),
                    pct(1.0 - expect)
                ),
                (b - (1.0 - expect)).abs() <= 0.1,
            ));
            checks.push(check(
                format!("after 1s: sh-a share {} ≤ 1%", pct(settled.share("sh-a"))),
                settled.share("sh-a") <= 0.01,
            ));
            checks.push(no_errors(&settled, "after 1s: "));
            let budget = (all.ok + all.errors) / 200 + 1;
            checks.push(check(
                format!(
                    "failed calls ≤ {budget} (0.5%, the first instants before ejection; retries absorb the rest): {}",
                    all.errors
                ),
                all.errors <= budget,
            ));
            if let Some(b) = env.lab.backends_of("bj-a").next() {
                let dead = b.proxy.addr();
                let served_by_dead = samples
                    .iter()
                    .filter(|s| {
                        s.start >= t0 + Duration::from_millis(50)
                            && matches!(&s.outcome, Outcome::Ok { endpoint, .. } if *endpoint == dead)
                    })
                    .count();
                checks.push(check(
                    format!("the killed endpoint {dead} answered nothing: {served_by_dead}"),
                    served_by_dead == 0,
                ));
                let ejected = saw(
                    events,
                    |e| matches!(e, TopologyEvent::EndpointEjected { addr, .. } if *addr == dead),
                );
                checks.push(check(
                    format!(
                        "the killed endpoint was detected (EndpointEjected): {}",
                        ejected.map_or("no, it was never ejected".into(), |(t, _)| format!(
                            "at +{}",
                            ms(*t - t0)
                        ))
                    ),
                    ejected.is_some(),
                ));
            }
        }
        Phase::Blackhole => {
            let settled = counts(after(t0 + Duration::from_secs(1)));
            checks.push(share_at_least(&settled, "bj-b", 0.9, "after 1s: "));
            let bound = tuning.deadline + DEADLINE_SLACK;
            let late = samples.iter().filter(|s| s.latency > bound).count();
            let max = samples.iter().map(|s| s.latency).max().unwrap_or_default();
            checks.push(check(
                format!(
                    "no call past its deadline ({} + {} slack): {late} late, max {}",
                    ms(tuning.deadline),
                    ms(DEADLINE_SLACK),
                    ms(max)
                ),
                late == 0,
            ));
            let budget = (all.ok + all.errors) / 100;
            checks.push(check(
                format!(
                    "failed calls ≤ 1%: {} of {}",
                    all.errors,
                    all.ok + all.errors
                ),
                all.errors <= budget,
            ));
            let ejected: Vec<SocketAddr> = events
                .iter()
                .filter_map(|(_, e)| match e {
                    TopologyEvent::EndpointEjected { addr, idc, .. } if &**idc == "bj-a" => {
                        Some(*addr)
                    }
                    _ => None,
                })
                .collect();
            let moved = saw(
                events,
                |e| matches!(e, TopologyEvent::TierChanged { shares, .. } if shares[0] == 0.0),
            );
            checks.push(check(
                format!(
                    "both bj-a endpoints ejected (EndpointEjected events: {}); local share 0 after {}",
                    ejected.len(),
                    moved.map_or("never".into(), |(t, _)| ms(*t - t0))
                ),
                env.lab
                    .backends_of("bj-a")
                    .all(|b| ejected.contains(&b.proxy.addr()))
                    && moved.is_some(),
            ));
        }
        Phase::Recovery => {
            let hold = tuning.failback_hold;
            let restored: Vec<Instant> = events
                .iter()
                .filter_map(|(t, e)| match e {
                    TopologyEvent::EndpointRestored { idc, .. } if &**idc == "bj-a" => Some(*t),
                    _ => None,
                })
                .collect();
            checks.push(check(
                format!(
                    "both bj-a endpoints restored by a probe: {} EndpointRestored",
                    restored.len()
                ),
                restored.len() >= 2,
            ));
            if let Some(first) = restored.first() {
                // Before the failback hold of the first restored endpoint ends, bj-a only sees
                // its probes (one success per endpoint).
                let hold_end = *first + hold;
                let early = samples
                    .iter()
                    .filter(|s| {
                        s.start < hold_end - SWITCH_GRACE
                            && matches!(&s.outcome, Outcome::Ok { idc, .. } if idc == "bj-a")
                    })
                    .count();
                checks.push(check(
                    format!(
                        "no failback before the {} hold: bj-a answered {early} calls before it ended (≤ 2 probes allowed); first restore at +{}",
                        ms(hold),
                        ms(*first - t0)
                    ),
                    early <= 2,
                ));
            }
            let last = counts(after(t1 - Duration::from_secs(1)));
            checks.push(share_at_least(&last, "bj-a", 0.9, "last second: "));
            let local: Vec<f64> = events
                .iter()
                .filter_map(|(_, e)| match e {
                    TopologyEvent::TierChanged { shares, .. } => Some(shares[0]),
                    _ => None,
                })
                .collect();
            let flaps = local.windows(2).filter(|w| w[1] < w[0]).count();
            checks.push(check(
                format!(
                    "no flapping: local share only rises ({}), {flaps} drops",
                    local
                        .iter()
                        .map(|s| pct(*s))
                        .collect::<Vec<_>>()
                        .join(" → ")
                ),
                flaps == 0,
            ));
            let budget = (all.ok + all.errors) / 200 + 1;
            checks.push(check(
                format!("failed calls ≤ {budget} (0.5%): {}", all.errors),
                all.errors <= budget,
            ));
        }
        Phase::Drain => {
            checks.push(no_errors(&all, ""));
            match (marks.drained_at, marks.undrained_at) {
                (Some(d), Some(u)) => {
                    let drained = counts(
                        samples
                            .iter()
                            .filter(|s| s.start >= d + SWITCH_GRACE && s.start < u),
                    );
                    let back = counts(after(u + SWITCH_GRACE));
                    checks.push(check(
                        format!(
                            "while bj-a and bj-b are drained: sh-a = 100% of answers: {} of {}",
                            pct(drained.share("sh-a")),
                            drained.ok
                        ),
                        drained.ok > 0 && drained.share("sh-a") >= 1.0,
                    ));
                    checks.push(share_at_least(&back, "bj-a", 0.99, "after undrain: "));
                }
                _ => checks.push(check("drain and undrain both happened", false)),
            }
        }
        Phase::DnsNorthDown => {
            checks.push(no_errors(&all, ""));
            checks.push(share_at_least(&all, "bj-a", 0.99, ""));
            let fallback = saw(
                events,
                |e| matches!(e, TopologyEvent::DnsFallback { region, .. } if &**region == "south"),
            );
            checks.push(check(
                format!(
                    "DnsFallback to south seen: {}",
                    fallback.map_or("no".into(), |(t, _)| format!("at +{}", ms(*t - t0)))
                ),
                fallback.is_some(),
            ));
            let n = watched.min_set_len.unwrap_or(0);
            checks.push(check(
                format!(
                    "endpoint set never shrank: min {n} of {}",
                    env.lab.backends.len()
                ),
                n == env.lab.backends.len(),
            ));
        }
        Phase::DnsAllDown => {
            checks.push(no_errors(&all, "while stale: "));
            checks.push(share_at_least(&all, "bj-a", 0.99, ""));
            let stale = saw(events, |e| matches!(e, TopologyEvent::DnsStale { .. }));
            checks.push(check(
                format!(
                    "DnsStale warning seen: {} (stale answers allowed for {}s past expiry)",
                    stale.map_or("no".into(), |(t, _)| format!("at +{}", ms(*t - t0))),
                    tuning.serve_stale_for.as_secs()
                ),
                stale.is_some() && watched.stale_seen,
            ));
            let expired = saw(events, |e| matches!(e, TopologyEvent::DnsExpired { .. }));
            let n = watched.min_set_len.unwrap_or(0);
            checks.push(check(
                format!(
                    "stale set kept whole within its bound: min {n} endpoints, DnsExpired {}",
                    if expired.is_some() {
                        "seen"
                    } else {
                        "not seen"
                    }
                ),
                n == env.lab.backends.len() && expired.is_none(),
            ));
        }
        Phase::DnsPoison => {
            checks.push(no_errors(&all, ""));
            checks.push(share_at_least(&all, "bj-a", 0.99, ""));
            let poisoned = saw(
                events,
                |e| matches!(e, TopologyEvent::DnsPoisoned { refused, .. } if refused.contains(&IpAddr::V4(POISON_IP))),
            );
            checks.push(check(
                format!(
                    "DnsPoisoned alert for {POISON_IP} seen: {}",
                    poisoned.map_or("no".into(), |(t, _)| format!("at +{}", ms(*t - t0)))
                ),
                poisoned.is_some(),
            ));
            let picked_bad = samples
                .iter()
                .filter(|s| matches!(&s.outcome, Outcome::Ok { endpoint, .. } if !allowed(endpoint.ip())))
                .count();
            checks.push(check(
                format!(
                    "{POISON_IP} never in the endpoint set ({:?}) nor picked ({picked_bad})",
                    watched.disallowed_in_set
                ),
                watched.disallowed_in_set.is_empty() && picked_bad == 0,
            ));
        }
    }
    let lagged = env.events.lagged();
    if lagged > 0 {
        notes.push(format!("the event log lost {lagged} events (lagged)"));
    }
    checks
}
