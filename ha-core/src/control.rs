//! The operator's control handle: drain and undrain IDCs at run time.
//!
//! A drain takes effect on the next pick of every balancer sharing the handle (the drained set is
//! read through `arc-swap`, one atomic load per pick). A drained IDC gets no traffic unless the
//! dependency is in panic mode (too few usable endpoints elsewhere).

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Topology;
use crate::error::{ConfigError, HaError};
use crate::events::{EventBus, TopologyEvent};

/// Drains and undrains IDCs; cheap to clone, shared by every balancer of a service.
///
/// ```
/// use ha_core::{Control, EventBus, Topology};
/// let topo = Topology::from_toml_str(r#"
/// local_idc = "bj-a"
/// [[regions]]
/// name = "north"
/// resolvers = ["127.0.1.53"]
/// [[idcs]]
/// name = "bj-a"
/// region = "north"
/// cidrs = ["127.0.1.0/24"]
/// "#, "t.toml").unwrap();
/// let control = Control::new(&topo, EventBus::default());
/// control.drain("bj-a").unwrap();
/// assert!(control.is_drained("bj-a"));
/// assert!(control.drain("gz-x").unwrap_err().is_config());
/// control.undrain("bj-a").unwrap();
/// assert!(control.drained().is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct Control {
    drained: Arc<ArcSwap<BTreeSet<Arc<str>>>>,
    known: Arc<[Arc<str>]>,
    file: Arc<std::path::Path>,
    events: EventBus,
}

impl Control {
    /// A handle for the IDCs of `topology`, publishing drains on `events`.
    pub fn new(topology: &Topology, events: EventBus) -> Control {
        Control {
            drained: Arc::new(ArcSwap::from_pointee(BTreeSet::new())),
            known: topology.idcs().iter().map(|d| d.name.clone()).collect(),
            file: topology.file().into(),
            events,
        }
    }

    /// The event bus drains are published on.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    fn known(&self, idc: &str) -> Result<Arc<str>, HaError> {
        self.known
            .iter()
            .find(|k| &***k == idc)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = self.known.iter().map(|k| &**k).collect();
                HaError::Config(ConfigError::new(
                    &*self.file,
                    "idc",
                    idc,
                    format!("unknown IDC (known: {})", names.join(", ")),
                ))
            })
    }

    /// Drains `idc`: from the next pick on, it gets no traffic unless in panic. Idempotent.
    pub fn drain(&self, idc: &str) -> Result<(), HaError> {
        self.set(idc, true)
    }

    /// Undrains `idc`. Idempotent.
    pub fn undrain(&self, idc: &str) -> Result<(), HaError> {
        self.set(idc, false)
    }

    fn set(&self, idc: &str, drain: bool) -> Result<(), HaError> {
        let name = self.known(idc)?;
        let mut changed = false;
        self.drained.rcu(|cur| {
            let mut next = BTreeSet::clone(cur);
            changed = if drain {
                next.insert(name.clone())
            } else {
                next.remove(&name)
            };
            next
        });
        if changed {
            self.events.publish(TopologyEvent::IdcDrained {
                idc: name,
                drained: drain,
            });
        }
        Ok(())
    }

    /// True when `idc` is drained.
    pub fn is_drained(&self, idc: &str) -> bool {
        self.drained.load().iter().any(|d| &**d == idc)
    }

    /// The drained IDCs.
    pub fn drained(&self) -> Arc<BTreeSet<Arc<str>>> {
        self.drained.load_full()
    }

    /// A cheap snapshot for one pick.
    pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<BTreeSet<Arc<str>>>> {
        self.drained.load()
    }
}
