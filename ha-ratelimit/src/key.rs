//! The key a request is counted under, for one limit line, built without allocating.

use std::net::IpAddr;

use crate::zone::Probe;

const INLINE: usize = crate::zone::SHORT_KEY;

/// The longest key a line accepts, in bytes; longer keys skip the line, as in nginx.
pub const MAX_KEY_LEN: usize = 65535;

/// A request's key for one limit line: borrowed bytes, or a short value kept inline.
///
/// An empty key (including [`Key::NONE`]) skips the line: the request is neither checked nor
/// counted by it, like an empty `$key` in nginx. Keys are compared as bytes; a key function
/// should return one kind of key per line (an IP key and a byte key with the same bytes are the
/// same key).
///
/// ```
/// use ha_ratelimit::Key;
/// use std::net::{IpAddr, Ipv4Addr};
/// let ip = Key::ip(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 7)));
/// assert_eq!(ip.as_bytes(), &[127, 0, 1, 7]);
/// assert!(Key::from("").is_skip());
/// assert!(Key::NONE.is_skip());
/// ```
#[derive(Clone, Copy)]
pub struct Key<'a> {
    repr: Repr<'a>,
}

/// An inline key's bytes, zero-padded, on an 8-byte boundary: the zone reads them as two
/// 8-byte words, and a word that straddled a cache line (a 1-aligned array after the enum's
/// tag could) would make the CPU split the load and miss store forwarding.
#[derive(Clone, Copy)]
#[repr(align(8))]
struct Inline([u8; INLINE]);

#[derive(Clone, Copy)]
enum Repr<'a> {
    Borrowed(&'a [u8]),
    Inline { buf: Inline, len: u8 },
}

impl<'a> Key<'a> {
    /// No key: the line is skipped for this request.
    pub const NONE: Key<'static> = Key {
        repr: Repr::Borrowed(&[]),
    };

    /// A key from bytes (a member id, a route, a header value).
    #[inline]
    pub const fn bytes(bytes: &'a [u8]) -> Key<'a> {
        Key {
            repr: Repr::Borrowed(bytes),
        }
    }

    /// A key from a string.
    #[inline]
    pub const fn str(s: &'a str) -> Key<'a> {
        Key::bytes(s.as_bytes())
    }

    /// A key from an IP address (4 or 16 bytes, like nginx's `$binary_remote_addr`).
    #[inline]
    pub fn ip(ip: IpAddr) -> Key<'static> {
        let mut buf = Inline([0u8; INLINE]);
        let len = match ip {
            IpAddr::V4(v4) => {
                buf.0[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                buf.0[..16].copy_from_slice(&v6.octets());
                16
            }
        };
        Key {
            repr: Repr::Inline { buf, len },
        }
    }

    /// A key from a number (a member id), 8 bytes big-endian.
    #[inline]
    pub fn u64(n: u64) -> Key<'static> {
        let mut buf = Inline([0u8; INLINE]);
        buf.0[..8].copy_from_slice(&n.to_be_bytes());
        Key {
            repr: Repr::Inline { buf, len: 8 },
        }
    }

    /// One key for every request (a server-wide line, nginx's `$server_name` on one server).
    #[inline]
    pub const fn global() -> Key<'static> {
        Key::bytes(b"*")
    }

    /// The key's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.repr {
            Repr::Borrowed(b) => b,
            Repr::Inline { buf, len } => &buf.0[..usize::from(*len)],
        }
    }

    /// The key as the zone looks it up (inline keys are already padded).
    #[inline]
    pub(crate) fn probe(&self) -> Probe<'_> {
        match &self.repr {
            Repr::Borrowed(b) => Probe::new(b),
            Repr::Inline { buf, len } => Probe::padded(&buf.0[..usize::from(*len)], &buf.0),
        }
    }

    /// True when this key skips the line (empty, or longer than [`MAX_KEY_LEN`]).
    #[inline]
    pub fn is_skip(&self) -> bool {
        let n = self.as_bytes().len();
        n == 0 || n > MAX_KEY_LEN
    }
}

impl<'a> From<&'a str> for Key<'a> {
    fn from(s: &'a str) -> Self {
        Key::str(s)
    }
}

impl<'a> From<&'a [u8]> for Key<'a> {
    fn from(b: &'a [u8]) -> Self {
        Key::bytes(b)
    }
}

impl From<IpAddr> for Key<'static> {
    fn from(ip: IpAddr) -> Self {
        Key::ip(ip)
    }
}

impl std::fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(self.as_bytes()) {
            Ok(s) => write!(f, "Key({s:?})"),
            Err(_) => write!(f, "Key({:?})", self.as_bytes()),
        }
    }
}
