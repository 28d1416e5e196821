//! Sentinel's Pub/Sub events, parsed into what the follower needs.
//!
//! Sentinel publishes each event on a channel named after it (`+switch-master`, `+sdown`, ...)
//! with a payload of one of two shapes:
//!
//! - `+switch-master <master-name> <old-ip> <old-port> <new-ip> <new-port>`;
//! - every other instance event: `<type> <name> <ip> <port> [@ <master-name> <master-ip>
//!   <master-port>]`, where `<type>` is `master`, `slave` or `sentinel`, and the `@` part is
//!   there when the instance is not a master (for a master `<name>` is the master's name).
//!
//! Sentinel may monitor several masters: an event for another master name is ignored.

use std::net::SocketAddr;

/// One event about the followed master, as far as the follower cares.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SentinelEvent {
    /// A failover has begun or progresses (`+try-failover`, `+elected-leader`,
    /// `+failover-state-select-slave`, `+selected-slave`, `+failover-state-send-slaveof-noone`,
    /// `+failover-state-wait-promotion`), or a quorum agrees the master is down (`+odown`):
    /// writes must be held.
    FailoverStarted {
        /// The event's channel, e.g. `+try-failover`.
        step: &'static str,
        /// The master being failed over.
        master: SocketAddr,
        /// The replica chosen for promotion, once Sentinel has chosen it (`+selected-slave`
        /// onwards).
        replica: Option<SocketAddr>,
    },
    /// Sentinel saw the chosen replica report itself master (`+promoted-slave`).
    Promoted {
        /// The promoted replica.
        addr: SocketAddr,
    },
    /// The sentinel's configuration now names `to` as the master (`+switch-master`).
    SwitchMaster {
        /// The old master.
        from: SocketAddr,
        /// The new master.
        to: SocketAddr,
    },
    /// The failover was given up (`-failover-abort-*`).
    FailoverAborted {
        /// The event's channel.
        step: String,
    },
    /// The master is subjectively down for one sentinel (`+sdown` of the master).
    MasterSubjectivelyDown,
    /// Something that may end a hold or change the picture: `-sdown`/`-odown` of the master,
    /// `+failover-end`, `+convert-to-slave`, `+reboot`, `+role-change`: ask the sentinels now.
    Reconcile {
        /// The event's channel.
        step: String,
    },
}

/// The channels the follower subscribes to (one `PSUBSCRIBE` pattern covers the aborts).
pub const CHANNELS: &[&str] = &[
    "+try-failover",
    "+elected-leader",
    "+failover-state-select-slave",
    "+selected-slave",
    "+failover-state-send-slaveof-noone",
    "+failover-state-wait-promotion",
    "+promoted-slave",
    "+failover-end",
    "+switch-master",
    "+sdown",
    "-sdown",
    "+odown",
    "-odown",
    "+convert-to-slave",
    "+reboot",
    "+role-change",
];

/// The pattern of every abort event (`-failover-abort-not-elected`, `-no-good-slave`, ...).
pub const ABORT_PATTERN: &str = "-failover-abort-*";

const HOLD_STEPS: &[&str] = &[
    "+try-failover",
    "+elected-leader",
    "+failover-state-select-slave",
    "+selected-slave",
    "+failover-state-send-slaveof-noone",
    "+failover-state-wait-promotion",
    "+odown",
];

/// Parses one message of `channel` with `payload` for the master named `master_name`; `None`
/// for another master, an event the follower does not use, or a malformed payload.
///
/// ```
/// use ha_redis::event::{parse, SentinelEvent};
/// let e = parse("+switch-master", "members 127.0.1.10 20000 127.0.2.10 20001", "members");
/// assert_eq!(e, Some(SentinelEvent::SwitchMaster {
///     from: "127.0.1.10:20000".parse().unwrap(),
///     to: "127.0.2.10:20001".parse().unwrap(),
/// }));
/// assert_eq!(parse("+switch-master", "other 1.1.1.1 1 2.2.2.2 2", "members"), None);
/// ```
pub fn parse(channel: &str, payload: &str, master_name: &str) -> Option<SentinelEvent> {
    let words: Vec<&str> = payload.split_ascii_whitespace().collect();
    if channel == "+switch-master" {
        let [name, oip, oport, nip, nport, ..] = words[..] else {
            return None;
        };
        if name != master_name {
            return None;
        }
        return Some(SentinelEvent::SwitchMaster {
            from: addr(oip, oport)?,
            to: addr(nip, nport)?,
        });
    }
    let inst = Instance::parse(&words)?;
    if inst.master_name != master_name {
        return None;
    }
    if let Some(step) = HOLD_STEPS.iter().find(|s| **s == channel) {
        // `+odown` and the failover steps about the master itself; `+selected-slave` and
        // `+failover-state-send-slaveof-noone` are about the chosen replica, same failover.
        return Some(SentinelEvent::FailoverStarted {
            step,
            master: inst.master,
            replica: (inst.kind == "slave").then_some(inst.addr),
        });
    }
    match channel {
        "+promoted-slave" if inst.kind == "slave" => {
            Some(SentinelEvent::Promoted { addr: inst.addr })
        }
        "+sdown" if inst.kind == "master" => Some(SentinelEvent::MasterSubjectivelyDown),
        "-sdown" | "-odown" if inst.kind != "master" => None,
        "-sdown" | "-odown" | "+failover-end" | "+convert-to-slave" | "+reboot"
        | "+role-change" => Some(SentinelEvent::Reconcile {
            step: channel.to_owned(),
        }),
        c if c.starts_with("-failover-abort-") => {
            Some(SentinelEvent::FailoverAborted { step: c.to_owned() })
        }
        _ => None,
    }
}

