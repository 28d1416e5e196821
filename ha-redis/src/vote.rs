//! The majority vote over the sentinels' answers to `SENTINEL get-master-addr-by-name`.
//!
//! Every sentinel is asked concurrently, each answer bounded by its own timeout
//! ([`ask_all`]); the master is the address named by **more than half of the sentinels that
//! answered** ([`tally`]), never simply the first answer. A sentinel that does not know the
//! master name votes "unknown"; unreachable sentinels and sentinels that refused our
//! credentials do not vote. The winner is then verified with `ROLE` on the node itself before
//! any command goes to it (that is the caller's job).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a sentinel gave no vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailKind {
    /// It could not be reached, or did not answer in time.
    Unreachable,
    /// It refused our credentials (`WRONGPASS`, `NOAUTH`).
    Auth,
    /// Another error (a protocol error, an unexpected reply).
    Other,
}

/// One sentinel's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// It names this master.
    Master(SocketAddr),
    /// It does not monitor a master of that name (a nil reply).
    Unknown,
    /// No vote.
    Failed(FailKind, String),
}

/// The outcome of a vote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Vote {
    /// More than half of the answering sentinels name `addr`.
    Master {
        /// The master.
        addr: SocketAddr,
        /// Votes for it.
        votes: usize,
        /// Sentinels that answered.
        answered: usize,
    },
    /// More than half of the answering sentinels do not know the master name.
    UnknownMaster,
    /// The answers disagree and none has a majority.
    NoMajority {
        /// Each sentinel and what it said.
        answers: Vec<(SocketAddr, Answer)>,
    },
    /// No sentinel answered; every one refused our credentials.
    AuthFailed {
        /// The sentinels and their errors.
        errors: Vec<(SocketAddr, String)>,
    },
    /// No sentinel answered.
    NoneReachable {
        /// The sentinels and their errors.
        errors: Vec<(SocketAddr, String)>,
    },
}

/// Counts the answers (see the [module docs](self)).
///
/// ```
/// use ha_redis::vote::{tally, Answer, Vote};
/// let a = "127.0.1.10:6400".parse().unwrap();
/// let b = "127.0.2.10:6401".parse().unwrap();
/// let s = |i: u8| std::net::SocketAddr::from(([127, 0, i, 1], 26400));
/// let v = tally(&[(s(1), Answer::Master(b)), (s(2), Answer::Master(a)), (s(3), Answer::Master(a))]);
/// assert_eq!(v, Vote::Master { addr: a, votes: 2, answered: 3 });
/// ```
pub fn tally(answers: &[(SocketAddr, Answer)]) -> Vote {
    let mut counts: Vec<(Option<SocketAddr>, usize)> = Vec::new();
    let mut answered = 0;
    for (_, a) in answers {
        let key = match a {
            Answer::Master(addr) => Some(*addr),
            Answer::Unknown => None,
            Answer::Failed(..) => continue,
        };
        answered += 1;
        match counts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        }
    }
    if answered == 0 {
        let errors: Vec<(SocketAddr, String)> = answers
            .iter()
            .map(|(s, a)| match a {
                Answer::Failed(_, e) => (*s, e.clone()),
                other => (*s, format!("{other:?}")),
            })
            .collect();
        let all_auth = !answers.is_empty()
            && answers
                .iter()
                .all(|(_, a)| matches!(a, Answer::Failed(FailKind::Auth, _)));
        return if all_auth {
            Vote::AuthFailed { errors }
        } else {
            Vote::NoneReachable { errors }
        };
    }
    match counts.iter().find(|(_, n)| *n * 2 > answered) {
        Some((Some(addr), votes)) => Vote::Master {
            addr: *addr,
            votes: *votes,
            answered,
        },
        Some((None, _)) => Vote::UnknownMaster,
        None => Vote::NoMajority {
            answers: answers.to_vec(),
        },
    }
}

/// Asks every sentinel concurrently with `ask`, each bounded by `timeout` (a sentinel that does
/// not answer in time is [`FailKind::Unreachable`]); returns the answers in the order of
/// `sentinels`. The whole call takes at most about `timeout`.
pub async fn ask_all<F, Fut>(
    sentinels: &[SocketAddr],
    timeout: Duration,
    ask: F,
) -> Vec<(SocketAddr, Answer)>
where
    F: Fn(usize, SocketAddr) -> Fut,
    Fut: Future<Output = Answer>,
{
    let futs = sentinels.iter().enumerate().map(|(i, s)| {
        let fut = ask(i, *s);
        async move {
            let answer = tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or_else(|_| {
                    Answer::Failed(
                        FailKind::Unreachable,
                        format!("no answer within {timeout:?}"),
                    )
                });
            (*s, answer)
        }
    });
    futures::future::join_all(futs).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, i, 1], 26400))
    }
    fn m(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, i, 10], 6400))
    }
    fn down() -> Answer {
        Answer::Failed(FailKind::Unreachable, "refused".into())
    }

    #[test]
    fn majority_not_first() {
        let v = tally(&[
            (s(1), Answer::Master(m(2))),
            (s(2), Answer::Master(m(1))),
            (s(3), Answer::Master(m(1))),
        ]);
        assert_eq!(
            v,
            Vote::Master {
                addr: m(1),
                votes: 2,
                answered: 3
            }
        );
    }

    #[test]
    fn one_survivor_decides_and_a_tie_does_not() {
        assert_eq!(
            tally(&[(s(1), down()), (s(2), Answer::Master(m(1))), (s(3), down())]),
            Vote::Master {
                addr: m(1),
                votes: 1,
                answered: 1
            }
        );
        assert!(matches!(
            tally(&[
                (s(1), Answer::Master(m(1))),
                (s(2), Answer::Master(m(2))),
                (s(3), down())
            ]),
            Vote::NoMajority { .. }
        ));
        assert!(matches!(
            tally(&[
                (s(1), Answer::Master(m(1))),
                (s(2), Answer::Master(m(2))),
                (s(3), Answer::Master(m(3)))
            ]),
            Vote::NoMajority { .. }
        ));
    }

    #[test]
    fn unknown_name_auth_and_nobody() {
        assert_eq!(
            tally(&[
                (s(1), Answer::Unknown),
                (s(2), Answer::Unknown),
                (s(3), Answer::Master(m(1)))
            ]),
            Vote::UnknownMaster
        );
        let auth = Answer::Failed(FailKind::Auth, "WRONGPASS".into());
        assert!(matches!(
            tally(&[(s(1), auth.clone()), (s(2), auth)]),
            Vote::AuthFailed { .. }
        ));
        assert!(matches!(
            tally(&[(s(1), down()), (s(2), down())]),
            Vote::NoneReachable { .. }
        ));
        assert!(matches!(tally(&[]), Vote::NoneReachable { .. }));
    }

    /// A sentinel that hangs costs the vote its own timeout, not more; the others still count.
    #[tokio::test(start_paused = true)]
    async fn asking_is_concurrent_and_bounded() {
        let start = tokio::time::Instant::now();
        let sentinels = [s(1), s(2), s(3)];
        let answers = ask_all(&sentinels, Duration::from_millis(300), |i, _| async move {
            match i {
                0 => std::future::pending().await,
                1 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Answer::Master(m(1))
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Answer::Master(m(1))
                }
            }
        })
        .await;
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert!(matches!(
            answers[0].1,
            Answer::Failed(FailKind::Unreachable, _)
        ));
        assert_eq!(
            tally(&answers),
            Vote::Master {
                addr: m(1),
                votes: 2,
                answered: 2
            }
        );
    }
}
