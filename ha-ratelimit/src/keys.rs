//! Key functions: a registry of named keys ([`Keys`]), closures ([`key_fn`]), and the typed
//! error of a key that cannot be had ([`KeyError`]).
//!
//! A line's `key` setting names the request attribute it counts (`client_ip`, `member_id`, ...).
//! With a hand-written `match` on that name, a misspelled name on either side falls into the
//! `_ => Key::NONE` arm and silently disables the line. [`Keys`] ties each name to its function
//! and tells the limiter the names ([`LimiterBuilder::keys`](crate::LimiterBuilder::keys)), so
//! that a line whose key no function answers is an error when the limiter is built or reloaded.

use std::sync::Arc;

use crate::key::Key;
use crate::layer::KeyFn;

/// Why a request has no key for a line that needs one. Unlike an empty key (which skips the
/// line, as in nginx), this fails the request: the tower layers return it as their error, and
/// `axum::handle_error` answers 500 with its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A key from the client's address, but the request carries none: an axum server has to be
    /// started with `into_make_service_with_connect_info::<SocketAddr>()`.
    #[error(
        "rate-limit key {key:?} needs the client's address (axum's ConnectInfo<SocketAddr>): \
         serve with into_make_service_with_connect_info::<SocketAddr>()"
    )]
    MissingConnectInfo {
        /// The key's name.
        key: Arc<str>,
    },
    /// No key function answers this key name (the limiter refuses such lines when it knows the
    /// names; see [`LimiterBuilder::keys`](crate::LimiterBuilder::keys)).
    #[error("no rate-limit key function for key {key:?}")]
    UnknownKey {
        /// The key's name.
        key: Arc<str>,
    },
}

impl KeyError {
    /// True for [`KeyError::MissingConnectInfo`].
    pub fn is_missing_connect_info(&self) -> bool {
        matches!(self, KeyError::MissingConnectInfo { .. })
    }

    /// True for [`KeyError::UnknownKey`].
    pub fn is_unknown_key(&self) -> bool {
        matches!(self, KeyError::UnknownKey { .. })
    }

    /// The key's name.
    pub fn key(&self) -> &str {
        match self {
            KeyError::MissingConnectInfo { key } | KeyError::UnknownKey { key } => key,
        }
    }
}

/// Makes a closure a key function for [`RateLimitLayer`](crate::RateLimitLayer): a closure
/// handed straight to `RateLimitLayer::new` cannot be given the signature a key function needs
/// (its key may borrow from the request, for any request lifetime), and fails to compile with a
/// lifetime error; passed through `key_fn`, it gets it. Returns the closure unchanged.
///
/// ```
/// use std::sync::Arc;
/// use ha_ratelimit::{Key, LimitConfig, Limiter, Rate, RateLimitConfig, RateLimitLayer, key_fn};
///
/// struct Req { member: u64, route: String }
/// let header = String::from("route"); // captured: a plain `fn` could not do this
/// let keys = key_fn(move |source: &str, req: &Req| {
///     if source == header { Key::str(&req.route) } else { Key::u64(req.member) }
/// });
/// let cfg = RateLimitConfig::with_limits(vec![
///     LimitConfig::new("per_route", "route", Rate::per_second(100)),
/// ]);
/// let limiter = Arc::new(Limiter::builder(cfg).build().unwrap());
/// let layer = RateLimitLayer::new(limiter, keys);
/// # let _ = layer;
/// ```
pub fn key_fn<Req, F>(f: F) -> F
where
    F: for<'r> Fn(&str, &'r Req) -> Key<'r> + Send + Sync + 'static,
{
    f
}

/// One key's function, boxed: the request's key, or why it has none.
pub(crate) type Getter<Req> =
    Box<dyn for<'r> Fn(&'r Req) -> Result<Key<'r>, KeyError> + Send + Sync>;