struct Instance<'a> {
    kind: &'a str,
    addr: SocketAddr,
    master_name: &'a str,
    /// The master: the instance itself for a master, the `@` part otherwise.
    master: SocketAddr,
}

impl<'a> Instance<'a> {
    fn parse(words: &[&'a str]) -> Option<Instance<'a>> {
        let [kind, name, ip, port, rest @ ..] = words else {
            return None;
        };
        let addr = addr(ip, port)?;
        let (master_name, master) = match rest {
            ["@", master, mip, mport, ..] => (master, self::addr(mip, mport)?),
            _ if *kind == "master" => (name, addr),
            _ => return None,
        };
        Some(Instance {
            kind,
            addr,
            master_name,
            master,
        })
    }
}

fn addr(ip: &str, port: &str) -> Option<SocketAddr> {
    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const M: &str = "members";

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failover_steps_in_the_order_sentinel_sends_them() {
        let master = "master members 127.0.1.10 20000";
        let replica = "slave 127.0.2.10:20001 127.0.2.10 20001 @ members 127.0.1.10 20000";
        for (ch, payload) in [
            ("+try-failover", master),
            ("+elected-leader", master),
            ("+failover-state-select-slave", master),
            ("+selected-slave", replica),
            ("+failover-state-send-slaveof-noone", replica),
            ("+failover-state-wait-promotion", replica),
            ("+odown", "master members 127.0.1.10 20000 #quorum 2/2"),
        ] {
            let replica = payload.starts_with("slave").then(|| a("127.0.2.10:20001"));
            assert_eq!(
                parse(ch, payload, M),
                Some(SentinelEvent::FailoverStarted {
                    step: HOLD_STEPS.iter().find(|s| **s == ch).unwrap(),
                    master: a("127.0.1.10:20000"),
                    replica,
                }),
                "{ch}"
            );
        }
        assert_eq!(
            parse("+promoted-slave", replica, M),
            Some(SentinelEvent::Promoted {
                addr: a("127.0.2.10:20001")
            })
        );
        assert_eq!(
            parse("+failover-end", master, M),
            Some(SentinelEvent::Reconcile {
                step: "+failover-end".into()
            })
        );
        assert_eq!(
            parse(
                "+switch-master",
                "members 127.0.1.10 20000 127.0.2.10 20001",
                M
            ),
            Some(SentinelEvent::SwitchMaster {
                from: a("127.0.1.10:20000"),
                to: a("127.0.2.10:20001")
            })
        );
        assert_eq!(
            parse("-failover-abort-no-good-slave", master, M),
            Some(SentinelEvent::FailoverAborted {
                step: "-failover-abort-no-good-slave".into()
            })
        );
    }

    #[test]
    fn sdown_of_master_only_and_other_masters_ignored() {
        assert_eq!(
            parse("+sdown", "master members 127.0.1.10 20000", M),
            Some(SentinelEvent::MasterSubjectivelyDown)
        );
        assert_eq!(
            parse(
                "+sdown",
                "slave 127.0.2.10:20001 127.0.2.10 20001 @ members 127.0.1.10 20000",
                M
            ),
            None
        );
        assert_eq!(
            parse(
                "+sdown",
                "sentinel 0123abcd 127.0.3.10 20005 @ members 127.0.1.10 20000",
                M
            ),
            None
        );
        assert_eq!(
            parse("+try-failover", "master other 127.0.1.10 20000", M),
            None
        );
        assert_eq!(
            parse(
                "+convert-to-slave",
                "slave 127.0.1.10:20000 127.0.1.10 20000 @ members 127.0.2.10 20001",
                M
            ),
            Some(SentinelEvent::Reconcile {
                step: "+convert-to-slave".into()
            })
        );
    }

    #[test]
    fn malformed_payloads_are_dropped() {
        assert_eq!(parse("+switch-master", "members 1.2.3.4", M), None);
        assert_eq!(parse("+switch-master", "members x 1 y 2", M), None);
        assert_eq!(parse("+try-failover", "", M), None);
        assert_eq!(parse("+try-failover", "master members nowhere 1", M), None);
        assert_eq!(parse("+selected-slave", "slave a 1.1.1.1 1", M), None);
        assert_eq!(
            parse("+selected-slave", "slave a 1.1.1.1 1 @ members x 1", M),
            None
        );
        assert_eq!(parse("+new-epoch", "7", M), None);
    }
}