/// Coerces a closure to a [`Getter`] (the bound gives the closure its higher-ranked signature).
pub(crate) fn getter<Req, G>(g: G) -> Getter<Req>
where
    G: for<'r> Fn(&'r Req) -> Result<Key<'r>, KeyError> + Send + Sync + 'static,
{
    Box::new(g)
}

struct Entry<Req> {
    name: Arc<str>,
    get: Getter<Req>,
    needs_connect_info: bool,
}

/// Named key functions: each line's `key` setting is looked up here. A [`KeyFn`], so it goes
/// straight into [`RateLimitLayer::new`](crate::RateLimitLayer::new); give its
/// [`names`](Keys::names) to [`LimiterBuilder::keys`](crate::LimiterBuilder::keys) and a line
/// whose key is not one of them is an error when the limiter is built or reloaded, instead of a
/// line that never applies.
///
/// ```
/// use ha_ratelimit::{Key, Keys, LimitConfig, Limiter, Rate, RateLimitConfig};
///
/// struct Req { member: u64 }
/// let keys = Keys::new()
///     .key("member_id", |req: &Req| Key::u64(req.member))
///     .key("server", |_: &Req| Key::global());
/// let cfg = RateLimitConfig::with_limits(vec![
///     LimitConfig::new("per_member", "memberid", Rate::per_second(10)), // misspelled
/// ]);
/// let err = Limiter::builder(cfg).keys(keys.names()).build().unwrap_err();
/// assert_eq!(err.field(), "limit[0].key");
/// assert_eq!(err.value(), "memberid");
/// assert_eq!(err.limit(), Some("per_member"));
/// ```
pub struct Keys<Req> {
    entries: Vec<Entry<Req>>,
}

impl<Req> Default for Keys<Req> {
    fn default() -> Self {
        Keys {
            entries: Vec::new(),
        }
    }
}

impl<Req> std::fmt::Debug for Keys<Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl<Req> Keys<Req> {
    /// No keys yet.
    pub fn new() -> Self {
        Keys::default()
    }

    /// The key named `name`: `f` returns the request's key ([`Key::NONE`] skips the line for
    /// this request, like an empty nginx key). A name given twice keeps the last function.
    #[must_use]
    pub fn key<F>(self, name: impl Into<Arc<str>>, f: F) -> Self
    where
        F: for<'r> Fn(&'r Req) -> Key<'r> + Send + Sync + 'static,
    {
        self.insert(name.into(), getter(move |req| Ok(f(req))), false)
    }

    /// A key whose function may fail (the request then fails with the [`KeyError`], it does not
    /// skip the line).
    #[must_use]
    pub fn try_key<F>(self, name: impl Into<Arc<str>>, f: F) -> Self
    where
        F: for<'r> Fn(&'r Req) -> Result<Key<'r>, KeyError> + Send + Sync + 'static,
    {
        self.insert(name.into(), getter(f), false)
    }

    pub(crate) fn insert(
        mut self,
        name: Arc<str>,
        get: Getter<Req>,
        needs_connect_info: bool,
    ) -> Self {
        self.entries.retain(|e| e.name != name);
        self.entries.push(Entry {
            name,
            get,
            needs_connect_info,
        });
        self
    }

    /// The key names, in the order given.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|e| &*e.name)
    }

    /// True when `name` is one of the keys.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| &*e.name == name)
    }

    /// True when the key `name` is the client's address (`Keys::client_ip`, feature `axum`).
    pub fn needs_connect_info(&self, name: &str) -> bool {
        self.entries
            .iter()
            .any(|e| &*e.name == name && e.needs_connect_info)
    }
}

impl<Req: 'static> KeyFn<Req> for Keys<Req> {
    fn key<'r>(&self, source: &str, req: &'r Req) -> Key<'r> {
        self.try_key(source, req).unwrap_or(Key::NONE)
    }

    fn try_key<'r>(&self, source: &str, req: &'r Req) -> Result<Key<'r>, KeyError> {
        match self.entries.iter().find(|e| &*e.name == source) {
            Some(e) => (e.get)(req),
            None => Err(KeyError::UnknownKey { key: source.into() }),
        }
    }
}
